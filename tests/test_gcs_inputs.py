"""Every input of a run read from gs:// as from a local copy, on the GCS API server of
tests/gcs.py: a config file, a workdir's config.json, data.text (a folder and a glob),
data.tokenizer, mixture sources, a TFDS dataset, `lmjax eval --text` and the compilation cache
folder. Nothing may land in a local folder named `gs:`."""

import os

import jax
import numpy as np
import pytest
from etils import epath

from configs import base
from lmjax import config, evaluate, paths, profiler
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import TEXT_DIR, Tokenizer, resolve_tokenizer
from tests.test_gcs import assert_no_local_gs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def inputs(bucket, tmp_path):
    """(local folder, its copy in the bucket): configs/llama.py, a text folder of two files
    (one in a subfolder) cut from the shipped corpus, and the shipped tokenizer model."""
    local = tmp_path / "inputs"
    (local / "text" / "sub").mkdir(parents=True)
    corpus = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")
    (local / "text" / "a.txt").write_text(corpus[:30_000], encoding="utf-8")
    (local / "text" / "sub" / "b.txt").write_text(corpus[30_000:60_000], encoding="utf-8")
    (local / "llama.py").write_bytes(open(os.path.join(ROOT, "configs", "llama.py"), "rb").read())
    (local / "sp.model").write_bytes((TEXT_DIR / "shakespeare_bpe2048.model").read_bytes())
    paths.upload_tree(local, epath.Path(bucket))
    return local, bucket


def smoke_data(text, tokenizer, **data):
    cfg = base.get_config()
    cfg.data.update(seq_len=32, global_batch_size=8, text=text, tokenizer=tokenizer, **data)
    cfg.train.eval_batches = 2
    return cfg


def first_batches(cfg, n=2):
    data = pipeline.build(cfg)
    return [next(data.train) for _ in range(n)] + data.eval_batches


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_config_file_and_config_json_on_a_bucket(inputs):
    local, remote = inputs
    cfg = config.load(f"{remote}/llama.py:tiny", ["model.d_model=64"])  # ':' after gs:// too
    assert cfg.to_dict() == config.load(f"{local}/llama.py:tiny", ["model.d_model=64"]).to_dict()
    assert cfg.model.num_kv_heads == 2
    with pytest.raises(ValueError, match="is a folder"):
        config.load(remote)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load(f"{remote}/missing.py")

    config.save(cfg, f"{remote}/run/config.json")  # a workdir's config.json, read back
    assert config.from_workdir(f"{remote}/run").to_dict() == cfg.to_dict()
    (epath.Path(remote) / "run" / "config.json").write_text('{"model": {"d_model": ')
    with pytest.raises(ValueError, match=f"{remote}/run/config.json is not valid JSON"):
        config.from_workdir(f"{remote}/run")
    assert_no_local_gs()


def test_text_folder_glob_tokenizer_and_mixture_on_a_bucket(inputs, tmp_path, monkeypatch):
    """The same token rows as from the local copies; the tokenized-data cache, keyed by
    contents, serves the bucket's files from the local files' entry."""
    local, remote = inputs
    monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "cache"))
    assert [str(p) for p in sources.resolve_text(f"{remote}/text")] == [
        f"{remote}/text/a.txt", f"{remote}/text/sub/b.txt"]
    assert [str(p) for p in sources.resolve_text(f"{remote}/text/*.txt")] == [
        f"{remote}/text/a.txt"]
    assert [str(p) for p in sources.resolve_text(f"{remote}/**/b.txt")] == [
        f"{remote}/text/sub/b.txt"]
    assert resolve_tokenizer(f"{remote}/sp.model") == f"{remote}/sp.model"
    tokenizer = Tokenizer.load(f"{remote}/sp.model")
    assert tokenizer.serialized() == (local / "sp.model").read_bytes()

    expected = first_batches(smoke_data(str(local / "text"), str(local / "sp.model")))
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert_same_batches(first_batches(smoke_data(f"{remote}/text", f"{remote}/sp.model")),
                        expected)
    assert sorted(os.listdir(tmp_path / "cache")) == cached  # read from the cache, not redone

    spec = "a={root}/text/a.txt:1,b={root}/text/sub:2"
    mixed = [smoke_data("", str(local / "sp.model"), mixture=spec.format(root=root))
             for root in (local, remote)]
    assert_same_batches(first_batches(mixed[1]), first_batches(mixed[0]))
    with pytest.raises(FileNotFoundError, match="data.text"):
        sources.resolve_text(f"{remote}/text/*.md")
    assert_no_local_gs()


def test_tfds_data_dir_on_a_bucket(bucket, tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"Document {i}: " + "words " * (5 + i))
    sources.build_tfds(str(tmp_path / "*.txt"), "tiny_docs", str(tmp_path / "tfds"), 0.3)
    paths.upload_tree(tmp_path / "tfds", epath.Path(bucket) / "tfds")
    texts = [[x["text"] for x in sources.tfds_source("tiny_docs", root, "train", "text")]
             for root in (str(tmp_path / "tfds"), f"{bucket}/tfds")]
    assert texts[1] == texts[0] and len(texts[0]) == 4
    with pytest.raises(FileNotFoundError, match=f"'other' is not a prepared TFDS dataset under "
                                                f"{bucket}/tfds"):
        sources.tfds_source("other", f"{bucket}/tfds", "train", "text")
    assert_no_local_gs()


def test_eval_text_on_a_bucket(smoke_workdir, inputs):
    local, remote = inputs
    on_disk = evaluate.evaluate(smoke_workdir, text=str(local / "text"), batches=1)
    assert evaluate.evaluate(smoke_workdir, text=f"{remote}/text", batches=1) == on_disk


@pytest.fixture
def restored_compilation_cache():
    """This process's compilation cache settings, put back after the test (JAX opens its cache
    once per process: reset it so that the next compile opens the restored folder)."""
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_compilation_cache_on_a_bucket(bucket, restored_compilation_cache):
    """A gs:// folder goes to JAX as it is (no ~ expansion, no local mkdir), and JAX writes the
    compiled program there."""
    cfg = base.get_config()
    cfg.train.compilation_cache_dir = f"{bucket}/xla"
    assert profiler.compilation_cache_dir(cfg) == f"{bucket}/xla"
    profiler.use_compilation_cache(cfg)
    assert jax.config.jax_compilation_cache_dir == f"{bucket}/xla"
    jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)).block_until_ready()
    assert any(p.name.endswith("-cache") for p in (epath.Path(bucket) / "xla").iterdir())
    assert_no_local_gs()
