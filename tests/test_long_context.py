"""Long text: strided evaluation windows, sliding-window attention (forward, gradients, rolling
KV cache), RoPE scaling against the papers' formulas and transformers, and starting a run from
another run's weights."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import (
    attention,
    checkpoint,
    evaluate,
    inference,
    model,
    rope_scaling,
    sample,
    sharding,
    validate,
)
from lmjax import train as train_lib
from tests.test_sample import full_forward

V = 64


def tiny(**overrides) -> model.Transformer:
    cfg = smoke.get_config().model
    cfg.update(vocab_size=V, **overrides)
    return model.Transformer(cfg, nnx.Rngs(0))


def log_probs(logits_LV: np.ndarray, targets_L: np.ndarray) -> np.ndarray:
    logits_LV = np.asarray(logits_LV, np.float64)
    top = logits_LV.max(-1, keepdims=True)
    logp = logits_LV - top - np.log(np.exp(logits_LV - top).sum(-1, keepdims=True))
    return logp[np.arange(len(targets_L)), targets_L]


# ------------------------------------------------------------------ strided evaluation


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 16), (100, 16, 5), (100, 16, 1),
                                              (16, 16, 4), (7, 16, 3), (1000, 64, 48)])
def test_every_transition_scored_once_with_the_promised_history(n, seq_len, stride):
    spans = evaluate.windows(n, seq_len, stride)
    scored = []
    for i, (begin, first, end) in enumerate(spans):
        assert end - begin <= seq_len and begin <= first <= end
        for t in range(first, end):  # transition t: predicts token t+1 from tokens 0..t
            history = t - begin  # earlier tokens inside its window
            assert history == t if i == 0 else history >= seq_len - stride
            scored.append(t)
    assert sorted(scored) == list(range(n)) == scored  # each exactly once, in order
    rows = evaluate.strided_rows(np.arange(n + 1, dtype=np.int32), seq_len, stride)
    kept = rows["weights"] > 0
    np.testing.assert_array_equal(rows["targets"][kept], np.arange(1, n + 1))
    # the row's inputs are the window's tokens: input j of the row is token begin + j
    np.testing.assert_array_equal(rows["inputs"][:, 0], [b for b, _, _ in spans])


def test_stride_equal_to_the_context_is_the_plain_rows():
    stream = np.arange(10, 47, dtype=np.int32)
    plain, strided = evaluate.stream_rows(stream, 8), evaluate.strided_rows(stream, 8, 8)
    for key in plain:
        np.testing.assert_array_equal(plain[key], strided[key])


@pytest.mark.parametrize("stride", [0, -1, 17])
def test_a_stride_outside_1_to_the_context_is_refused(stride):
    with pytest.raises(ValueError, match=f"stride {stride} must be between 1 and the context"):
        evaluate.windows(100, 16, stride)
    cfg = smoke.get_config()  # seq_len 32; data.eval_stride 0 is the default, = seq_len
    cfg.data.eval_stride = stride + 16 if stride > 0 else stride
    if stride != 0:
        with pytest.raises(ValueError, match=f"eval_stride={cfg.data.eval_stride} must be"):
            validate.validate(cfg, 8)


def score(m: model.Transformer, stream: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """Mean NLL of the strided rows, through evaluate's own per-row sums."""
    rows = {k: jnp.asarray(v) for k, v in evaluate.strided_rows(stream, seq_len, stride).items()}
    graphdef, state = nnx.split(m)
    sums = jax.jit(lambda s, b: evaluate._row_sums(graphdef, s, b))(state, rows)
    assert float(sums["tokens"].sum()) == len(stream) - 1
    return float(sums["nll"].sum() / sums["tokens"].sum())


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, V, 97).astype(np.int32)


