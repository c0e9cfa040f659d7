"""A trained run, loaded for use: its config, tokenizer and model weights (eval, sample, convert).

Inference loading lives here, above checkpoint.py, because it needs the config, the model and
the tokenizer, which checkpoint.py (Orbax only) must not import. The weights come through
checkpoint.restore_params, the same partial restore as train.init_from.
"""

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType

from lmjax import checkpoint, paths, sharding
from lmjax import config as config_lib
from lmjax.data.tokenizer import Tokenizer
from lmjax.model import Transformer


def load(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
         cfg: ml_collections.ConfigDict | None = None
         ) -> tuple[Transformer, ml_collections.ConfigDict, Tokenizer | None]:
    """(model, cfg, tokenizer or None) of the run in `workdir`, at its latest or given step.

    Parameters are laid out on `mesh` by the run's logical-axis rules (default: the first
    device alone), as training lays them out. `cfg` (default: the run's) may differ from the
    run's in what changes no parameter shape (lmjax eval's RoPE scaling or window overrides).
    """
    cfg = config_lib.from_workdir(workdir) if cfg is None else cfg  # config.json over base.py
    if mesh is None:
        mesh = jax.make_mesh((1,) * len(sharding.AXES), sharding.AXES,
                             axis_types=(AxisType.Auto,) * len(sharding.AXES),
                             devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
        shardings = nnx.get_named_sharding(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    nnx.replace_by_pure_dict(state, checkpoint.restore_params(
        workdir, nnx.to_pure_dict(state), step))
    tokenizer_path = paths.resolve(workdir) / "tokenizer.model"  # local or gs://
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path.is_file() else None
    return nnx.merge(graphdef, state), cfg, tokenizer
