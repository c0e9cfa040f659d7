"""A Hugging Face directory's files (config.json, *.safetensors, tokenizer.model), local or
gs://, each read and written whole through lmjax/paths.py: an object store has no memory map
and no partial write. Every way a file can be unreadable is named in one sentence here, before
interop/hf.py maps a single tensor."""

import json

import numpy as np
import safetensors.numpy
from etils import epath
from safetensors import SafetensorError

from lmjax import paths


def read_config(path: paths.PathLike) -> dict:
    """The checkpoint's config.json, or a FileNotFoundError saying what is missing."""
    folder = paths.resolve(path)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {str(path)!r} does not exist.")
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint: it has no config.json.")
    try:
        hf = json.loads(config_path.read_bytes())
    except UnicodeDecodeError:
        raise ValueError(f"{config_path} is not valid JSON (it is not UTF-8 text).") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path} holds a JSON {type(hf).__name__}, not an object of "
                         "model settings.")
    return hf


def read_tensors(path: paths.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the directory's *.safetensors files (sharded checkpoints too)."""
    files = sorted(paths.resolve(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path} is not a Hugging Face safetensors checkpoint: it has no *.safetensors file "
            "(lmjax never unpickles pytorch_model.bin; re-save it with safe_serialization).")
    tensors = {}
    for file in files:
        tensors.update(load_safetensors(file))
    return tensors


def load_safetensors(file: epath.Path) -> dict[str, np.ndarray]:
    """One file's tensors. The sizes are checked first, so that a truncated or foreign file is
    named with what it holds rather than with safetensors' 'header too large'."""
    data = file.read_bytes()
    header_end = 8 + (int.from_bytes(data[:8], "little") if len(data) >= 8 else 0)
    if header_end > len(data):
        raise ValueError(f"{file} is truncated or not a safetensors file: its header claims "
                         f"{header_end} bytes, the file holds {len(data)}.")
    try:
        header = json.loads(data[8:header_end])
        end = header_end + max((t["data_offsets"][1] for k, t in header.items()
                                if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ValueError(f"{file} is not a safetensors file: its header is not a table of "
                         "tensors.") from None
    if end > len(data):
        raise ValueError(f"{file} is truncated: its header claims {end} bytes, the file holds "
                         f"{len(data)}.")
    try:
        return safetensors.numpy.load(data)
    except SafetensorError as e:  # a dtype, shape or offset that does not add up
        raise ValueError(f"{file} is not a valid safetensors file ({e}).") from None


def write(out: paths.PathLike, config: dict, tensors: dict[str, np.ndarray],
          tokenizer: bytes | None = None) -> None:
    """config.json, model.safetensors and (if given) tokenizer.model into `out`."""
    out = paths.resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(
        safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        (out / "tokenizer.model").write_bytes(tokenizer)
