"""Documents stored as records, one document per record in its `data.text_field`: JSON Lines
(`data.source='jsonl'`), Parquet (`'parquet'`), or a Hugging Face `datasets` folder as
`Dataset.save_to_disk` writes it (`'hf'`: Arrow IPC stream shards listed in state.json, read
with pyarrow; no hub, no `datasets` import).

They become the same token stream as `data.text` (sources.text_streams): documents in file
order, EOS after each, the last `eval_fraction` of documents held out. So the same documents give
the same rows, and the pipeline's shuffle, per-process split and {"step": k} resume apply as they
are. Unlike a text file, a record file is never read whole: Parquet is streamed in batches of
its row groups, JSONL line by line, Arrow shards batch by batch, and the tokens are written to a
file in the cache as they come and read back memory-mapped, so a 10 GB shard never sits in memory.
"""

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from lmjax import paths
from lmjax.data import sources
from lmjax.data.tokenizer import Tokenizer

SOURCES = ("jsonl", "parquet", "hf")  # the data.source values this module reads
_EXTENSION = {"jsonl": "jsonl", "parquet": "parquet"}
_CACHE_VERSION = b"lmjax-records-v1"  # bump when the stream format or document rules change
_CHUNK = 1024  # documents per tokenizer call: enough for its thread pool, little memory
_READ = 1 << 20  # bytes per read while hashing


def resolve(source: str, location: str) -> list[epath.Path]:
    """The files of `data.text` for a record source: a glob or folder of .jsonl/.parquet files
    (local or gs://), or the Arrow shards a save_to_disk folder lists in its state.json."""
    if source == "hf":
        return _hf_shards(paths.resolve(location))
    ext = _EXTENSION[source]
    pattern = location
    if paths.resolve(location).is_dir():
        pattern = f"{location.rstrip('/')}/**/*.{ext}"
    files = paths.glob(pattern)
    if not files:
        raise FileNotFoundError(f"data.text={location!r} matches no {source} file (give a glob or "
                                f"a folder of *.{ext} files, local or gs://).")
    return files


def _hf_shards(folder: epath.Path) -> list[epath.Path]:
    state = folder / "state.json"
    if not state.is_file():
        if (folder / "dataset_dict.json").is_file():
            raise FileNotFoundError(f"{folder} is a DatasetDict; set data.text to one split's "
                                    f"folder, such as {folder / 'train'}.")
        raise FileNotFoundError(f"data.text={os.fspath(folder)!r} is not a folder written by "
                                "datasets' save_to_disk (it has no state.json).")
    return [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]


def documents(source: str, files: Sequence[epath.Path], field: str) -> Iterator[str]:
    """Each record's text, in file order; records of only whitespace are skipped, as
    sources.split_documents skips empty documents."""
    read = {"jsonl": _jsonl, "parquet": _parquet, "hf": _arrow}[source]
    for path in files:
        for text in read(path, field):
            if text.strip():
                yield text


def _jsonl(path: epath.Path, field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e}).") from None
            if not isinstance(record, dict) or field not in record:
                has = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise KeyError(f"{path} line {number} has no field data.text_field={field!r} "
                               f"(it has {has}).")
            if not isinstance(record[field], str):
                raise ValueError(f"{path} line {number}: field {field!r} is of type "
                                f"{type(record[field]).__name__}, not a string.")
            yield record[field]


def _check_column(path: epath.Path, schema: pa.Schema, field: str) -> None:
    if field not in schema.names:
        raise KeyError(f"{path} has no column data.text_field={field!r} (it has {schema.names}).")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {field!r} holds {kind}, not strings.")


def _texts(path: epath.Path, column: pa.Array, field: str) -> list[str]:
    if column.null_count:
        raise ValueError(f"{path}: column {field!r} has {column.null_count} null values.")
    return column.to_pylist()


def _parquet(path: epath.Path, field: str) -> Iterator[str]:
    """Batches within row groups (iter_batches): memory is one batch, whatever the file size."""
    with path.open("rb") as f:
        parquet = pq.ParquetFile(f)
        _check_column(path, parquet.schema_arrow, field)
        for batch in parquet.iter_batches(batch_size=_CHUNK, columns=[field]):
            yield from _texts(path, batch.column(0), field)


