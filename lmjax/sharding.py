"""The device mesh and how logical axis names map onto it.

The model names axes ('embed', 'mlp', 'activation_batch', ...); a RULES preset says which mesh
axis each name is split over. Changing the parallelism strategy means picking another preset,
never editing the model (Flax lm1b, MaxText). Mesh axes:

  data    replicas that each hold a full copy of the parameters (pure data parallelism)
  fsdp    parameters, gradients and optimizer state split ZeRO-3 style; the batch is split too
  tensor  Megatron tensor parallelism: attention heads and MLP width split, one all-reduce per
          attention and MLP block
"""

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension of every input is split over these

_ACTIVATIONS = {
    "activation_batch": BATCH,
    "activation_length": None,
    "activation_embed": None,
    "activation_head_dim": None,
}
_REPLICATED = {name: None for name in
               ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "length")}

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # Pure data parallelism: every device holds every parameter.
    "dp": {**_REPLICATED, **_ACTIVATIONS, "activation_heads": None, "activation_mlp": None,
           "activation_vocab": None},
    # FSDP (ZeRO-3): each weight matrix split along its model-width dimension.
    "fsdp": {**_REPLICATED, **_ACTIVATIONS, "embed": "fsdp", "activation_heads": None,
             "activation_mlp": None, "activation_vocab": None},
    # FSDP + Megatron TP: heads, kv heads, MLP width and vocabulary on 'tensor'.
    "fsdp_tp": {**_REPLICATED, **_ACTIVATIONS, "embed": "fsdp", "heads": "tensor",
                "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                "activation_heads": "tensor", "activation_mlp": "tensor",
                "activation_vocab": "tensor"},
}


def rules(name: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The preset as the (logical, mesh) pairs nnx.logical_axis_rules takes."""
    return tuple(RULES[name].items())


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes from cfg.mesh, with one -1 filled by the devices the others leave."""
    sizes = [cfg.mesh[a] for a in AXES]
    named = ", ".join(f"mesh.{a}={s}" for a, s in zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh {named} is invalid: use positive sizes and at most one -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if num_devices % fixed or (-1 not in sizes and fixed != num_devices):
        raise ValueError(f"Mesh {named} does not divide the {num_devices} available devices.")
    return tuple(num_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def constrain(x: jax.Array, logical: tuple[str, ...]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh and rules context."""
    if not spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.apply_rules(P(*logical), None))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into one global array split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def expected_spec(logical: tuple[str | None, ...], preset: str) -> P:
    return P(*(RULES[preset][name] if name else None for name in logical))


def check_divisible(abstract_state, mesh: jax.sharding.Mesh, preset: str) -> None:
    """Fail before compiling if a parameter dimension does not split evenly over its mesh axes."""
    for path, var in _logical_params(abstract_state):
        for dim, name in zip(var.shape, var.get_metadata()["out_sharding"], strict=True):
            axes = RULES[preset][name] if name else None
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                raise ValueError(
                    f"Parameter {path} has {name!r} of size {dim}, which does not split over "
                    f"mesh axes {axes} of {ways} devices; change the model size or the mesh.")


def assert_sharded(state, preset: str, min_size: int = 2**14) -> list[str]:
    """Every parameter of at least `min_size` elements is laid out as the preset says.

    Returns a description of each mismatch (empty when all is well), so callers decide whether a
    mismatch is fatal (tests) or a warning (a user's odd mesh).
    """
    problems = []
    for path, var in _logical_params(state):
        if math.prod(var.shape) < min_size:
            continue
        want = expected_spec(var.get_metadata()["out_sharding"], preset)
        have = var.get_value().sharding
        expect = NamedSharding(have.mesh, want)
        if not have.is_equivalent_to(expect, len(var.shape)):
            problems.append(f"{path}: sharded {have.spec}, preset {preset!r} says {want}")
    return problems


def _logical_params(state):
    """(path, variable) for each leaf Variable that carries logical axis names."""
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding"):
            yield jax.tree_util.keystr(path, simple=True, separator="/"), var
