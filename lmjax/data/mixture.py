"""Several named text sources in one training stream, each drawn with its own weight.

    --config.data.mixture='de=corpus/de/train.txt:1,ja=corpus/ja/train.txt:0.5,en=shakespeare:1'

Each source is tokenized and cut into rows as `data.text` is (its own held-out tail, its own
token cache), shuffled with the run's seed and repeated; grain's `MapDataset.mix` then
interleaves the sources deterministically in the given proportions. The mixture stays a
random-access MapDataset, so the k-th global batch is still a pure function of (seed, k) and
resume stays exact with the step number as the whole iterator state. A weight of 0 keeps a
source out of training but in per-source evaluation (`lmjax eval`).

Temperature sampling (mT5, XLM-R): with n_i the size of language i, sample it with probability
p_i = n_i^alpha / sum_j n_j^alpha. alpha = 1 follows the sizes, alpha = 0 is uniform; 0.3 lifts
small languages without drowning the large ones.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence

import grain
import numpy as np

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # reported as eval/<name>/...; a language code or any identifier
    pattern: str  # a shipped text name, a glob or a folder, local or gs:// (as data.text)
    weight: float  # relative share of training rows; 0 = evaluated only


def parse(spec: str, what: str = "data.mixture", weighted: bool = True) -> list[Source]:
    """`name=glob:weight,...` (or `name=glob,...` when not `weighted`) -> sources, checked.

    The weight is after the last ':' so that globs may hold ':' too (not ','). Weights must be
    finite and >= 0 and not all 0; names must be unique identifiers."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        name, sep, rest = item.partition("=")
        if not sep or not _NAME.fullmatch(name) or not rest:
            form = "name=glob:weight" if weighted else "name=glob"
            raise ValueError(f"{what} entry {item!r} must look like {form} (entries are "
                             "separated by ',').")
        pattern, weight = rest, 1.0
        if weighted:
            pattern, colon, text = rest.rpartition(":")
            try:
                weight = float(text) if colon and pattern else float("nan")
            except ValueError:
                weight = float("nan")
            if not np.isfinite(weight):
                raise ValueError(f"{what} entry {item!r} has no numeric weight after its last "
                                 "':' (name=glob:weight).")
            if weight < 0:
                raise ValueError(f"{what} source {name!r} has a negative weight ({weight}); "
                                 "weights must be >= 0.")
        if name in {s.name for s in out}:
            raise ValueError(f"{what} names source {name!r} twice.")
        out.append(Source(name, pattern, weight))
    if weighted and not any(s.weight > 0 for s in out):
        raise ValueError(f"{what} gives every source weight 0; at least one must be positive.")
    return out


def temperature_probs(sizes: Mapping[str, float], alpha: float) -> dict[str, float]:
    """p_i = n_i^alpha / sum_j n_j^alpha over sources of size n_i (mT5 section 3.1, XLM-R)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"The language sampling exponent alpha={alpha} must be in [0, 1].")
    bad = [name for name, n in sizes.items() if not n > 0]
    if bad:
        raise ValueError(f"Source(s) {', '.join(bad)} are empty; every source needs text.")
    powered = {name: float(n) ** alpha for name, n in sizes.items()}
    total = sum(powered.values())
    return {name: p / total for name, p in powered.items()}


def mix(rows: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    """Infinite mixture of infinite row datasets in proportions `weights` (zeros left out).

    grain rounds proportions to integers (the smallest becomes 100), so a weight is honoured
    to about 1%; the interleaving is deterministic, so every window of sum-of-weights rows
    holds each source in its proportion."""
    kept = [(r, w) for r, w in zip(rows, weights, strict=True) if w > 0]
    if len(kept) == 1:
        return kept[0][0]
    return grain.MapDataset.mix([r for r, _ in kept], [w for _, w in kept])
