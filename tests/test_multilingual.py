"""Multilingual corpus builder (on fixtures, no apt), language sampling for the tokenizer
(hand-computed counts), and fertility against direct counts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from lmjax.corpora import english, multilingual
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer


def test_reference_sections_and_chunks():
    text = "Preface\n\n    1.1. Indented toc entry\n\n1.1. Intro\n\nBody.\n1.2. Next\n\nMore."
    assert multilingual.reference_documents(text) == [
        "Preface\n\n1.1. Indented toc entry", "1.1. Intro\n\nBody.", "1.2. Next\n\nMore."]
    doc = "\n\n".join(["a" * 30, "b" * 30, "c" * 30, "d" * 100])
    assert multilingual.chunks(doc, max_bytes=70) == [
        "a" * 30 + "\n\n" + "b" * 30, "c" * 30, "d" * 100]


def test_sample_lines_by_hand():
    # 9000 and 1000 bytes, alpha 0.5: p = sqrt(9000) / (sqrt(9000) + sqrt(1000)) = 3/4, 1/4,
    # so of 10000 bytes 7500 (750 lines) come from a and 2500 (250 lines, 2.5 epochs) from b.
    lines = {"a": [f"a{i:08d}x" for i in range(900)], "b": [f"b{i:08d}y" for i in range(100)]}
    drawn = multilingual.sample_lines(lines, alpha=0.5)
    assert len(drawn["a"]) == 750 and len(set(drawn["a"])) == 750  # no repeats within an epoch
    assert len(drawn["b"]) == 250
    counts = np.unique(drawn["b"], return_counts=True)[1]
    assert len(counts) == 100 and set(counts) == {2, 3}
    assert multilingual.sample_lines(lines, alpha=0.5) == drawn  # seeded
    uniform = multilingual.sample_lines(lines, alpha=0.0, total_bytes=2000)
    assert len(uniform["a"]) == len(uniform["b"]) == 100


def test_fertility_golden_values():
    tok = Tokenizer.load(resolve_tokenizer("shakespeare_bpe2048"))
    # Shakespeare's tokenizer has no CJK pieces: byte fallback spells each UTF-8 byte.
    rows = multilingual.fertility(tok, {"zh": ["中文字", "日本"], "en": ["the king"]})
    assert rows["zh"]["bytes"] == 15 and rows["zh"]["chars"] == 5 and rows["zh"]["words"] == 2
    assert rows["zh"]["tokens"] == 15 and rows["zh"]["tokens_per_byte"] == 1.0
    assert rows["zh"]["tokens_per_char"] == 3.0 and rows["zh"]["tokens_per_word"] == 7.5
    assert rows["en"]["bytes"] == 8 and rows["en"]["words"] == 2
    table = multilingual.fertility_table(rows)
    assert "| zh | 15 | 5 | 2 | 15 | 1.000 | 3.000 | 7.500 |" in table


def test_fertility_of_files_equals_a_direct_count(tmp_path):
    path = resolve_tokenizer("shakespeare_bpe2048")
    docs = ["Ay me! sad hours seem long.\nNaïve café", "O Romeo, Romeo!\n\nwherefore art thou"]
    (tmp_path / "x.txt").write_text("\n\n\n".join(docs), encoding="utf-8")
    row = multilingual.fertility_of_files(Tokenizer.load(path), f"xx={tmp_path}/x.txt")["xx"]
    sp = spm.SentencePieceProcessor(model_file=path)
    tokens = sum(len(sp.encode(d)) for d in docs)
    assert row["tokens"] == tokens
    assert row["bytes"] == sum(len(d.encode("utf-8")) for d in docs) == 75
    assert row["tokens_per_byte"] == tokens / 75


def test_train_multilingual_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    words = {"en": ["the", "king", "and", "queen", "of", "words"],
             "ja": ["日本語", "の", "文章", "です", "東京"]}
    for lang, vocab in words.items():
        n = 4000 if lang == "en" else 400
        lines = [" ".join(rng.choice(vocab, size=8)) for _ in range(n)]
        (tmp_path / f"{lang}.txt").write_text("\n".join(lines), encoding="utf-8")
    spec = f"en={tmp_path}/en.txt,ja={tmp_path}/ja.txt"
    tok, stats = multilingual.train_multilingual(spec, 0.3, 340, str(tmp_path / "m"))
    assert (tmp_path / "m.model").is_file() and tok.vocab_size == 340
    assert stats["ja"]["p"] == pytest.approx(
        stats["ja"]["bytes"] ** 0.3 / (stats["ja"]["bytes"] ** 0.3 + stats["en"]["bytes"] ** 0.3))
    assert stats["ja"]["drawn_bytes"] > stats["ja"]["bytes"]  # upsampled
    text = "東京の文章です the queen"
    assert tok.decode(tok.encode([text])[0]) == text
    rows = multilingual.fertility_of_files(tok, spec)
    assert rows["ja"]["tokens_per_char"] < 1  # learned multi-character pieces


def test_language_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="language 'de'"):
        multilingual.language_files(f"de={tmp_path}/none/*.txt")
    with pytest.raises(ValueError, match="must look like name=glob"):
        multilingual.language_files("just/a/glob.txt")


def test_build_records_sources_sizes_and_held_out_part(tmp_path, monkeypatch):
    def fake_fetch(package, cache, licences):
        licences.mkdir(parents=True, exist_ok=True)
        (licences / f"{package}.copyright").write_text("License: public-domain\n")
        return tmp_path, {"deb": f"{package}_1.0_all.deb"}

    monkeypatch.setattr(english, "fetch", fake_fetch)
    docs = [f"Dokument {i}." + " Wort" * 50 for i in range(200)]  # 261 to 263 bytes each
    chosen = {"de": (english.Source("fake_de", "fake-de", "public domain",
                                    lambda root: docs),)}
    manifest = multilingual.build(tmp_path / "out", tmp_path / "cache", chosen,
                                  max_bytes=100 * 263)
    entry = manifest["languages"]["de"]
    assert entry["sources"][0]["documents"] == 100  # capped at max_bytes
    assert entry["train_documents"] + entry["validation_documents"] == 100
    assert 0 < entry["validation_documents"] < 20
    held_out = [d for d in docs[:100] if english.held_out(d)]
    text = (tmp_path / "out/de/validation.txt").read_text(encoding="utf-8")
    assert text == "\n\n\n".join(held_out) + "\n"
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest
    readme = (tmp_path / "out/README.md").read_text()
    assert "| de | fake_de | fake-de_1.0_all.deb | 100 |" in readme


def test_fertility_and_bad_weight_commands(tmp_path):
    """As a user runs them: the table on stdout; bad input is one line on stderr."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "zh.txt").write_text("中文字\n\n\n日本", encoding="utf-8")

    def lmjax(*args):
        return subprocess.run([sys.executable, "-m", "lmjax", *args], cwd=root,
                              capture_output=True, text=True, timeout=300)

    out = lmjax("tokenizer", "fertility", "--tokenizer=shakespeare_bpe2048",
                f"--input=zh={tmp_path}/zh.txt")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| zh | 15 | 5 | 2 | 15 | 1.000 | 3.000 | 7.500 |" in out.stdout
    out = lmjax("train", "--config=configs/smoke.py", f"--workdir={tmp_path}/run",
                f"--config.data.mixture=zh={tmp_path}/zh.txt:-1")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "lmjax train: data.mixture source 'zh' has a negative weight (-1.0); weights must be "
        ">= 0.")