def _arrow(path: epath.Path, field: str) -> Iterator[str]:
    """save_to_disk writes the Arrow IPC stream format (not the file format), batch by batch."""
    with path.open("rb") as f:
        reader = pa.ipc.open_stream(f)
        _check_column(path, reader.schema, field)
        for batch in reader:
            yield from _texts(path, batch.column(field), field)


def held_out(num_docs: int, eval_fraction: float) -> int:
    """Documents held out of `num_docs`, exactly as sources.train_eval_split holds them out."""
    if eval_fraction <= 0 or num_docs < 2:
        return 0
    return min(math.ceil(num_docs * eval_fraction), num_docs - 1)


def _key(files: Sequence[epath.Path], tokenizer: Tokenizer, source: str, field: str,
         eval_fraction: float) -> str:
    """Contents, not names or mtimes, as for text (sources.text_streams): read in pieces."""
    key = hashlib.sha256(_CACHE_VERSION)
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while piece := f.read(_READ):
                digest.update(piece)
        key.update(digest.digest())
    key.update(hashlib.sha256(tokenizer.serialized()).digest())
    key.update(repr((source, field, float(eval_fraction))).encode())
    return key.hexdigest()[:24]


def _load(train: str, held: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.memmap(train, np.int32, "r") if os.path.getsize(train) else np.zeros(0, np.int32)
    return tokens, np.load(held, mmap_mode="r")


def record_streams(source: str, files: Sequence[epath.Path], field: str, tokenizer: Tokenizer,
                   eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) token streams of record files, memory-mapped from the cache.

    Tokens go to a file as each chunk of documents is encoded; the held-out tail is cut off at
    the end, once the number of documents is known. A single document is split by characters,
    as sources.train_eval_split does. Files are written under temporary names and moved into
    place, eval first, so a reader that finds the train file finds both whole.
    """
    base = sources.cache_dir() / f"records-{_key(files, tokenizer, source, field, eval_fraction)}"
    train_path, eval_path = f"{base}.train.bin", f"{base}.eval.npy"
    if os.path.isfile(train_path):
        return _load(train_path, eval_path)

    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{base}.{os.getpid()}.tmp"
    docs = documents(source, files, field)
    chunks = iter(lambda: list(itertools.islice(docs, _CHUNK)), [])
    ends, total, forced = [], 0, None  # token offset after each document
    try:
        with open(tmp, "wb") as out:
            for i, chunk in enumerate(chunks):
                if i == 0 and len(chunk) == 1 and eval_fraction > 0:  # the corpus is one document
                    train, evals = sources.train_eval_split(chunk, eval_fraction)
                    chunk, forced = train + evals, 1
                for ids in tokenizer.encode(chunk):
                    piece = np.asarray([*ids, tokenizer.eos_id], np.int32)
                    out.write(piece.tobytes())
                    total += len(piece)
                    ends.append(total)
    except BaseException:  # a bad record: no half-written file left in the cache
        os.remove(tmp)
        raise
    n_eval = held_out(len(ends), eval_fraction) if forced is None else forced
    cut = ends[len(ends) - n_eval - 1] if len(ends) > n_eval else 0
    np.save(f"{tmp}.npy", np.fromfile(tmp, np.int32, offset=4 * cut))
    os.truncate(tmp, 4 * cut)
    os.replace(f"{tmp}.npy", eval_path)
    os.replace(tmp, train_path)
    return _load(train_path, eval_path)


def write(source: str, docs: Sequence[str], folder: epath.Path) -> str:
    """Write `docs` as `source` records in the local `folder` (for `lmjax data bench` and
    conversions); returns the data.text that reads them back."""
    table = pa.table({"text": list(docs)})
    if source == "jsonl":
        lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
        (folder / "docs.jsonl").write_text(lines)
        return os.fspath(folder / "docs.jsonl")
    if source == "parquet":
        pq.write_table(table, os.fspath(folder / "docs.parquet"), row_group_size=_CHUNK)
        return os.fspath(folder / "docs.parquet")
    shard = "data-00000-of-00001.arrow"  # the layout of datasets' Dataset.save_to_disk
    (folder / "hf").mkdir(parents=True, exist_ok=True)
    with pa.OSFile(os.fspath(folder / "hf" / shard), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=_CHUNK)
    features = {"text": {"dtype": "string", "_type": "Value"}}
    (folder / "hf" / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "hf" / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": shard}], "_fingerprint": "lmjax", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}))
    return os.fspath(folder / "hf")
