"""`lmjax tokenizer train | fertility`: a SentencePiece vocabulary from text files (one language,
or several sampled with temperature), and tokens per byte, character and word per language."""

from absl import flags

from lmjax.cli import common
from lmjax.corpora import multilingual
from lmjax.data import sources
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer, train_tokenizer

flags.DEFINE_string("input", None, "text files (a glob or a directory), or lang=GLOB,...")
flags.DEFINE_string("out", "", "train: prefix of the .model and .vocab files written")
flags.DEFINE_integer("vocab_size", 8192, "train: vocabulary size")
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "train: SentencePiece model")
flags.DEFINE_float("language_alpha", 0.3, "train with --input=lang=GLOB,...: sample "
                   "language i with probability proportional to its lines^alpha (mT5, XLM-R)")
flags.DEFINE_string("tokenizer", None, "fertility: SentencePiece .model (or shipped name)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    sub = args[0] if args else ""
    if sub == "train" and "=" in (FLAGS.input or ""):
        common.need("out")  # lang=GLOB,...: temperature sampling over languages
        tok, stats = multilingual.train_multilingual(FLAGS.input, FLAGS.language_alpha,
                                                     FLAGS.vocab_size, FLAGS.out, FLAGS.model_type)
        for lang, s in stats.items():
            print(f"{lang:<8} {s['bytes']:>11,} bytes  p={s['p']:.3f}  sampled "
                  f"{s['drawn_bytes']:>11,} bytes in {s['lines']:,} lines")
        print(f"{FLAGS.out}.model: {FLAGS.model_type}, vocab {tok.vocab_size}, "
              f"alpha {FLAGS.language_alpha}")
    elif sub == "train":
        common.need("input", "out")
        paths = sources.resolve_text(FLAGS.input)
        for path in paths:  # one clear sentence for empty or non-UTF-8 files, before training
            sources.read_documents([path], "file")
        tok = train_tokenizer(paths, FLAGS.vocab_size, FLAGS.out, FLAGS.model_type)
        print(f"{FLAGS.out}.model: {FLAGS.model_type}, vocab {tok.vocab_size}, "
              f"trained on {len(paths)} file(s)")
    elif sub == "fertility":
        common.need("input", "tokenizer")
        tok = Tokenizer.load(resolve_tokenizer(FLAGS.tokenizer))
        print(multilingual.fertility_table(multilingual.fertility_of_files(tok, FLAGS.input)))
    else:
        raise ValueError(f"the subcommand is train or fertility (got {sub!r}).")
