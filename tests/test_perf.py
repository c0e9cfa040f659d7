"""Performance switches change speed and memory, never the numbers: scan over layers, remat
policies, bf16 compute, the profiler window and the compilation cache."""

import glob
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, smoke
from lmjax import model as model_lib
from lmjax import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**model):
    cfg = base.get_config()
    cfg.model.update(vocab_size=128, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, **model)
    return cfg.model


def tokens(B=2, L=16, vocab=128):
    return jax.random.randint(jax.random.key(1), (B, L), 0, vocab)


def params_of(m):
    return nnx.state(m, nnx.Param)


def as_scanned(unrolled: model_lib.Transformer, cfg) -> model_lib.Transformer:
    """The scanned model holding exactly the unrolled one's weights (layouts converted)."""
    scanned = model_lib.Transformer(cfg, nnx.Rngs(params=7))
    state = params_of(scanned)
    nnx.replace_by_pure_dict(state, model_lib.stack_layers(nnx.to_pure_dict(params_of(unrolled))))
    nnx.update(scanned, state)
    return scanned


def loss_and_grads(m, tokens_BL):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params):
        logits_BLV = nnx.merge(graphdef, params, rest)(tokens_BL[:, :-1])
        logp_BLV = jax.nn.log_softmax(logits_BLV)
        return -jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture  # per test: test_scan_decodes_as_unrolled gives the models KV caches
def pair():
    unrolled = model_lib.Transformer(tiny(scan_layers=False), nnx.Rngs(params=0))
    return unrolled, as_scanned(unrolled, tiny(scan_layers=True))


def test_scanned_params_carry_a_leading_layers_axis(pair):
    _, scanned = pair
    kernel = scanned.blocks.attn.q.kernel
    assert kernel.shape == (3, 32, 4, 8)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_layouts_round_trip(pair):
    unrolled, scanned = pair
    back = model_lib.unstack_layers(nnx.to_pure_dict(params_of(scanned)))
    want = nnx.to_pure_dict(params_of(unrolled))
    assert jax.tree.structure(back) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, back, want)


def test_scan_and_unrolled_give_the_same_loss_and_gradients(pair):
    unrolled, scanned = pair
    loss_u, grads_u = loss_and_grads(unrolled, tokens())
    loss_s, grads_s = loss_and_grads(scanned, tokens())
    assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
    grads_s = model_lib.unstack_layers(nnx.to_pure_dict(grads_s))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads_s, nnx.to_pure_dict(grads_u))


def test_scan_decodes_as_unrolled(pair):
    """KV-cache decoding: prefill then one token, per-layer caches stacked in the scan."""
    outs = []
    for m in pair:
        m.init_cache(jnp.array([0, 3]), length=24)
        prefill = m(tokens(L=8))
        step = m(tokens(L=1))
        outs.append((prefill, step))
        cache_index = m.blocks.attn.cache_index if m.cfg.scan_layers else None
        if cache_index is not None:
            np.testing.assert_array_equal(cache_index[...], [9, 9, 9])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("remat", ["full", "dots_saveable", "offload"])
def test_every_remat_policy_gives_the_gradients_of_none(remat, scan):
    cfg = tiny(scan_layers=scan, remat="none")
    loss_none, grads_none = loss_and_grads(model_lib.Transformer(cfg, nnx.Rngs(params=0)),
                                           tokens())
    cfg = tiny(scan_layers=scan, remat=remat)
    with warnings.catch_warnings(record=True):
        loss_r, grads_r = loss_and_grads(model_lib.Transformer(cfg, nnx.Rngs(params=0)),
                                         tokens())
    assert float(loss_r) == pytest.approx(float(loss_none), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 grads_r, grads_none)


def test_remat_policies_save_fewer_residuals_than_none():
    """What remat is for, so that the test above cannot pass with remat doing nothing: the
    backward pass keeps fewer values (the residuals jax.vjp's pullback holds: 122,548 floats
    with none, 59,179 with dots_saveable, 39,019 with full when measured) as the policy
    saves less."""
    saved = {}
    for remat in ("none", "dots_saveable", "full"):
        m = model_lib.Transformer(tiny(scan_layers=False, remat=remat), nnx.Rngs(params=0))
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, params, rest)(tokens()[:, :-1]).sum()

        pullback = jax.eval_shape(lambda p, loss=loss: jax.vjp(loss, p)[1], params)
        saved[remat] = sum(x.size for x in jax.tree.leaves(pullback))
    assert saved["full"] < 0.8 * saved["dots_saveable"] < 0.8 * saved["none"], saved


