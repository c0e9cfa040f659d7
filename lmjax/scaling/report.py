"""`lmjax fit`: collect a sweep's runs (or read a table of runs: table.py), fit the chosen laws,
write results.json, runs.csv and the figures into one folder; plan a compute budget.

N is non-embedding parameters by default (Kaplan et al. 2020: at small sizes the embedding is
a large, nearly free share of the total and bends the law); `params='total'` uses
Chinchilla's count, `params='kaplan'` also leaves out the untied unembedding. D is
tokens seen; C groups runs by their train.flops_budget. Approach 3 is fitted under both
objectives of parametric.py; its compute-optimal exponents and the planner count C in the
runs' own FLOPs per token (`table.flops_convention`), not a fixed 6ND.

`root` and `out` may be URLs (gs://...): every file is read and written whole through
lmjax/paths.py.
"""

import json

import numpy as np

from lmjax import paths
from lmjax.scaling import collect, fit, parametric, plots, shapes, table

# kaplan_n: best final loss per size, L(N); kaplan_d / kaplan_c: the lower envelope of every
# training curve against tokens / FLOPs, L(D) / L(C) (Kaplan et al. 2020, eqs. 1.1-1.3).
METHODS = ("kaplan_n", "kaplan_d", "kaplan_c", "approach1", "approach2", "approach3",
           "approach3_besiroglu")  # --method=approach3 fits both objectives
CURVES = ("kaplan_d", "kaplan_c", "approach1")  # need each run's training curve
KAPLAN = {"kaplan_n": "N", "kaplan_d": "D", "kaplan_c": "C"}
PARAMS = {"non_embedding": "params_non_embedding", "total": "params", "kaplan": "params_kaplan"}


def _fit_one(method: str, runs: list[dict], n_key: str, bootstrap: int, gamma: float) -> dict:
    if method in CURVES and "curve" not in runs[0]:
        raise ValueError(f"{method} needs training curves; a table holds final points only.")
    if method in CURVES and any(r.get("fork_step") for r in runs):
        raise ValueError(f"{method} needs whole training curves; a cooldown fork logs only its "
                         "cooldown, whose points are not runs of their length: fit the forks' "
                         "end points (approach2, approach3).")
    N = np.array([r[n_key] for r in runs], np.float64)
    D = np.array([r["tokens"] for r in runs], np.float64)
    L = np.array([r["eval_loss"] for r in runs])
    curves = [{"N": r[n_key], "C": r["curve"]["flops"], "D": r["curve"]["tokens"],
               "L": r["curve"]["loss"]} for r in runs if "curve" in r]
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
    objective = "besiroglu" if method == "approach3_besiroglu" else "hoffmann"
    return parametric.fit_parametric(N, D, L, objective=objective, bootstrap=bootstrap,
                                     gamma=gamma)


def _epochs(runs: list[dict]) -> dict:
    """How many runs repeat their data, from the `epochs` each run logged (tokens seen / one
    pass over the training set; nan where unknown: lmjax/data/pipeline.py `train_tokens`)."""
    epochs = np.array([r.get("epochs", np.nan) for r in runs], np.float64)
    known = epochs[np.isfinite(epochs)]
    return {"known": int(known.size), "repeated": int(np.sum(known > 1)),
            "max": float(known.max()) if known.size else None}


