"""Corpus builders (lmjax/corpora/english.py) on small fixtures (no apt): each format's
extractor, the held-out rule, and a whole build with its manifest and TFDS dataset."""

import json
import struct
import zlib

from lmjax.corpora import english
from lmjax.data import sources


def test_sword_module_blocks_become_documents(tmp_path):
    blocks = [b'<title type="main">Genesis</title><verse osisID="Gen.1.1">In the beginning'
              b' <w lemma="strong:H0430">God</w> created.</verse>', b"",
              b'<div type="x-p" sID="p1"/>Second &amp; last<note type="x">Gen 1:1</note>.']
    index, data = b"", b""
    for block in blocks:
        packed = zlib.compress(block) if block else b""
        index += struct.pack("<III", len(data), len(packed), len(block))
        data += packed
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(data)
    assert english.sword_documents(tmp_path) == ["Genesis\n\nIn the beginning God created.",
                                                 "Second & last."]


def test_html_keeps_the_main_body_only():
    page = ('<html><body><div class="related">Navigation index</div>'
            '<div class="body" role="main"><h1>json \u2014 JSON<a>\u00b6</a></h1>'
            '<p>Encode <code>obj</code>.</p><div><p>Nested</p></div><script>x=1</script></div>'
            '<div class="footer">\u00a9 Copyright</div></body></html>')
    assert english.html_text(page) == "json \u2014 JSON\n\nEncode obj.\n\nNested"


def test_pod_directives_and_codes():
    pod = ("=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >>\n\n=over 4\n\n=item *\n\n"
           "See L<perlsyn|perlsyn/Loops> or E<lt>thisE<gt>.\n\n=cut\n")
    want = "NAME\n\nperlfoo - bold and $x->y\n\n*\n\nSee perlsyn or <this>."
    assert english.pod_text(pod) == want


def test_roff_macros_and_escapes():
    roff = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.SH SYNOPSIS\n.B ls\n'
            '.RI [ OPTION ]\n.PP\n\\fBbold\\fR and \\(lqquoted\\(rq\n')
    assert english.roff_text(roff) == ("NAME\n\nls - list\n\nSYNOPSIS\n\nls\n[OPTION]\n\n"
                                       "bold and \u201cquoted\u201d")


def test_fortunes_split_on_percent_lines():
    assert english.fortune_documents("One.\n%\nTwo\n  lines.\n%\n") == ["One.", "Two\nlines."]


def test_held_out_is_a_stable_five_percent():
    docs = [f"document number {i}" for i in range(4000)]
    held = [d for d in docs if english.held_out(d)]
    assert 150 < len(held) < 250  # 5% +- 1.25%
    assert held == [d for d in docs if english.held_out(d)]


def test_build_writes_text_manifest_readme_and_tfds(tmp_path):
    docs = [f"Doc {i}: " + "words " * (i % 7 + 1) for i in range(200)]
    fake = english.Source("fake", "", "public domain", lambda root: docs)
    manifest = english.build(tmp_path / "out", tmp_path / "cache", (fake,), tfds_name="fake_en")
    out = tmp_path / "out"
    train, held = ([d.strip() for d in sources.split_documents((out / f).read_text("utf-8"))]
                   for f in ("train.txt", "validation.txt"))
    assert sorted(train + held) == sorted(d.strip() for d in docs) and held
    assert all(english.held_out(d) for d in held) and not any(english.held_out(d) for d in train)
    assert manifest["sources"] == [{"name": "fake", "package": "", "licence": "public domain",
                                    "documents": 200, "bytes": sum(len(d.strip()) for d in docs)}]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "| fake |" in (out / "README.md").read_text()
    ds = sources.tfds_source("fake_en", str(out / "tfds"), "validation", "text")
    assert sorted(x["text"].decode() for x in ds) == sorted(held)
