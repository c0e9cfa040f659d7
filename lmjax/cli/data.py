"""`lmjax data build | corpus | multilingual | bench`: a TFDS dataset from text files, the offline
corpora (lmjax/corpora), and whether the input pipeline is ever the bottleneck.

`data bench` answers that with rates on the same text, all on one pinned CPU core: raw
SentencePiece encoding (the floor any pipeline pays), the TFDS pipeline (read, tokenize, pack,
batch; the path a large corpus takes), each tokenize-up-front source (text, jsonl, parquet, hf:
preparing the cache once, then serving batches), and what the bench model's train step consumes.
"""

import os
import tempfile
import time

import sentencepiece as spm
from absl import flags
from etils import epath

from lmjax.cli import common
from lmjax.corpora import english, multilingual
from lmjax.data import records, sources
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer

flags.DEFINE_string("input", None, "build, bench: text files (a glob or a directory)")
flags.DEFINE_string("name", None, "build: TFDS dataset name (snake_case)")
flags.DEFINE_string("data_dir", None, "build: TFDS data_dir to write into")
flags.DEFINE_enum("per", "file", ["file", "paragraph"], "build: one document per file or "
                  "per blank-line-separated paragraph")
flags.DEFINE_float("eval_fraction", 0.05, "build: last fraction of documents held out")
flags.DEFINE_string("out", "", "corpus, multilingual: folder to build the corpus in")
flags.DEFINE_string("cache", "~/.cache/lmjax/corpus", "corpus, multilingual: downloaded "
                    ".debs, unpacked")