def test_strided_eval_of_a_text_that_fits_equals_one_forward_pass(stream):
    m = tiny(max_len=128)
    direct = -log_probs(m(jnp.asarray(stream[None, :-1]))[0], stream[1:]).mean()
    for stride in (128, 40, 7):  # context 128 > 96 transitions: one window, whatever the stride
        assert score(m, stream, 128, stride) == pytest.approx(direct, abs=1e-5)
    # cut into windows of 32: less history, so a different score (by ~1e-3 at this random init,
    # far above the 1e-5 the equalities hold to)
    assert score(m, stream, 32, 32) != pytest.approx(direct, abs=1e-4)


def test_strided_eval_with_a_sliding_window_model_equals_the_full_pass(stream):
    """A 2-layer model with window 4 sees at most 2 x 3 tokens back: with seq_len - stride >= 6
    every scored token has its whole receptive field, so strided = one pass over all 96."""
    m = tiny(attention_window=4)
    direct = -log_probs(m(jnp.asarray(stream[None, :-1]))[0], stream[1:]).mean()
    assert score(m, stream, 32, 8) == pytest.approx(direct, abs=1e-5)
    assert score(m, stream, 32, 32) != pytest.approx(direct, abs=1e-4)  # rows start blind


# ------------------------------------------------------------------ sliding-window attention


def banded_reference(q_BLNH, k_BLKH, v_BLKH, window):
    """Softmax attention with an explicit band i - window < j <= i, GQA by repeating heads."""
    B, L, N, H = q_BLNH.shape
    G = N // k_BLKH.shape[2]
    k_BLNH, v_BLNH = jnp.repeat(k_BLKH, G, axis=2), jnp.repeat(v_BLKH, G, axis=2)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    band_LL = (j <= i) & (i - j < window)
    scores = jnp.einsum("BLNH,BSNH->BNLS", q_BLNH, k_BLNH) / math.sqrt(H)
    probs = jax.nn.softmax(jnp.where(band_LL, scores, -jnp.inf), axis=-1)
    return jnp.einsum("BNLS,BSNH->BLNH", probs, v_BLNH)


@pytest.mark.parametrize("window", [1, 5, 12])
def test_windowed_attention_equals_a_banded_mask_forward_and_gradients(window):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 12, 4, 8))
    k, v = (jax.random.normal(key, (2, 12, 2, 8)) for key in keys[1:])
    got = attention.attend(q, k, v, window=window)
    np.testing.assert_allclose(got, banded_reference(q, k, v, window), atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(attention.attend(*a, window=window) ** 2),
                     argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(banded_reference(*a, window) ** 2),
                    argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    if window < 12:  # a band narrower than the sequence really changes the result
        assert not np.allclose(got, attention.attend(q, k, v), atol=1e-3)


def test_model_window_is_full_attention_until_the_sequence_outgrows_it():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 20)), jnp.int32)
    full, windowed = tiny()(tokens), tiny(attention_window=8)(tokens)  # same init seed
    np.testing.assert_allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert not np.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_rolling_cache_decoding_equals_the_uncached_banded_pass(scan_layers):
    """Left-padded prompts longer than the window, prefilled at once, then chunks of 3 and
    single tokens: the cache holds `window` slots, and every logit equals the full pass's."""
    m = tiny(attention_window=5, scan_layers=scan_layers)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(1, V, n)) for n in (9, 4, 7)]
    fed = rng.integers(1, V, (3, 10)).astype(np.int32)
    P = 9
    padded = np.zeros((3, P), np.int32)
    for r, p in enumerate(prompts):
        padded[r, P - len(p):] = p
    decoder = nnx.clone(m)
    decoder.init_cache(jnp.array([P - len(p) for p in prompts]), P + fed.shape[1])
    assert all(x.shape[-3] == 5 for x in jax.tree.leaves(nnx.state(decoder, nnx.Cache))
               if x.ndim >= 4)  # [(layers,) B, window, K, H]: O(window), not O(length)
    call = nnx.jit(lambda d, tokens_BL: d(tokens_BL))
    outs = [call(decoder, jnp.asarray(padded))]
    for chunk in (fed[:, :3], fed[:, 3:4], fed[:, 4:7], fed[:, 7:8], fed[:, 8:9], fed[:, 9:]):
        outs.append(call(decoder, jnp.asarray(chunk)))
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    for r, p in enumerate(prompts):
        row = np.array(p + list(fed[r]), np.int32)
        want = m(jnp.asarray(row[None]))[0]
        np.testing.assert_allclose(got[r, P - len(p):], want, atol=2e-5)