def analyze(root: str, method: str = "all", out: str = "", params: str = "non_embedding",
            bootstrap: int = 200, table_path: str = "") -> dict:
    """Fit `method` ('all' = every method the runs support) to the runs under `root`, or to
    the rows of `table_path` (table.py); write results.json, PNG figures and (for `root`)
    runs.csv to `out` (default: <root>/fit, or <table folder>/<table name>_fit)."""
    if method not in (*METHODS, "all"):
        raise ValueError(f"--method={method!r} is not one of {(*METHODS, 'all')}.")
    if params not in PARAMS:
        raise ValueError(f"--params={params!r} is not one of {tuple(PARAMS)}.")
    if bool(root) == bool(table_path):
        raise ValueError("Give one of --root (a sweep's workdirs) and --table (a CSV or JSONL "
                         "of runs).")
    runs = table.read(table_path, params) if table_path else collect.collect(root)
    source = paths.resolve(table_path or root)
    out = (paths.resolve(out) if out else source / "fit" if root
           else source.parent / f"{source.stem}_fit")
    out.mkdir(parents=True, exist_ok=True)
    n_key = PARAMS[params]
    convention = table.flops_convention(runs, n_key)
    results = {"root" if root else "table": str(source), "params": params, "runs": len(runs),
               "flops_per_token": convention, "epochs": _epochs(runs), "skipped": {}}
    chosen = {"all": METHODS, "approach3": ("approach3", "approach3_besiroglu")}
    for m in chosen.get(method, (method,)):
        try:
            results[m] = _fit_one(m, runs, n_key, bootstrap, convention["gamma"])
        except ValueError as e:
            if method != "all":
                raise
            results["skipped"][m] = str(e)
    if root:
        collect.write_table(runs, out / "runs.csv")
        plots.loss_vs_flops(runs, n_key, out / "loss_vs_flops.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
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
    for m in ("approach3", "approach3_besiroglu"):
        if m in results:
            r = results[m]
            se = r.get("se")
            lines.append(f"{m:<10} E {_ci(r, 'E')}, A {_ci(r, 'A')}, B {_ci(r, 'B')}, alpha "
                         f"{_ci(r, 'alpha')}, beta {_ci(r, 'beta')};  a = {_ci(r, 'a')}, "
                         f"b = {_ci(r, 'b')}" + (
                             f";  s.e. (Fisher) alpha {se['alpha']:.3f}, beta {se['beta']:.3f}, "
                             f"a {se['a']:.3f}" if se else ""))
    if any(m in results for m in ("approach3", "approach3_besiroglu")):
        c = results["flops_per_token"]
        lines.append(f"           a, b for C = {c['k']:.3g}·N^{c['gamma']:.3f}·D, the runs' FLOPs "
                     f"per token (fitted within {100 * c['max_error']:.1f}%)")
    e = results["epochs"]
    if e["repeated"]:
        lines.append(f"epochs     {e['repeated']} of {e['known']} runs repeat their data (up to "
                     f"{e['max']:.3g} epochs): the fits count repeated tokens as fresh ones, "
                     "which Muennighoff et al. 2023 find holds to ~4 epochs only")
    for m, why in results["skipped"].items():
        lines.append(f"{m:<10} skipped: {why}")
    return "\n".join(lines)


def plan(results: dict, flops: float) -> dict:
    """For a budget of `flops`: N_opt, D_opt (95% intervals from the bootstrap) under each
    approach-3 fit, in the runs' FLOPs-per-token convention, and the GPT-3 shape (shapes.py)
    nearest each N_opt."""
    if not flops > 0:
        raise ValueError(f"--plan_flops={flops:g} must be a positive number of FLOPs.")
    fits = [m for m in ("approach3", "approach3_besiroglu") if m in results]
    if not fits:
        raise ValueError("--plan_flops needs an approach-3 fit (--method=approach3 or all); "
                         f"it was skipped: {results['skipped'].get('approach3', 'not asked')}")
    c = results["flops_per_token"]
    out = {}
    for m in fits:
        p = parametric.plan(flops, results[m], c["k"], c["gamma"])
        p["gpt3"] = shapes.nearest_gpt3(p["N_opt"], results["params"])
        out[m] = p
    return out


def plan_text(planned: dict, params: str) -> str:
    lines = []
    for m, p in planned.items():
        ci = p.get("ci", {})
        interval = lambda k, ci=ci: f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""
        name, count = p["gpt3"]
        lines.append(f"plan {m}: C = {p['C']:.3g} FLOPs -> N_opt {p['N_opt']:.3g}"
                     f"{interval('N_opt')} {params} params, D_opt {p['D_opt']:.3g}"
                     f"{interval('D_opt')} tokens ({p['D_opt'] / p['N_opt']:.1f} tokens/param), "
                     f"predicted loss {p['L_opt']:.3f}; nearest shipped shape GPT-3 {name} "
                     f"({count:.3g} {params} params)")
    return "\n".join(lines)
