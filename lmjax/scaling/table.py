"""A table of runs (CSV or JSONL, local or gs://) as the records `lmjax fit` fits, so published
data can be refitted as a sweep's own: one row per run, a column each for N, D or C, and loss.

Column names are matched ignoring case, spaces and dashes; the first of each list present wins:

  N     params (total), params_non_embedding, params_kaplan - whichever --params names - or
        a generic N | parameters | model_size, taken to be that kind
  D     tokens | D | training_tokens | tokens_seen        (tokens trained on)
  C     flops | C | compute | training_flop | training_flops
  loss  eval_loss | loss | L | final_loss
  optional: flops_budget | budget (approach 2's groups; default C to 3 significant digits),
            flops_per_token (default C / D), epochs, name

With only one of D and C, the other comes from the FLOPs per token column, or Chinchilla's 6N.
The CSV that `lmjax fit --root` writes (runs.csv) is such a table.
"""

import csv
import io
import json

import numpy as np

from lmjax import paths

N_COLUMNS = {"total": "params", "non_embedding": "params_non_embedding", "kaplan": "params_kaplan"}
GENERIC_N = ("n", "parameters", "model_size")
COLUMNS = {
    "tokens": ("tokens", "d", "training_tokens", "tokens_seen"),
    "flops": ("flops", "c", "compute", "training_flop", "training_flops"),
    "eval_loss": ("eval_loss", "loss", "l", "final_loss"),
    "flops_budget": ("flops_budget", "budget"),
    "flops_per_token": ("flops_per_token",),
    "epochs": ("epochs",),
}
REQUIRED = ("n", "eval_loss", "tokens", "flops")  # a present column of these: a number per row


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _rows(path) -> list[dict]:
    """The table's rows as {normalised column: text or number}."""
    if not path.exists():
        raise FileNotFoundError(f"Table {path} does not exist.")
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(dict(json.loads(line)))
                except (json.JSONDecodeError, TypeError, ValueError):
                    raise ValueError(f"Table {path} line {number} is not a JSON object.") from None
    else:
        raise ValueError(f"Table {path} is neither .csv nor .jsonl.")
    if not rows:
        raise ValueError(f"Table {path} has no rows.")
    return [{_key(k): v for k, v in row.items() if k is not None} for row in rows]


def _number(path, index: int, column: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(value, bool) or not np.isfinite(x):
        raise ValueError(f"Table {path} row {index + 1}: {column}={value!r} is not a number.")
    return x


def read(path: paths.PathLike, params: str = "non_embedding") -> list[dict]:
    """Runs as `collect.load_run` gives them, less the training curves: name, N under the
    collect key for `params`, tokens, flops, flops_budget, flops_per_token, eval_loss, epochs
    (nan where the table has none)."""
    path = paths.resolve(path)
    rows = _rows(path)
    present = set().union(*rows)
    n_key = N_COLUMNS[params]
    found = {"n": next((c for c in (n_key, *GENERIC_N) if c in present), None)}
    for key, names in COLUMNS.items():
        found[key] = next((c for c in names if c in present), None)
    missing = [what for what, ok in (
        (f"N ({params} parameters: {n_key} or one of {GENERIC_N})", found["n"]),
        (f"loss (one of {COLUMNS['eval_loss']})", found["eval_loss"]),
        (f"D or C (one of {COLUMNS['tokens'] + COLUMNS['flops']})",
         found["tokens"] or found["flops"])) if not ok]
    if missing:
        raise ValueError(f"Table {path} has no column for {' nor '.join(missing)}; its columns "
                         f"are {sorted(present)}.")
    runs = []
    for i, row in enumerate(rows):
        get = {}
        for key, column in found.items():
            value = row.get(column) if column else None
            if key in REQUIRED and column:
                get[key] = _number(path, i, column, value)
                if get[key] <= 0:
                    raise ValueError(f"Table {path} row {i + 1}: {column}={value!r} must be "
                                     "positive.")
            elif column and str(value).strip().lower() not in ("", "none", "nan"):
                get[key] = _number(path, i, column, value)  # optional: blank is absent
        N = get["n"]
        per_token = get.get("flops_per_token") or (
            get["flops"] / get["tokens"] if "flops" in get and "tokens" in get else 6 * N)
        D = get["tokens"] if "tokens" in get else get["flops"] / per_token
        C = get["flops"] if "flops" in get else per_token * D
        budget = get.get("flops_budget", 0.0)
        runs.append({"name": str(row.get("name", i + 1)), n_key: N, "tokens": D, "flops": C,
                     "flops_budget": budget if budget > 0 else float(f"{C:.3g}"),
                     "flops_per_token": per_token, "eval_loss": get["eval_loss"],
                     "epochs": get.get("epochs", float("nan"))})
    return runs


def flops_convention(runs: list[dict], n_key: str) -> dict:
    """FLOPs per token = k · N^gamma, least squares in log-log over the runs: the convention the
    budgets were counted in (lmjax/flops.py's adds attention to 6N, so gamma < 1 at small N;
    a table of 6ND rows gives k = 6, gamma = 1), for parametric.compute_optimal."""
    N = np.array([r[n_key] for r in runs], np.float64)
    per_token = np.array([r["flops_per_token"] for r in runs], np.float64)
    if len(np.unique(N)) < 2:
        return {"k": float(np.median(per_token / N)), "gamma": 1.0, "max_error": 0.0}
    gamma, log_k = np.polyfit(np.log(N), np.log(per_token), 1)
    error = np.max(np.abs(np.exp(log_k) * N ** gamma / per_token - 1))
    return {"k": float(np.exp(log_k)), "gamma": float(gamma), "max_error": float(error)}