flags.DEFINE_string("tokenizer", None, "bench: SentencePiece .model to encode with")
flags.DEFINE_integer("steps", 10, "bench: timed steps of the bench model (0 = skip)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    sub = args[0] if args else ""
    if sub == "build":
        common.need("input", "name", "data_dir")
        counts = sources.build_tfds(FLAGS.input, FLAGS.name, FLAGS.data_dir,
                                    FLAGS.eval_fraction, FLAGS.per)
        print(f"TFDS dataset {FLAGS.name!r} in {FLAGS.data_dir}: {counts}")
    elif sub == "corpus":
        common.need("out")
        manifest = english.build(FLAGS.out, FLAGS.cache)
        print(os.path.join(os.path.expanduser(FLAGS.out), "README.md") + "\n"
              + english.readme(manifest))
    elif sub == "multilingual":
        common.need("out")
        print(multilingual.readme(multilingual.build(FLAGS.out, FLAGS.cache)))
    elif sub == "bench":
        common.need("input", "tokenizer")
        print(table(bench(FLAGS.input, FLAGS.tokenizer, FLAGS.steps)))
    else:
        raise ValueError(f"the subcommand is build, corpus, multilingual or bench (got {sub!r}).")


def bench(pattern: str, tokenizer: str, step_steps: int = 10, max_docs: int = 2000) -> dict:
    """Tokens/s of raw SentencePiece, of the TFDS pipeline, and of the bench model's train step.

    Everything runs pinned to one core (the pipeline with one read thread and no workers).
    The pipeline is timed over one pass of the documents after two warm-up batches.
    """
    from lmjax import bench as train_bench
    from lmjax import config
    from lmjax.data import pipeline

    tok = Tokenizer.load(resolve_tokenizer(tokenizer))
    paths = sources.resolve_text(pattern)
    docs = [d for text in sources.read_documents(paths, "file")
            for d in sources.split_documents(text)][:max_docs]
    # The step first, on all cores (as training runs it); then the data side on one core.
    step = train_bench.run("bench", 1, step_steps)["tokens_per_s"] if step_steps else None
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    sp = spm.SentencePieceProcessor(model_proto=tok.serialized())
    start = time.perf_counter()
    num_tokens = sum(len(ids) + 1 for ids in sp.encode(docs, out_type=int, num_threads=1))
    raw = num_tokens / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        sources.write_tfds("bench_docs", tmp, {"train": docs})
        cfg = config.load(os.path.join(config.configs_dir(), "bench.py"), [
            "data.source=tfds", "data.tfds_name=bench_docs", f"data.tfds_data_dir={tmp}",
            f"data.tokenizer={resolve_tokenizer(tokenizer)}", "data.eval_split=",
            "data.segment_mask=True", "data.read_threads=1", "data.worker_count=0",
            f"model.vocab_size={max(8192, tok.vocab_size)}"])
        train = pipeline.build(cfg).train
        tokens_per_batch = cfg.data.global_batch_size * cfg.data.seq_len
        next(train), next(train)
        batches = max(1, num_tokens // tokens_per_batch)
        start = time.perf_counter()
        for _ in range(batches):
            next(train)
        piped = batches * tokens_per_batch / (time.perf_counter() - start)
        per_source = {source: _source_rates(cfg, source, docs, tmp, num_tokens, batches)
                      for source in ("text", *records.SOURCES)}
    os.sched_setaffinity(0, cores)
    return {"documents": len(docs), "tokens": num_tokens, "seq_len": cfg.data.seq_len,
            "batch": cfg.data.global_batch_size, "raw_sentencepiece_tokens_per_s": raw,
            "pipeline_tokens_per_s": piped, "train_step_tokens_per_s": step,
            "sources": per_source}


def _source_rates(cfg, source: str, docs: list[str], tmp: str, num_tokens: int,
                  batches: int) -> dict:
    """(prepare, serve) tokens/s of a source that tokenizes up front: reading and tokenizing
    the whole corpus into an empty cache (paid once per corpus), then handing out batches."""
    from lmjax.data import pipeline

    folder = epath.Path(tmp) / source
    folder.mkdir()
    if source == "text":
        (folder / "docs.txt").write_text("\n\n\n".join(doc.strip() for doc in docs))
        location = os.fspath(folder / "docs.txt")
    else:
        location = records.write(source, docs, folder)
    cfg = cfg.copy_and_resolve_references()
    cfg.data.update(source=source, text=location, eval_fraction=0.0, segment_mask=False)
    cached = os.environ.get("LMJAX_CACHE", "")
    os.environ["LMJAX_CACHE"] = os.fspath(folder / "cache")  # empty: preparing is really timed
    try:
        start = time.perf_counter()
        train = pipeline.build(cfg).train
        prepare = num_tokens / (time.perf_counter() - start)
    finally:
        os.environ["LMJAX_CACHE"] = cached  # '' means the default, as unset does
    start = time.perf_counter()
    for _ in range(batches):
        next(train)
    tokens = batches * cfg.data.global_batch_size * cfg.data.seq_len
    return {"prepare_tokens_per_s": prepare,
            "serve_tokens_per_s": tokens / (time.perf_counter() - start)}


def table(r: dict) -> str:
    rows = [("documents / tokens", f"{r['documents']:,} / {r['tokens']:,}"),
            ("shapes", f"batch {r['batch']} x seq {r['seq_len']}"),
            ("raw sentencepiece (1 core)", f"{r['raw_sentencepiece_tokens_per_s']:,.0f} tok/s"),
            ("pipeline (1 core)", f"{r['pipeline_tokens_per_s']:,.0f} tok/s  "
             f"({r['pipeline_tokens_per_s'] / r['raw_sentencepiece_tokens_per_s']:.2f}x raw)")]
    if r["train_step_tokens_per_s"]:
        ratio = r["pipeline_tokens_per_s"] / r["train_step_tokens_per_s"]
        rows.append(("train step (bench model)",
                     f"{r['train_step_tokens_per_s']:,.0f} tok/s  (pipeline is {ratio:.0f}x)"))
    for source, rates in r.get("sources", {}).items():
        serve = rates["serve_tokens_per_s"]
        need = (f"  ({serve / r['train_step_tokens_per_s']:.0f}x the step)"
                if r["train_step_tokens_per_s"] else "")
        rows.append((f"{source} (1 core)", f"prepare {rates['prepare_tokens_per_s']:,.0f} tok/s "
                     f"once, serve {serve:,.0f} tok/s{need}"))
    return "\n".join(f"{k:<28} {v}" for k, v in rows)
