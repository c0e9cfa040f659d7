"""Sampling: the model-free loop on a fake model, the filtered distributions against a direct
computation, and KV-cache decoding against recomputing the whole forward pass."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import model, sample

V = 16


def counting_model(tokens_BL, cache):
    """A fake tokens_to_logits: the next token is (last token + 1) mod V, with certainty. The
    cache counts the tokens fed, to check the loop feeds exactly what it should."""
    logits_BLV = jax.nn.one_hot((tokens_BL + 1) % V, V) * 20.0
    return logits_BLV, cache + tokens_BL.shape[1]


def test_sampler_follows_the_fake_model_and_stops():
    prompt = jnp.array([[0, 1, 2], [0, 0, 9]], jnp.int32)
    out = sample.sample(counting_model, jnp.int32(0), prompt, jax.random.key(0),
                        max_new_tokens=6, temperature=0.0, stop_ids=(12,), pad_id=0)
    # row 0 runs 3, 4, ... and never meets 12 in 6 tokens; row 1 stops at 12 and is padded.
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 7, 8], [10, 11, 12, 0, 0, 0]])


def test_sampler_ends_when_every_row_stopped():
    fed = []
    prompt = jnp.array([[5], [6]], jnp.int32)

    def record(i, tokens_B):
        fed.append(tokens_B.tolist())

    out = jax.jit(lambda p: sample.sample(counting_model, jnp.int32(0), p, jax.random.key(0),
                                          max_new_tokens=8, temperature=0.0, stop_ids=(8,),
                                          pad_id=0, on_token=record))(prompt)
    jax.effects_barrier()
    np.testing.assert_array_equal(out, [[6, 7, 8, 0, 0, 0, 0, 0], [7, 8, 0, 0, 0, 0, 0, 0]])
    assert fed == [[6, 7], [7, 8], [8, 0]]  # three iterations, not eight


def reference_distribution(logits, temperature, top_k, top_p):
    """Direct computation: sort, keep the top k, then the shortest prefix whose mass reaches
    top_p, renormalise."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[:top_k or len(p)]] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    mass, kept = 0.0, np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= top_p:
            break
        kept[i] = True
        mass += q[i]
    q = np.where(kept, q, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 0, 0.5), (1.5, 10, 0.9), (1.0, 0, 1.0)])
def test_filtered_distribution_matches_direct_computation(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32) * 2
    got = jax.nn.softmax(sample.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    for row, want_row in zip(np.asarray(got), logits, strict=True):
        np.testing.assert_allclose(row, reference_distribution(want_row, temperature, top_k,
                                                               top_p), atol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    n = 40_000
    draws = sample.choose(jnp.tile(logits, (n, 1)), jax.random.key(1), 1.0, top_k=3)
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.01)
    draws = sample.choose(jnp.tile(logits, (n, 1)), jax.random.key(2), 1.0, top_p=0.6)
    freq = np.bincount(np.asarray(draws), minlength=5) / n  # 0.4 < 0.6, 0.4 + 0.3 >= 0.6
    np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.01)


def test_temperature_zero_is_argmax():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(8, 50)), jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    np.testing.assert_array_equal(sample.choose(logits, jax.random.key(0), 0.0), greedy)
    np.testing.assert_array_equal(sample.choose(logits, jax.random.key(0), 1.0, top_k=1), greedy)


FAMILIES = {
    "llama_gqa": dict(),
    "gpt2": dict(position="learned", norm="layer", mlp="gelu", use_bias=True,
                 tie_embeddings=True, num_kv_heads=4, max_len=64),
}
PROMPTS = [[5, 9, 2, 7, 1, 30, 4], [11], [3, 8, 60, 2]]


def tiny_model(family):
    cfg = smoke.get_config().model
    cfg.update(vocab_size=64, **FAMILIES[family])
    return model.Transformer(cfg, nnx.Rngs(0))


