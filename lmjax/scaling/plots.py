"""The study's figures, as PNG files (matplotlib, Agg: no display needed), each written whole
through lmjax/paths.py so that a gs:// folder takes them as a local one does."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmjax import paths  # noqa: E402
from lmjax.scaling import fit as fit_lib  # noqa: E402
from lmjax.scaling import parametric  # noqa: E402


def _colors(values) -> dict:
    unique = sorted(set(values))
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(1, len(unique) - 1)) for i, v in enumerate(unique)}


def _save(fig, path: paths.PathLike) -> None:
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    paths.resolve(path).write_bytes(png.getvalue())


def loss_vs_flops(runs: list[dict], n_key: str, path: paths.PathLike) -> None:
    """Training curves (smoothed train loss) against FLOPs, one colour per model size."""
    colors = _colors(r[n_key] for r in runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in colors:
        for i, r in enumerate(x for x in runs if x[n_key] == n):
            ax.plot(r["curve"]["flops"], r["curve"]["loss"], color=colors[n], lw=1,
                    label=f"N={n:.3g}" if i == 0 else None)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="train loss (smoothed, nats)",
           title="Loss vs compute per model size")
    ax.legend(fontsize=7)
    _save(fig, path)


def isoflop(runs: list[dict], n_key: str, result: dict, path: paths.PathLike) -> None:
    """Final loss against N per compute budget, with approach 2's parabolas and minima."""
    budgets = [r["flops_budget"] for r in runs]
    colors = _colors(budgets)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, p in zip(result["C"], result["parabolas"], strict=True):
        group = [r for r in runs if r["flops_budget"] == c]
        N = np.array([r[n_key] for r in group])
        ax.scatter(N, [r["eval_loss"] for r in group], color=colors[c], label=f"C={c:.2g}")
        x = np.linspace(np.log(N.min()), np.log(N.max()), 50)
        ax.plot(np.exp(x), np.polyval(p, x), color=colors[c], lw=1)
    ax.scatter(result["N_opt"], result["L_opt"], marker="*", s=120, color="red", zorder=3,
               label="minimum")
    ax.set(xscale="log", xlabel=f"N ({n_key})", ylabel="final eval loss (nats)",
           title="IsoFLOP curves (approach 2)")
    ax.legend(fontsize=7)
    _save(fig, path)


def optimal(results: dict, path: paths.PathLike) -> None:
    """N_opt and D_opt against C: each approach's points and fitted power laws."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("approach1", "o"), ("approach2", "s")):
        r = results.get(method)
        if not r:
            continue
        C = np.array(r["C"])
        grid = np.geomspace(C.min(), C.max(), 20)
        for ax, key, k, e in ((axes[0], "N_opt", "k_N", "a"), (axes[1], "D_opt", "k_D", "b")):
            ax.scatter(C, r[key], marker=marker, s=20)
            ax.plot(grid, r[k] * grid ** r[e], lw=1, label=f"{method}: {e} = {r[e]:.2f}")
    p3, c = results.get("approach3"), results.get("flops_per_token", {"k": 6.0, "gamma": 1.0})
    if p3 and results.get("approach2"):
        grid = np.geomspace(min(results["approach2"]["C"]), max(results["approach2"]["C"]), 20)
        N_opt, D_opt = parametric.compute_optimal(grid, p3, c["k"], c["gamma"])
        axes[0].plot(grid, N_opt, "--", label=f"approach3: a = {p3['a']:.2f}")
        axes[1].plot(grid, D_opt, "--", label=f"approach3: b = {p3['b']:.2f}")
    for ax, name in zip(axes, ("N_opt", "D_opt"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=name)
        ax.legend(fontsize=7)
    _save(fig, path)


def kaplan(results: dict, path: paths.PathLike) -> None:
    """Kaplan's L(N), L(D), L(C): the points each law was fitted to and the fitted curve."""
    laws = [(m, results[m]) for m in ("kaplan_n", "kaplan_d", "kaplan_c") if m in results]
    fig, axes = plt.subplots(1, len(laws), figsize=(4 * len(laws), 3.6), squeeze=False)
    for ax, (method, r) in zip(axes[0], laws, strict=True):
        x, L = np.array(r["points"][r["x"]]), np.array(r["points"]["L"])
        grid = np.geomspace(x.min(), x.max(), 50)
        ax.scatter(x, L, s=15)
        ax.plot(grid, fit_lib.power_law_loss(grid, r), lw=1,
                label=f"E = {r['E']:.2f}, alpha = {r['alpha']:.3f}")
        ax.set(xscale="log", xlabel=r["x"], ylabel="loss (nats)", title=f"{method}: L({r['x']})")
        ax.legend(fontsize=7)
    _save(fig, path)


def residuals(N, D, L, result: dict, path: paths.PathLike) -> None:
    """log L - log L_pred of the approach-3 fit against N, coloured by D."""
    resid = np.log(L) - np.log(parametric.parametric_loss(N, D, result))
    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(N, resid, c=np.log10(D), cmap="viridis")
    fig.colorbar(points, ax=ax, label="log10 D")
    ax.axhline(0, color="gray", lw=1)
    ax.set(xscale="log", xlabel="N", ylabel="log L - log L_fit",
           title="Approach 3 residuals")
    _save(fig, path)
