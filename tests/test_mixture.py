"""Mixtures of named text sources: parsing and its errors, temperature probabilities (hand
computed), observed proportions of a mixed stream, exact resume, held-out batches."""

import json
import math

import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from lmjax import validate
from lmjax.data import mixture, pipeline
from lmjax.data.tokenizer import TEXT_DIR

L, B = 32, 8


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two sources whose rows cannot be confused: English (Shakespeare) and random CJK text,
    which the Shakespeare tokenizer spells in byte pieces."""
    root = tmp_path_factory.mktemp("mixture")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMJAX_CACHE", str(root / "cache"))
        english = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")[:300_000]
        (root / "en.txt").write_text(english, encoding="utf-8")
        rng = np.random.default_rng(0)
        docs = ["".join(chr(c) for c in rng.integers(0x4E00, 0x4E40, size=2000))
                for _ in range(20)]
        (root / "zh.txt").write_text("\n\n\n".join(docs), encoding="utf-8")
        yield root


def make_cfg(root, spec="en={root}/en.txt:3,zh={root}/zh.txt:1"):
    cfg = base.get_config()
    cfg.data.update(seq_len=L, global_batch_size=B, mixture=spec.format(root=root),
                    eval_fraction=0.1)
    cfg.train.eval_batches = 4
    return cfg


def row_sets(cfg):
    """Source name -> (train rows, held-out rows) as sets of token tuples."""
    tokenizer = pipeline.build(cfg).tokenizer
    out = {}
    for source in mixture.parse(cfg.data.mixture):
        train, held_out = pipeline.source_rows(cfg, source, tokenizer)
        out[source.name] = ({tuple(r) for r in train}, {tuple(r) for r in held_out})
    return out


def origins(batches, sets, split=0):
    """The source of every row of `batches` (rows are inputs + the last target)."""
    names = []
    for batch in batches:
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            row = (*inputs.tolist(), int(targets[-1]))
            names.append([n for n, s in sets.items() if row in s[split]])
    assert all(len(n) == 1 for n in names), "every row comes from exactly one source"
    return [n[0] for n in names]


def test_temperature_probabilities_by_hand():
    sizes = {"en": 100.0, "sw": 1.0}
    assert mixture.temperature_probs(sizes, 1.0) == pytest.approx({"en": 100 / 101, "sw": 1 / 101})
    assert mixture.temperature_probs(sizes, 0.5) == pytest.approx({"en": 10 / 11, "sw": 1 / 11})
    assert mixture.temperature_probs(sizes, 0.0) == pytest.approx({"en": 0.5, "sw": 0.5})
    # mT5's alpha = 0.3 over 1000 : 10 : 1 -> 1000^0.3 = 7.943, 10^0.3 = 1.995, 1
    p = mixture.temperature_probs({"a": 1000, "b": 10, "c": 1}, 0.3)
    z = 1000 ** 0.3 + 10 ** 0.3 + 1
    assert p == pytest.approx({"a": 7.9433 / z, "b": 1.9953 / z, "c": 1 / z}, rel=1e-4)
    assert math.isclose(sum(p.values()), 1.0)


def test_parse_and_its_errors():
    got = mixture.parse("de=corpus/de/*.txt:0.7, ja=c:/x/ja.txt:0,en=shakespeare:2")
    assert got == [mixture.Source("de", "corpus/de/*.txt", 0.7),
                   mixture.Source("ja", "c:/x/ja.txt", 0.0), mixture.Source("en", "shakespeare", 2)]
    with pytest.raises(ValueError, match="source 'de' has a negative weight"):
        mixture.parse("de=a.txt:-0.5,en=b.txt:1")
    with pytest.raises(ValueError, match="gives every source weight 0"):
        mixture.parse("de=a.txt:0,en=b.txt:0")
    with pytest.raises(ValueError, match="has no numeric weight"):
        mixture.parse("de=a.txt")
    with pytest.raises(ValueError, match="must look like name=glob:weight"):
        mixture.parse("a.txt:1")
    with pytest.raises(ValueError, match="names source 'de' twice"):
        mixture.parse("de=a.txt:1,de=b.txt:1")
    with pytest.raises(ValueError, match=r"alpha=-0.1 must be in \[0, 1\]"):
        mixture.temperature_probs({"a": 1}, -0.1)


def test_validate_refuses_bad_mixtures(texts):
    cfg = make_cfg(texts, "en={root}/en.txt:1,zh={root}/zh.txt:-1")
    with pytest.raises(ValueError, match="'zh' has a negative weight"):
        validate.validate(cfg, 1)
    cfg = make_cfg(texts)
    cfg.data.source = "synthetic"
    with pytest.raises(ValueError, match="needs data.source='text'"):
        validate.validate(cfg, 1)
    validate.validate(make_cfg(texts), 1)
    with pytest.raises(FileNotFoundError, match="data.mixture source 'xx'"):
        pipeline.build(make_cfg(texts, "en={root}/en.txt:1,xx={root}/nope/*.txt:1"))


@pytest.mark.parametrize("weights,want", [((3, 1), 0.25), ((1, 1), 0.5), ((1, 4), 0.8)])
def test_observed_proportions_match_the_weights(texts, weights, want):
    cfg = make_cfg(texts, f"en={{root}}/en.txt:{weights[0]},zh={{root}}/zh.txt:{weights[1]}")
    it = pipeline.build(cfg).train
    names = origins([next(it) for _ in range(50)], row_sets(cfg))
    assert np.mean([n == "zh" for n in names]) == pytest.approx(want, abs=0.02)
    assert len(set(names[:B])) == 2  # mixed within a batch, not batch by batch


def test_zero_weight_source_is_not_trained_on(texts):
    cfg = make_cfg(texts, "en={root}/en.txt:1,zh={root}/zh.txt:0")
    it = pipeline.build(cfg).train
    assert set(origins([next(it) for _ in range(10)], row_sets(cfg))) == {"en"}


def test_resume_with_a_mixture_is_exact(texts):
    cfg = make_cfg(texts)
    it = pipeline.build(cfg).train
    [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    fresh = pipeline.build(cfg).train
    fresh.set_state(state)
    for got, want in zip([next(fresh) for _ in range(4)], expected, strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    # each process takes its rows of the same global batch
    halves = [next(pipeline.build(cfg, p, 2).train)["inputs"] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), next(pipeline.build(cfg).train)["inputs"])


def test_eval_batches_mix_held_out_rows(texts):
    cfg = make_cfg(texts)
    data = pipeline.build(cfg)
    assert len(data.eval_batches) == 4
    names = origins(data.eval_batches, row_sets(cfg), split=1)
    assert np.mean([n == "zh" for n in names]) == pytest.approx(0.25, abs=0.05)


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A 4-step smoke run on an English + CJK mixture (the second source evaluated only)."""
    from configs import smoke
    from lmjax import train

    root = tmp_path_factory.mktemp("mixture_run")
    english = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (root / "en.txt").write_text(english, encoding="utf-8")
    rng = np.random.default_rng(1)
    (root / "zh.txt").write_text("\n\n\n".join(
        "".join(chr(c) for c in rng.integers(0x4E00, 0x4E40, size=600)) for _ in range(8)),
        encoding="utf-8")
    cfg = smoke.get_config()
    cfg.data.update(mixture=f"en={root}/en.txt:2,zh={root}/zh.txt:1", eval_fraction=0.1)
    cfg.train.update(steps=4, eval_every=2, eval_batches=1)
    cfg.optim.warmup_steps = 1
    cfg.checkpoint.every = 4
    train.run(cfg, str(root / "run"))
    return str(root / "run"), root