def full_forward(m):
    """ids -> logits of every position, uncached: one jitted pass over a right-padded buffer
    (causal, so the padding after the ids changes nothing before it)."""
    run = jax.jit(lambda tokens_BL: m(tokens_BL))

    def logits(ids):
        buffer = np.zeros((1, 32), np.int32)
        buffer[0, :len(ids)] = ids
        return run(jnp.asarray(buffer))[0, :len(ids)]

    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_the_full_forward_pass(family):
    """Prefill a left-padded batch, then feed one token at a time: every step's logits equal
    those of the unpadded sequence run through the model whole."""
    m = tiny_model(family)
    rows = [p + [13, 21, 34] for p in PROMPTS]  # each prompt, then three fed tokens
    P = 8
    padded = np.zeros((3, P), np.int32)
    for r, p in enumerate(PROMPTS):
        padded[r, P - len(p):] = p
    decoder = nnx.clone(m)
    decoder.init_cache(jnp.array([P - len(p) for p in PROMPTS]), P + 3)
    call = nnx.jit(lambda d, tokens_BL: d(tokens_BL))  # nnx.jit carries the cache updates
    steps = [call(decoder, jnp.asarray(padded))[:, -1]]
    for t in (13, 21, 34):
        steps.append(call(decoder, jnp.full((3, 1), t, jnp.int32))[:, -1])
    forward = full_forward(m)
    for r, row in enumerate(rows):
        full = forward(row)
        want = full[len(PROMPTS[r]) - 1:]  # logits after the prompt and after each fed token
        np.testing.assert_allclose(np.stack([s[r] for s in steps]), want, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_uncached_argmax(family):
    m = tiny_model(family)
    generator = sample.Generator(m)
    got = generator(PROMPTS, max_new_tokens=10, temperature=0.0)
    forward = full_forward(m)
    for prompt, new in zip(PROMPTS, got, strict=True):
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(jnp.argmax(forward(ids)[-1])))
        assert new == ids[len(prompt):]
    # temperature 0 and top-k 1 are the same greedy choice by different code paths
    assert generator(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == got


def test_one_compilation_per_shape_bucket_and_seeds():
    generator = sample.Generator(tiny_model("llama_gqa"))
    settings = dict(max_new_tokens=4, temperature=1.0, top_p=0.9)
    a = generator([[1, 2, 3], [4]], seed=1, **settings)
    b = generator([[1, 2, 3, 4, 5, 6], [7, 8]], seed=1, **settings)  # same bucket (16)
    assert generator._run._cache_size() == 1
    assert generator([[1, 2, 3], [4]], seed=1, **settings) == a  # a seed fixes the draws
    generator([[1] * 20, [2]], seed=1, **settings)  # bucket 32: a second compilation
    assert generator._run._cache_size() == 2
    assert len(a) == len(b) == 2 and all(len(r) == 4 for r in a + b)


def test_stop_ids_cut_and_bad_requests():
    generator = sample.Generator(tiny_model("gpt2"))
    free = generator([[1, 2]], max_new_tokens=6, temperature=0.0)[0]
    cut = generator([[1, 2]], max_new_tokens=6, temperature=0.0, stop_ids=(free[2],))[0]
    assert cut == free[: free.index(free[2]) + 1]
    with pytest.raises(ValueError, match="at least one token"):
        generator([[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's 64 learned positions"):
        generator([[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generator([[1]], max_new_tokens=2, top_p=1.5)


@pytest.mark.slow
def test_sample_command_streams_what_it_returns(smoke_workdir):
    out = io.StringIO()
    texts = sample.main(smoke_workdir, ["ROMEO:"], max_new_tokens=12, temperature=1.0,
                        seed=3, out=out)
    assert out.getvalue() == "ROMEO:" + texts[0] + "\n"
    assert len(texts[0]) > 0
    out = io.StringIO()
    texts = sample.main(smoke_workdir, ["A", "To be"], max_new_tokens=5, temperature=0.0,
                        out=out)
    assert out.getvalue() == f"--- sample 1 ---\nA{texts[0]}\n--- sample 2 ---\nTo be{texts[1]}\n"


@pytest.mark.slow
def test_sample_command_refuses_before_echoing_the_prompt(smoke_workdir):
    out = io.StringIO()
    with pytest.raises(ValueError, match="top_p=1.5"):
        sample.main(smoke_workdir, ["ROMEO:"], top_p=1.5, out=out)
    assert out.getvalue() == ""  # the error alone, not after "ROMEO:"