def test_greedy_generation_with_a_window_equals_uncached_argmax():
    m = tiny(attention_window=4)
    prompts = [[5, 9, 2, 7, 1, 30, 4], [11]]
    got = sample.Generator(m)(prompts, max_new_tokens=8, temperature=0.0)
    forward = full_forward(m)  # one jitted, right-padded, uncached pass
    for prompt, new in zip(prompts, got, strict=True):
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(jnp.argmax(forward(ids)[-1])))
        assert new == ids[len(prompt):]


def test_a_window_larger_than_the_context_is_refused():
    cfg = smoke.get_config()  # seq_len 32
    cfg.model.attention_window = 33
    with pytest.raises(ValueError, match="attention_window=33 is larger than the context"):
        validate.validate(cfg, 8)
    cfg.model.attention_window = 32  # a no-op at 32, but meaningful at longer evaluation
    validate.validate(cfg, 8)
    cfg.model.attention_window = -1
    with pytest.raises(ValueError, match="model.attention_window=-1 must be at least 0"):
        validate.validate(cfg, 8)


# ------------------------------------------------------------------ RoPE scaling


def rope_cfg(kind, factor=4.0, original=64, head_dim=32, theta=10_000.0):
    cfg = smoke.get_config().model
    cfg.update(head_dim=head_dim, rope_theta=theta, rope_scaling=kind,
               rope_scaling_factor=factor, rope_original_max_len=original)
    return cfg


def test_position_interpolation_divides_every_frequency():
    plain, _ = rope_scaling.frequencies(rope_cfg("none"))
    pi, scale = rope_scaling.frequencies(rope_cfg("linear", factor=4.0))
    np.testing.assert_allclose(plain, 10_000.0 ** (-np.arange(0, 32, 2) / 32), rtol=1e-6)
    np.testing.assert_allclose(pi, plain / 4, rtol=1e-6)
    assert scale == 1.0


def test_position_interpolation_is_the_plain_model_at_positions_over_s():
    """Chen et al. 2023: f'(x, m) = f(x, m / s). Same weights, same logits."""
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, V, (1, 24)), jnp.int32)
    positions = jnp.arange(24)[None]
    scaled = tiny(rope_scaling="linear", rope_scaling_factor=3.0)(tokens, positions)
    plain = tiny()(tokens, positions / 3.0)
    np.testing.assert_allclose(scaled, plain, atol=1e-5)


