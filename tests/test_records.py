"""Record sources (lmjax/data/records.py): JSONL, Parquet and a datasets save_to_disk folder give
the rows the same documents give as text, resume exactly, and name a bad input in one sentence."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from configs import base
from lmjax.data import pipeline, records, sources
from lmjax.data.tokenizer import TEXT_DIR

L, B, STEPS = 32, 8, 4


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(records, "_CHUNK", 64)  # several tokenizer chunks and Parquet batches
        yield


def make_cfg(source, text, **data):
    cfg = base.get_config()
    cfg.data.update(source=source, text=text, seq_len=L, global_batch_size=B, eval_fraction=0.1,
                    **data)
    cfg.train.eval_batches = 2
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in x)


def write_hf(folder, table, shards=2):
    """The layout Dataset.save_to_disk writes: Arrow IPC *stream* shards named
    data-0000i-of-0000n.arrow, dataset_info.json (features) and state.json (the shard list)."""
    folder.mkdir()
    names, size = [], -(-len(table) // shards)
    for i in range(shards):
        names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * size, size), max_chunksize=50)
    features = {"id": {"dtype": "int64", "_type": "Value"},
                "text": {"dtype": "string", "_type": "Value"}}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": None}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same ~300 documents as a text file, two JSONL files, a Parquet file of several row
    groups and an HF folder of two shards; {source: data.text}."""
    text = (TEXT_DIR / "shakespeare.txt").read_text()[:30000]
    docs = [p.strip() for p in sources.PARAGRAPH.split(text) if p.strip()]
    root = tmp_path_factory.mktemp("corpus")
    (root / "all.txt").write_text("\n\n\n".join(docs))
    half = len(docs) // 2
    for i, part in enumerate([docs[:half], docs[half:]]):
        lines = [json.dumps({"id": j, "text": d}) for j, d in enumerate(part)]
        (root / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, root / "all.parquet", row_group_size=40)
    assert pq.ParquetFile(root / "all.parquet").num_row_groups > 3
    write_hf(root / "hf", table)
    return {"text": str(root / "all.txt"), "jsonl": str(root / "*.jsonl"),
            "parquet": str(root / "all.parquet"), "hf": str(root / "hf"), "docs": docs}


@pytest.fixture(scope="module")
def expected(corpus):
    data = pipeline.build(make_cfg("text", corpus["text"]))
    return take(data.train, STEPS), data.eval_batches


@pytest.mark.parametrize("source", records.SOURCES)
def test_same_rows_as_text(corpus, expected, source):
    data = pipeline.build(make_cfg(source, corpus[source]))
    assert same(take(data.train, STEPS), expected[0])
    assert len(data.eval_batches) == 2 and same(data.eval_batches, expected[1])


def test_resume_and_process_split(corpus):
    """Resume from a saved state mid-stream; two processes each read half of a global batch."""
    cfg = make_cfg("jsonl", corpus["jsonl"])
    it = pipeline.build(cfg).train
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    following = take(it, 2)
    resumed = pipeline.build(cfg).train
    resumed.set_state(state)
    assert same(take(resumed, 2), following)

    halves = [pipeline.build(cfg, p, 2).train for p in (0, 1)]
    whole = next(pipeline.build(cfg).train)
    parts = [next(h) for h in halves]
    assert all(np.array_equal(np.concatenate([p[k] for p in parts]), whole[k]) for k in whole)


def test_one_document_splits_by_characters(tmp_path):
    """A corpus of one record holds out its tail, as data.text does with one document."""
    doc = (TEXT_DIR / "shakespeare.txt").read_text()[:8000].replace("\n\n", "\n")
    (tmp_path / "one.txt").write_text(doc)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    text = pipeline.build(make_cfg("text", str(tmp_path / "one.txt")))
    jsonl = pipeline.build(make_cfg("jsonl", str(tmp_path / "one.jsonl")))
    assert same(take(jsonl.train, 2), take(text.train, 2))
    assert same(jsonl.eval_batches, text.eval_batches)


def bad(tmp_path, name, content):
    if name.endswith(".parquet"):
        pq.write_table(pa.table(content), tmp_path / name)
    else:
        (tmp_path / name).write_text(content)
    return str(tmp_path / name)


@pytest.mark.parametrize("source,name,content,error,match", [
    ("jsonl", "a.jsonl", '{"content": "x"}\n', KeyError, r"line 1 has no field "
     r"data.text_field='text' \(it has \['content'\]\)"),
    ("jsonl", "a.jsonl", '{"text": "x"}\n{"text": 3}\n', ValueError,
     r"line 2: field 'text' is of type int, not a string"),
    ("jsonl", "a.jsonl", '{"text": "x"}\nnot json\n', ValueError, r"line 2 is not JSON"),
    ("parquet", "a.parquet", {"content": ["x"]}, KeyError, r"has no column data.text_field"),
    ("parquet", "a.parquet", {"text": [1, 2]}, ValueError, r"column 'text' holds int64, not "
     r"strings"),
    ("jsonl", "*.jsonl", None, FileNotFoundError, r"matches no jsonl file"),
    ("hf", "", None, FileNotFoundError, r"is not a folder written by datasets' save_to_disk"),
])
def test_bad_input_is_one_sentence(tmp_path, source, name, content, error, match):
    text = bad(tmp_path, name, content) if content is not None else str(tmp_path / name)
    with pytest.raises(error, match=match) as e:
        pipeline.build(make_cfg(source, text))
    message = e.value.args[0]
    assert "\n" not in message and message.endswith(".")
    assert not list(sources.cache_dir().glob("*.tmp"))  # no half-written stream left behind


def test_missing_text_field_setting():
    cfg = make_cfg("parquet", "x.parquet", text_field="")
    with pytest.raises(ValueError, match="needs data.text_field"):
        pipeline.validate(cfg)


@pytest.mark.parametrize("source,files", [("jsonl", "*.jsonl"), ("parquet", "all.parquet"),
                                          ("hf", "hf/*")])
def test_records_in_a_bucket(bucket, corpus, expected, source, files, tmp_path, monkeypatch):
    """The same files on the test's GCS server (gs://) give the rows they give locally, read
    and tokenized from there (an empty cache: the cache is keyed by content)."""
    monkeypatch.setenv("LMJAX_CACHE", str(tmp_path))
    local = epath.Path(corpus["text"]).parent
    folder = epath.Path(bucket) / source
    for path in local.glob(files):
        target = folder / path.relative_to(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    remote = corpus[source].replace(str(local), str(folder))
    data = pipeline.build(make_cfg(source, remote))
    assert same(take(data.train, STEPS), expected[0])


def test_data_bench_times_every_source(corpus, tmp_path):
    """`lmjax data bench`'s per-source rows, without its slow train-step and TFDS parts."""
    from lmjax.cli import data as data_cli

    cfg = make_cfg("text", corpus["text"])
    r = {"documents": 1, "tokens": 1, "seq_len": L, "batch": B,
         "raw_sentencepiece_tokens_per_s": 1.0, "pipeline_tokens_per_s": 1.0,
         "train_step_tokens_per_s": 1.0,
         "sources": {s: data_cli._source_rates(cfg, s, corpus["docs"], str(tmp_path), 10_000, 3)
                     for s in ("text", *records.SOURCES)}}
    assert all(v > 0 for rates in r["sources"].values() for v in rates.values())
    assert sum("tok/s once, serve" in line for line in data_cli.table(r).splitlines()) == 4
    assert sources.cache_dir() != tmp_path / "text" / "cache"  # the bench restores the cache