def test_offload_on_cpu_says_it_keeps_activations_in_memory():
    """The train step's builder says so (train.with_kernel); the model never asks its backend."""
    cfg = smoke.get_config()
    cfg.model.remat = "offload"
    with pytest.warns(UserWarning, match="acts as 'dots_saveable'"):
        train.with_kernel(cfg, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.with_kernel(cfg, "tpu")


def test_bf16_compute_keeps_f32_master_weights_and_optimizer_state():
    cfg = smoke.get_config()
    cfg.model.update(dtype="bfloat16", param_dtype="float32")
    cfg.mesh.data = 1
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        state = fns.init()
        L = cfg.data.seq_len
        batch = {"inputs": np.ones((8, L), np.int32), "targets": np.ones((8, L), np.int32),
                 "weights": np.ones((8, L), np.float32)}
        new, out = fns.step(state, sharding.to_global(batch, mesh))
    floats = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)  # params and Adam moments
    assert np.isfinite(float(out["train/loss"]))
    # the compute really ran in bf16: the logits' matmul input is rounded to bf16
    m = model_lib.Transformer(cfg.model, nnx.Rngs(params=0))
    x_BLD = m.embed(jnp.zeros((1, 4), jnp.int32))
    assert m.embed.embedding[...].dtype == jnp.float32 and x_BLD.dtype == jnp.bfloat16


def run_smoke(workdir, **profile):
    cfg = smoke.get_config()
    cfg.train.update(steps=4, eval_every=0, eval_batches=0)
    cfg.optim.warmup_steps = 1
    cfg.profile.update(**profile)
    train.run(cfg, workdir, devices=jax.devices()[:1])


def test_profile_window_writes_a_trace(tmp_path):
    run_smoke(str(tmp_path), start_step=2, num_steps=2)
    traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_no_profile_when_num_steps_is_zero(tmp_path):
    run_smoke(str(tmp_path), start_step=2, num_steps=0)
    assert not os.path.exists(tmp_path / "profile")


@pytest.mark.slow
def test_second_run_reads_the_compilation_cache(tmp_path):
    """Two fresh processes: the first writes the train step into the cache, the second reads
    it (jax logs a cache hit) instead of compiling."""
    env = {**os.environ, "LMJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "JAX_DEBUG_LOG_MODULES": "jax._src.compiler,jax._src.compilation_cache"}
    code = ("import sys; sys.path.insert(0, '.'); from configs import smoke; from lmjax import "
            "train; c = smoke.get_config(); c.mesh.data = 1; c.train.update(steps=1, "
            "eval_every=0, eval_batches=0); c.optim.warmup_steps = 0; "
            "import jax; train.run(c, sys.argv[1], devices=jax.devices()[:1])")
    logs = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"run{i}")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600, check=True)
        logs.append(out.stderr)
    assert os.listdir(tmp_path / "cache" / "xla")
    assert "Persistent compilation cache hit" not in logs[0]
    assert "Persistent compilation cache hit" in logs[1]


def test_workdirs_from_before_scan_read_as_unrolled(tmp_path):
    """Their checkpoints hold blocks/<i>/...: a missing model.scan_layers means False."""
    from lmjax import config as config_lib

    cfg = smoke.get_config()
    cfg.model.scan_layers = True
    config_lib.save(cfg, str(tmp_path / "config.json"))
    assert config_lib.from_workdir(str(tmp_path)).model.scan_layers is True
    saved = (tmp_path / "config.json").read_text().replace('"scan_layers": true,', "")
    (tmp_path / "config.json").write_text(saved)
    assert config_lib.from_workdir(str(tmp_path)).model.scan_layers is False


def test_hugging_face_round_trip_through_the_scanned_layout(pair, tmp_path, monkeypatch):
    """Export unstacks the layers (blocks/<i>/...), import stacks them again."""
    from lmjax.interop import hf

    unrolled, scanned = pair
    cfg = base.get_config()
    cfg.model.update(tiny(scan_layers=True).to_dict(), max_len=64)
    hf.save_pretrained(scanned, cfg, str(tmp_path))
    config_from_hf = hf.config_from_hf

    def scanning(hf_config):
        out = config_from_hf(hf_config)
        out.model.scan_layers = True
        return out

    monkeypatch.setattr(hf, "config_from_hf", scanning)
    loaded, loaded_cfg = hf.from_pretrained(str(tmp_path))
    assert loaded_cfg.model.scan_layers and loaded.blocks.attn.q.kernel.shape[0] == 3
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params_of(loaded)),
                 nnx.to_pure_dict(params_of(scanned)))