def test_yarn_by_hand_from_the_paper():
    """Peng et al. 2023 with H=128, base 10^4, L=4096, s=8, alpha=1, beta=32: a pair turning
    r = L / (2 pi b^(2d/H)) times over L keeps its frequency if r > beta and is divided by s
    if r < alpha; queries and keys are scaled by 0.1 ln 8 + 1."""
    H, L, s = 128, 4096, 8.0
    freqs, scale = rope_scaling.frequencies(rope_cfg("yarn", s, L, head_dim=H))
    theta = 10_000.0 ** (-np.arange(0, H, 2) / H)
    r = L / (2 * np.pi / theta)
    assert scale == pytest.approx(0.1 * math.log(8) + 1) == pytest.approx(1.2079441541679836)
    np.testing.assert_allclose(freqs[r > 32], theta[r > 32], rtol=1e-6)
    np.testing.assert_allclose(freqs[r < 1], theta[r < 1] / s, rtol=1e-6)
    # the ramp: linear in d from floor(d(r = 32)) = floor(20.9) to ceil(d(r = 1)) = ceil(45.03)
    d32 = H * math.log(L / (32 * 2 * math.pi)) / (2 * math.log(10_000.0))
    d1 = H * math.log(L / (2 * math.pi)) / (2 * math.log(10_000.0))
    assert (math.floor(d32), math.ceil(d1)) == (20, 46)
    gamma = 1 - np.clip((np.arange(H // 2) - 20) / (46 - 20), 0, 1)
    np.testing.assert_allclose(freqs, (1 - gamma) * theta / s + gamma * theta, rtol=1e-6)
    assert np.all(np.diff(freqs / theta) <= 1e-7)  # from kept (1) down to interpolated (1/s)


@pytest.mark.parametrize("kind,factor,original,head_dim,theta", [
    ("linear", 4.0, 64, 32, 10_000.0), ("yarn", 4.0, 64, 32, 10_000.0),
    ("yarn", 8.0, 4096, 128, 10_000.0), ("yarn", 2.5, 2048, 64, 500_000.0)])
def test_rope_scaling_equals_transformers(kind, factor, original, head_dim, theta):
    pytest.importorskip("torch")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    params = {"rope_type": kind, "factor": factor, "rope_theta": theta}
    if kind == "yarn":
        params["original_max_position_embeddings"] = original
    hf = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                     max_position_embeddings=int(original * factor), rope_parameters=params)
    want, want_scale = rope_utils.ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    got, scale = rope_scaling.frequencies(rope_cfg(kind, factor, original, head_dim, theta))
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)
    assert scale == pytest.approx(want_scale)


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling="yarn", rope_original_max_len=0), "needs model.rope_original_max_len"),
    (dict(rope_scaling="linear", position="learned"), "needs model.position='rope'"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.5),
     "model.rope_scaling_factor=0.5 must be at least 1."),
    (dict(rope_scaling="ntk"), "is not one of"),
])
def test_bad_rope_scaling_is_refused(change, message):
    cfg = smoke.get_config()
    cfg.model.update(**change)
    with pytest.raises(ValueError, match=message):
        validate.validate(cfg, 8)


# ------------------------------------------------------------------ through a trained run


@pytest.mark.slow
def test_strided_eval_of_a_run_against_the_hugging_face_loop(smoke_workdir, tmp_path,
                                                             monkeypatch):
    """`lmjax eval --stride` on a file, against the loop of Hugging Face's "perplexity of
    fixed-length models" written out by hand with the run's model."""
    path = tmp_path / "poem.txt"
    path.write_text("Shall I compare thee to a summer's day? Thou art more lovely. " * 6)
    result = evaluate.evaluate(smoke_workdir, text=str(path), stride=12)
    m, cfg, tokenizer = inference.load(smoke_workdir)
    ids = np.array(tokenizer.encode([path.read_text()])[0] + [tokenizer.eos_id])
    L, n, nll, prev_end = cfg.data.seq_len, len(ids) - 1, [], 0
    for begin in range(0, n, 12):
        end = min(begin + L, n)
        logits = m(jnp.asarray(ids[None, begin:end]))[0]
        nll += list(-log_probs(logits, ids[begin + 1:end + 1])[prev_end - begin:])
        prev_end = end
        if end == n:
            break
    assert len(nll) == n == result["eval/tokens"] and result["eval/stride"] == 12
    assert result["eval/loss"] == pytest.approx(np.mean(nll), abs=1e-5)
    plain = evaluate.evaluate(smoke_workdir, text=str(path))
    assert plain["eval/stride"] == L and plain["eval/tokens"] == n
    assert result["eval/sequences"] > plain["eval/sequences"]
    for stride in (0, L + 1):
        with pytest.raises(ValueError, match="stride"):
            evaluate.evaluate(smoke_workdir, text=str(path), stride=stride)
    # RoPE scaling at evaluation (no finetune): PI with s = 2 is the model at positions / 2.
    # This barely trained model hardly uses positions, so also check the model evaluate built.
    built = []

    def spy(*args, **kwargs):
        built.append(real_load(*args, **kwargs))
        return built[-1]

    real_load = inference.load
    monkeypatch.setattr(inference, "load", spy)
    pi = evaluate.evaluate(smoke_workdir, text=str(path), overrides=(
        "model.rope_scaling=linear", "model.rope_scaling_factor=2.0"))
    assert built[-1][0].cfg.rope_scaling == "linear" and m.cfg.rope_scaling == "none"
    nll = []
    for begin in range(0, n, L):
        inputs = ids[None, begin:min(begin + L, n)]
        positions = jnp.arange(inputs.shape[1])[None] / 2.0
        nll += list(-log_probs(m(jnp.asarray(inputs), positions)[0], ids[begin + 1:begin + L + 1]))
    assert pi["eval/loss"] == pytest.approx(np.mean(nll), abs=1e-5)
    with pytest.raises(ValueError, match="overrides only, not 'model.d_model=8'"):
        evaluate.evaluate(smoke_workdir, overrides=("model.d_model=8",))


