"""`lmjax fit`: collect a sweep's runs, fit the chosen laws, write results.json, runs.csv and
the figures into one folder.

N is non-embedding parameters by default (Kaplan et al. 2020: at small sizes the embedding is
a large, nearly free share of the total and bends the law); `params='total'` uses
Chinchilla's count, `params='kaplan'` also leaves out the untied unembedding. D is
tokens seen; C groups runs by their train.flops_budget.

`root` and `out` may be URLs (gs://...): every file is read and written whole through
lmjax/paths.py.
"""

import json

import numpy as np

from lmjax import paths
from lmjax.scaling import collect, fit, plots

# kaplan_n: best final loss per size, L(N); kaplan_d / kaplan_c: the lower envelope of every
# training curve against tokens / FLOPs, L(D) / L(C) (Kaplan et al. 2020, eqs. 1.1-1.3).
METHODS = ("kaplan_n", "kaplan_d", "kaplan_c", "approach1", "approach2", "approach3")
KAPLAN = {"kaplan_n": "N", "kaplan_d": "D", "kaplan_c": "C"}
PARAMS = {"non_embedding": "params_non_embedding", "total": "params", "kaplan": "params_kaplan"}


def _fit_one(method: str, runs: list[dict], n_key: str, bootstrap: int) -> dict:
    N = np.array([r[n_key] for r in runs], np.float64)
    D = np.array([r["tokens"] for r in runs], np.float64)
    L = np.array([r["eval_loss"] for r in runs])
    curves = [{"N": r[n_key], "C": r["curve"]["flops"], "D": r["curve"]["tokens"],
               "L": r["curve"]["loss"]} for r in runs]
    if method == "kaplan_n":
        x = np.unique(N)
        if len(x) < 3:
            raise ValueError(f"kaplan_n needs at least 3 model sizes; the runs have {len(x)}.")
        best = np.array([L[N == n].min() for n in x])  # the best budget per size
    elif method in KAPLAN:
        x, best = fit.lower_envelope(curves, KAPLAN[method])
    if method in KAPLAN:
        return {**fit.fit_power_law(x, best, bootstrap=bootstrap), "x": KAPLAN[method],
                "points": {KAPLAN[method]: x.tolist(), "L": best.tolist()}}
    if method == "approach1":
        return fit.fit_envelope(curves, bootstrap=bootstrap)
    if method == "approach2":
        C = np.array([r["flops_budget"] for r in runs], np.float64)
        if not np.all(C > 0):
            raise ValueError("approach2 needs every run to have a train.flops_budget.")
        return fit.fit_isoflop(N, D, L, C, bootstrap=bootstrap)
    if len(L) < 6:
        raise ValueError(f"approach3 fits 5 parameters; it needs at least 6 runs, not {len(L)}.")
    return fit.fit_parametric(N, D, L, bootstrap=bootstrap)


def analyze(root: str, method: str = "all", out: str = "", params: str = "non_embedding",
            bootstrap: int = 200) -> dict:
    """Fit `method` ('all' = every method the runs support) to the runs under `root`; write
    results.json, runs.csv and PNG figures to `out` (default: <root>/fit)."""
    if method not in (*METHODS, "all"):
        raise ValueError(f"--method={method!r} is not one of {(*METHODS, 'all')}.")
    if params not in PARAMS:
        raise ValueError(f"--params={params!r} is not one of {tuple(PARAMS)}.")
    runs = collect.collect(root)
    out = paths.resolve(out) if out else paths.resolve(root) / "fit"
    out.mkdir(parents=True, exist_ok=True)
    n_key = PARAMS[params]
    results = {"root": str(paths.resolve(root)), "params": params, "runs": len(runs),
               "skipped": {}}
    for m in METHODS if method == "all" else (method,):
        try:
            results[m] = _fit_one(m, runs, n_key, bootstrap)
        except ValueError as e:
            if method != "all":
                raise
            results["skipped"][m] = str(e)
    collect.write_table(runs, out / "runs.csv")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plots.loss_vs_flops(runs, n_key, out / "loss_vs_flops.png")
    if any(m in results for m in KAPLAN):
        plots.kaplan(results, out / "kaplan.png")
    if "approach2" in results:
        plots.isoflop(runs, n_key, results["approach2"], out / "isoflop.png")
    if "approach1" in results or "approach2" in results:
        plots.optimal(results, out / "optimal.png")
    if "approach3" in results:
        plots.residuals([r[n_key] for r in runs], [r["tokens"] for r in runs],
                        [r["eval_loss"] for r in runs], results["approach3"],
                        out / "residuals.png")
    return results


def _ci(result: dict, key: str) -> str:
    lo_hi = result.get("ci", {}).get(key)
    return f"{result[key]:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")


def summary(results: dict) -> str:
    """The fitted exponents, one line per method, with 95% intervals where bootstrapped."""
    lines = [f"{results['runs']} runs, N = {results['params']} parameters"]
    for m, x in KAPLAN.items():
        if m in results:
            r = results[m]
            lines.append(f"{m:<10} L({x}) = E + ({x}_c/{x})^alpha: E {_ci(r, 'E')}, "
                         f"alpha {_ci(r, 'alpha')}, {x}_c {r['x_c']:.3g}")
    for m in ("approach1", "approach2"):
        if m in results:
            lines.append(f"{m}  N_opt ∝ C^a, a = {_ci(results[m], 'a')};  "
                         f"D_opt ∝ C^b, b = {_ci(results[m], 'b')}")
    if "approach3" in results:
        r = results["approach3"]
        lines.append(f"approach3  E {_ci(r, 'E')}, A {r['A']:.4g}, B {r['B']:.4g}, "
                     f"alpha {_ci(r, 'alpha')}, beta {_ci(r, 'beta')};  a = {_ci(r, 'a')}, "
                     f"b = {_ci(r, 'b')}")
    for m, why in results["skipped"].items():
        lines.append(f"{m:<10} skipped: {why}")
    return "\n".join(lines)
