"""The rows of interop/hf.py's and hf_moe.py's tables: one lmjax parameter <-> one Hugging Face
tensor, with a function each way, so import and export cannot drift apart."""

import dataclasses
import math
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    """One lmjax parameter <-> (part of) one Hugging Face tensor."""

    path: tuple  # key path in nnx.to_pure_dict(nnx.state(model))
    hf: str  # tensor name in the safetensors file
    to_lmjax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]  # parts sharing a name are concatenated (c_attn)


def same(path: tuple, hf: str) -> Rule:
    return Rule(path, hf, lambda w: w, lambda w: w)


def torch_linear(path: tuple, hf: str, shape: tuple, n_in: int = 1) -> Rule:
    """nn.Linear [out, in] <-> a kernel of `shape` whose first n_in axes are inputs."""
    return Rule(path, hf, lambda w: w.T.reshape(shape),
                lambda k: k.reshape(math.prod(shape[:n_in]), -1).T)


def conv1d(path: tuple, hf: str, shape: tuple, n_in: int = 1) -> Rule:
    """GPT-2 Conv1D [in, out] <-> a kernel of `shape` whose first n_in axes are inputs."""
    return Rule(path, hf, lambda w: w.reshape(shape),
                lambda k: k.reshape(math.prod(shape[:n_in]), -1))