@pytest.mark.slow
def test_eval_command_prints_a_stride_table_and_refuses_stride_zero(smoke_workdir):
    from tests.test_cli import lmjax

    out = lmjax("eval", f"--workdir={smoke_workdir}", "--batches=1", "--stride=16",
                "--stride=32", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| 32 |")]
    assert [line.split("|")[2].strip() for line in table] == ["16", "32"]
    out = lmjax("eval", f"--workdir={smoke_workdir}", "--stride=0", devices=1)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "lmjax eval: --stride=0 must be at least 1: windows must move forward.")


@pytest.mark.slow
def test_init_from_loads_the_weights_with_a_fresh_optimizer(smoke_workdir):
    """A longer context with YaRN, on another mesh: the source's weights, step 0, zero moments."""
    cfg = smoke.get_config()
    cfg.data.seq_len = 64
    cfg.model.update(rope_scaling="yarn", rope_scaling_factor=2.0, rope_original_max_len=32)
    cfg.train.init_from = smoke_workdir
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    validate.validate(cfg, 8)
    mesh = sharding.make_mesh(cfg, jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train_lib.compile_fns(cfg, mesh)
        state = checkpoint.load_params(smoke_workdir, fns.init())
    source, _, _ = inference.load(smoke_workdir)
    loaded = nnx.to_pure_dict(state)
    for got, want in zip(jax.tree.leaves(loaded[0]), jax.tree.leaves(nnx.to_pure_dict(
            nnx.state(source))), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(loaded[1]["step"]) == 0
    moments = [x for x in jax.tree.leaves(loaded[1]["opt_state"]) if x.ndim > 0]
    assert moments and all(not np.any(x) for x in moments)
    cfg.model.d_model = 64
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        with pytest.raises(ValueError, match="does not fit this model: leaf"):
            checkpoint.load_params(smoke_workdir, train_lib.compile_fns(cfg, mesh).init())


@pytest.mark.slow
def test_init_from_through_train_run_starts_trained_at_step_zero(smoke_workdir, tmp_path):
    """`lmjax train --config.train.init_from=W` in a new workdir: step 1 already has W's loss,
    and the run counts its own steps from 0 (its checkpoint is step 2, not W's 6 + 2)."""
    def rows(workdir):
        with open(f"{workdir}/metrics.jsonl") as f:
            return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}

    cfg = smoke.get_config()
    cfg.train.update(steps=2, eval_every=0, init_from=smoke_workdir)
    cfg.optim.warmup_steps = 1
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    workdir = str(tmp_path / "tuned")
    train_lib.run(cfg, workdir, devices=jax.devices()[:1])
    source, tuned = rows(smoke_workdir), rows(workdir)
    assert sorted(tuned) == [1, 2]
    # the same first batch: W after 6 steps is at least halfway from its step-1 loss to its last
    assert tuned[1] < source[1] - 0.5 * (source[1] - source[6]), (tuned, source)
    assert os.listdir(f"{workdir}/checkpoints") == ["2"]
