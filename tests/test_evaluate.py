"""Evaluation: byte counts, row coverage, standard errors, and the figures of a trained run
against the training loop's own eval and an independent computation."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from lmjax import evaluate, inference
from lmjax.data import records, sources
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer

TEXT = "Ay me! sad hours seem long.\nNaïve café — ünïcödé 😀 and tabs\there.\n\n"


def test_bytes_per_token_sum_to_the_utf8_length():
    tokenizer = Tokenizer.load(resolve_tokenizer("shakespeare_bpe2048"))
    table = evaluate.bytes_per_token(tokenizer)
    ids = tokenizer.encode([TEXT])[0]
    assert table[ids].sum() == len(TEXT.encode("utf-8"))
    assert table[tokenizer.eos_id] == 0 and table[tokenizer.pad_id] == 0


def test_stream_rows_cover_every_transition_once():
    stream = np.arange(10, 20, dtype=np.int32)
    rows = evaluate.stream_rows(stream, 4)
    assert rows["inputs"].shape == (3, 4)
    kept = rows["weights"] > 0
    np.testing.assert_array_equal(rows["targets"][kept], stream[1:])
    np.testing.assert_array_equal(rows["inputs"][kept], stream[:-1])
    assert kept.sum() == 9


def test_standard_error_of_equal_rows_is_the_textbook_one():
    x = np.array([2.0, 3.0, 5.0, 4.0, 6.0]) * 8
    r, se = evaluate.ratio(x, np.full(5, 8.0))
    assert r == pytest.approx(x.sum() / 40)
    assert se == pytest.approx(np.std(x / 8, ddof=1) / math.sqrt(5))
    summary = evaluate.summarize(x, x / 4, np.full(5, 8.0), np.full(5, 16.0))
    assert summary["eval/bits_per_byte"] == pytest.approx(x.sum() / 80 / math.log(2))
    assert summary["eval/perplexity_se"] == pytest.approx(math.exp(r) * se)


@pytest.mark.slow
def test_eval_equals_the_training_loops_eval_on_any_mesh(smoke_workdir):
    rows = [json.loads(line) for line in open(os.path.join(smoke_workdir, "metrics.jsonl"))]
    last = [r for r in rows if "eval/loss" in r][-1]
    for devices in (jax.devices(), jax.devices()[:1]):
        result = evaluate.evaluate(smoke_workdir, batches=2, devices=devices)
        assert result["step"] == 6 and result["eval/sequences"] == 16
        assert result["eval/loss"] == pytest.approx(last["eval/loss"], abs=1e-5)
        assert result["eval/accuracy"] == pytest.approx(last["eval/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_eval_of_a_text_file_against_a_direct_computation(smoke_workdir, tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text(TEXT * 3)
    result = evaluate.evaluate(smoke_workdir, text=str(path))
    model, cfg, tokenizer = inference.load(smoke_workdir)
    ids = np.array(tokenizer.encode([TEXT * 3])[0] + [tokenizer.eos_id])  # a document, its EOS
    L, nll, correct = cfg.data.seq_len, [], []
    for start in range(0, len(ids) - 1, L):  # rows of L targets, the last one shorter
        inputs, targets = ids[start:start + L], ids[start + 1:start + L + 1]
        logits = np.asarray(model(jnp.asarray([inputs])), np.float64)[0][:len(targets)]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll += list(-logp[np.arange(len(targets)), targets])
        correct += list(logits.argmax(-1) == targets)
    first_bytes = len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert result["eval/tokens"] == len(ids) - 1
    assert result["eval/sequences"] == math.ceil((len(ids) - 1) / L) > 1
    assert result["eval/bytes"] == len((TEXT * 3).encode("utf-8")) - first_bytes
    assert result["eval/loss"] == pytest.approx(np.mean(nll), abs=1e-4)
    assert result["eval/bits_per_byte"] == pytest.approx(
        np.sum(nll) / math.log(2) / result["eval/bytes"], rel=1e-4)
    assert result["eval/accuracy"] == pytest.approx(np.mean(correct))


@pytest.mark.parametrize("source", ["jsonl", "parquet", "hf"])
def test_eval_of_records_equals_eval_of_the_same_text(smoke_workdir, tmp_path, source):
    """`lmjax eval --text=... --config.data.source=jsonl|parquet|hf`: records holding the
    documents of a text file score as that file does, whole or split as the run's data says."""
    text = "".join(f"{TEXT}poem {i}\n\n\n" for i in range(12))
    path = tmp_path / "poems.txt"
    path.write_text(text)
    folder = epath.Path(tmp_path / source)
    folder.mkdir()
    records_text = records.write(source, sources.split_documents(text), folder)
    as_records = (f"data.source={source}", "data.text_field=text")
    one = jax.devices()[:1]
    whole = evaluate.evaluate(smoke_workdir, text=str(path), devices=one)  # --text: every row
    assert evaluate.evaluate(smoke_workdir, text=records_text, overrides=as_records,
                             devices=one) == whole
    held_out = evaluate.evaluate(smoke_workdir, devices=one, overrides=(
        f"data.text={path}", "data.eval_fraction=0.25"))
    assert evaluate.evaluate(smoke_workdir, devices=one, overrides=(
        f"data.text={records_text}", "data.eval_fraction=0.25", *as_records)) == held_out
    assert 0 < held_out["eval/tokens"] < whole["eval/tokens"]


@pytest.mark.slow
def test_eval_refuses_bad_requests(smoke_workdir, tmp_path):
    with pytest.raises(ValueError, match=r"takes --config\.data\.\*, --config\.mesh\.\* and "):
        evaluate.evaluate(smoke_workdir, overrides=("model.d_model=8",))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        evaluate.evaluate(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
        evaluate.evaluate(smoke_workdir, step=4)