@pytest.mark.slow
def test_per_source_bits_per_byte_against_a_direct_computation(mixture_run):
    import jax.numpy as jnp

    from lmjax import evaluate, inference
    from lmjax.data import sources

    workdir, root = mixture_run
    result = evaluate.evaluate(workdir)
    table = [line.split() for line in evaluate.report(result).splitlines()]
    assert [row[0] for row in table if row[0] in ("en", "zh")] == ["en", "zh"]
    model, cfg, tokenizer = inference.load(workdir)
    total_nats, total_bytes = 0.0, 0
    for name in ("en", "zh"):
        _, stream = sources.text_streams([root / f"{name}.txt"], tokenizer, 0.1)
        nll = []
        for start in range(0, len(stream) - 1, cfg.data.seq_len):
            inputs = stream[start:start + cfg.data.seq_len]
            targets = stream[start + 1:start + cfg.data.seq_len + 1]
            logits = np.asarray(model(jnp.asarray([inputs])), np.float64)[0][:len(targets)]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            nll += list(-logp[np.arange(len(targets)), targets])
        # the held-out documents' bytes, less those of the first token (an input, never a
        # target): one for a byte piece (zh), else its surface text (decode() of a stream cut
        # inside a character would count replacement characters)
        held_out = sources.read_split([root / f"{name}.txt"], 0.1)[1]
        sp = spm.SentencePieceProcessor(model_proto=tokenizer.serialized())
        first = sp.encode(held_out[0], out_type="proto").pieces[0]
        first_bytes = 1 if sp.is_byte(first.id) else len(first.surface.encode("utf-8"))
        assert first.id == stream[0]
        n_bytes = sum(len(d.encode("utf-8")) for d in held_out) - first_bytes
        assert result[f"eval/{name}/tokens"] == len(stream) - 1
        assert result[f"eval/{name}/bytes"] == n_bytes
        assert result[f"eval/{name}/loss"] == pytest.approx(np.mean(nll), abs=1e-4)
        assert result[f"eval/{name}/bits_per_byte"] == pytest.approx(
            np.sum(nll) / (math.log(2) * n_bytes), rel=1e-4)
        total_nats, total_bytes = total_nats + np.sum(nll), total_bytes + n_bytes
    assert result["eval/bits_per_byte"] == pytest.approx(
        total_nats / (math.log(2) * total_bytes), rel=1e-4)
    # random CJK characters cost far more bits per byte to a Shakespeare model than English
    assert result["eval/zh/bits_per_byte"] != pytest.approx(result["eval/en/bits_per_byte"])
