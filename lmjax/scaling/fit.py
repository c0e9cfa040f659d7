"""Scaling-law fits: Kaplan's power laws and Chinchilla's approaches 1 and 2; approach 3 is in
parametric.py.

Every fit works on plain arrays (N parameters, D tokens, C FLOPs, L loss), so it can be tested
on synthetic data from a known law; `collect.py` turns a sweep's workdirs (and `table.py` a
table of published runs) into those arrays.

The laws that are a sum of power laws plus a constant (Kaplan's, Chinchilla's approach 3) are
fitted in log-sum-exp form with a Huber loss on log L (Hoffmann et al. 2022, App. D.2),
L-BFGS from the best of many starts, to a tight tolerance (Besiroglu et al. 2024: Hoffmann et
al.'s fit had stopped early); the helpers for that are public here for parametric.py.
"""

import numpy as np
import scipy.optimize

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022 and Besiroglu et al. 2024
# Hoffmann et al.'s grid of initialisations (appendix D.2): alpha, beta, e, a, b.
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
LBFGS = {"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12}


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative, elementwise."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def lse_terms(theta_S: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The terms c_i - k_i · x_i and e of log L_pred = logsumexp(terms) for each of S
    parameter vectors theta = (c_1..c_m, k_1..k_m, e): start x point x term."""
    m = features.shape[1]
    theta_S = np.atleast_2d(theta_S)
    return np.concatenate([
        theta_S[:, None, :m] - theta_S[:, None, m:2 * m] * features[None],
        np.broadcast_to(theta_S[:, None, 2 * m:2 * m + 1], (len(theta_S), len(features), 1))],
        axis=2)


def lse_objective(theta: np.ndarray, features: np.ndarray, log_l: np.ndarray, delta: float):
    """Huber(log L_pred - log L) summed over points, and its gradient in theta (for L-BFGS)."""
    m = features.shape[1]
    terms = lse_terms(theta, features)[0]
    pred = np.logaddexp.reduce(terms, axis=1)
    value, dr = huber(pred - log_l, delta)
    weights = np.exp(terms - pred[:, None]) * dr[:, None]  # d objective / d term
    grad = np.concatenate([weights[:, :m].sum(0), -(weights[:, :m] * features).sum(0),
                           weights[:, m:].sum(0)])
    return value.sum(), grad


def minimize_from(objective, starts: np.ndarray, scores: np.ndarray, keep: int, args: tuple,
                  bounds: list | None = None) -> np.ndarray:
    """L-BFGS on `objective` (value and gradient) from the `keep` best-scored `starts`; the best
    optimum found."""
    best = None
    for start in starts[np.argsort(scores)[:keep]]:
        result = scipy.optimize.minimize(objective, start, args=args, jac=True, bounds=bounds,
                                         method="L-BFGS-B", options=LBFGS)
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def fit_lse(features: np.ndarray, log_l: np.ndarray, starts: np.ndarray, delta: float,
            keep: int) -> np.ndarray:
    """Minimise the Huber objective from the `keep` best of `starts` (every start is scored
    first, vectorised, so a 4,500-point grid costs one pass)."""
    pred_SN = np.logaddexp.reduce(lse_terms(starts, features), axis=2)
    scores = huber(pred_SN - log_l, delta)[0].sum(1)
    return minimize_from(lse_objective, starts, scores, keep, (features, log_l, delta))


def check(name: str, *arrays) -> list[np.ndarray]:
    """float64 arrays of equal length, every value finite and positive, or one sentence."""
    out = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({len(a) for a in out}) != 1:
        raise ValueError(f"{name}: the input arrays have different lengths "
                         f"{[len(a) for a in out]}.")
    for a in out:
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name}: every value must be finite and positive.")
    return out


def percentile_ci(draws: list[dict], names) -> dict:
    """Percentile 95% interval of each named quantity over bootstrap draws."""
    return {k: tuple(np.percentile([d[k] for d in draws], [2.5, 97.5]).tolist()) for k in names}


def bootstrap_draws(fit_once, n: int, samples: int, seed: int) -> list:
    """fit_once(indices) on `samples` resamples of n points with replacement."""
    rng = np.random.default_rng(seed)
    return [fit_once(rng.integers(0, n, n)) for _ in range(samples)]


# ---------------------------------------------------------------------------- Kaplan


def fit_power_law(x, L, *, bootstrap: int = 0, seed: int = 0, delta: float = HUBER_DELTA) -> dict:
    """Kaplan et al. 2020: L(x) = E + (x_c / x)^alpha for x = N, D or C (the irreducible E
    as in Henighan et al. 2020). Same Huber-on-log-loss objective as approach 3."""
    x, L = check("fit_power_law", x, L)
    features = np.log(x)[:, None]
    # theta = (alpha·log x_c, alpha, log E); log x_c starts spread over and beyond the data.
    starts = np.array([(al * lxc, al, e) for al in (0.05, 0.1, 0.3, 0.6, 1.0)
                       for lxc in np.linspace(0, 2 * features.max(), 9)
                       for e in (-2.0, -0.5, 0.5, 1.5)])

    def to_dict(theta):
        k_alpha, alpha, e = theta
        return {"E": float(np.exp(e)), "alpha": float(alpha),
                "x_c": float(np.exp(k_alpha / alpha)) if alpha else float("inf")}

    out = to_dict(fit_lse(features, np.log(L), starts, delta, keep=4))
    if bootstrap:  # each resample from the whole start grid, as in parametric.py
        draws = bootstrap_draws(
            lambda idx: to_dict(fit_lse(features[idx], np.log(L[idx]), starts, delta, keep=2)),
            len(L), bootstrap, seed)
        out["ci"] = percentile_ci(draws, ["E", "alpha", "x_c"])
    return out


def power_law_loss(x, fit: dict) -> np.ndarray:
    return fit["E"] + (fit["x_c"] / np.asarray(x, np.float64)) ** fit["alpha"]


def lower_envelope(curves: list[dict], key: str, num_points: int = 20) -> tuple:
    """(x, L): at `num_points` log-spaced values of the curves' `key` ('C' FLOPs or 'D'
    tokens), the lowest loss any curve reaches there, interpolated in log x. Kaplan et al.'s
    L(C) and L(D) are such frontiers: loss when the other resource is not the bottleneck (the
    best size for that compute; a model large enough for that data)."""
    if len(curves) < 2:
        raise ValueError(f"lower_envelope: at least 2 training curves are needed, not "
                         f"{len(curves)}.")
    logs = [np.log(np.asarray(c[key], np.float64)) for c in curves]
    grid = np.linspace(max(min(x[0] for x in logs), 0.0), max(x[-1] for x in logs), num_points)
    x, L = [], []
    for g in grid:
        losses = [np.interp(g, lx, c["L"]) for lx, c in zip(logs, curves, strict=True)
                  if lx[0] <= g <= lx[-1]]
        if losses:
            x.append(np.exp(g)), L.append(min(losses))
    return np.array(x), np.array(L)


# ---------------------------------------------------------------------------- approach 2


def _loglog_line(C: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k · C^slope by least squares in log-log: (slope, k)."""
    slope, intercept = np.polyfit(np.log(C), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def _isoflop_minima(N, D, L, C) -> dict:
    budgets, N_opt, D_opt, L_opt, parabolas = [], [], [], [], []
    for c in np.unique(C):
        sel = C == c
        if len(np.unique(N[sel])) < 3:
            continue
        x = np.log(N[sel])
        p = np.polyfit(x, L[sel], 2)  # L = p0 x^2 + p1 x + p2
        if p[0] <= 0:
            continue  # no minimum: the budget's sizes do not bracket its optimum
        x_opt = -p[1] / (2 * p[0])
        q = np.polyfit(x, np.log(D[sel]), 1)  # D of the size N_opt at this budget
        budgets.append(c)
        N_opt.append(np.exp(x_opt))
        D_opt.append(np.exp(np.polyval(q, x_opt)))
        L_opt.append(np.polyval(p, x_opt))
        parabolas.append(p.tolist())
    return {"C": np.array(budgets), "N_opt": np.array(N_opt), "D_opt": np.array(D_opt),
            "L_opt": np.array(L_opt), "parabolas": parabolas}


def _residual_resample(N, L, C, minima: dict, rng) -> np.ndarray:
    """L with each bracketed budget's parabola residuals resampled (pooled over budgets and
    scaled by sqrt(n / (n - 3)) for the three fitted coefficients): the sizes stay the designed
    ones, as a resample of cases would not (with 5 sizes, one case resample in ~6 keeps only 3
    distinct sizes, whose parabola passes through them exactly)."""
    fitted, residuals = L.copy(), []
    for c, p in zip(minima["C"], minima["parabolas"], strict=True):
        sel = C == c
        fitted[sel] = np.polyval(p, np.log(N[sel]))
        residuals.append((L[sel] - fitted[sel]) * np.sqrt(sel.sum() / (sel.sum() - 3)))
    pool = np.concatenate(residuals)
    kept = np.isin(C, minima["C"])
    return np.where(kept, fitted + rng.choice(pool, L.size), L)


def fit_isoflop(N, D, L, C, *, bootstrap: int = 0, seed: int = 0,
                resample: str = "residuals") -> dict:
    """Approach 2: per compute budget C (IsoFLOP), a parabola of L in log N locates N_opt;
    then N_opt = k_N · C^a and D_opt = k_D · C^b by least squares in log-log.

    D_opt is read off the budget's own (N, D) pairs at N_opt rather than from C = 6ND, so the
    result does not depend on the FLOP convention. Budgets whose parabola opens downwards (the
    sizes do not bracket the optimum) are dropped and listed in `dropped`. The bootstrap
    resamples the parabolas' residuals (the sizes are a design, not a sample: Davison & Hinkley
    1997, section 6.2.3) or, with resample='cases', the runs within each budget.
    """
    N, D, L, C = check("fit_isoflop", N, D, L, C)
    if resample not in ("residuals", "cases"):
        raise ValueError(f"resample={resample!r} is not one of 'residuals', 'cases'.")
    minima = _isoflop_minima(N, D, L, C)
    if len(minima["C"]) < 2:
        raise ValueError(f"fit_isoflop: only {len(minima['C'])} compute budget(s) have >= 3 "
                         "sizes bracketing a minimum; at least 2 are needed.")
    a, k_N = _loglog_line(minima["C"], minima["N_opt"])
    b, k_D = _loglog_line(minima["C"], minima["D_opt"])
    out = {"a": a, "b": b, "k_N": k_N, "k_D": k_D,
           "dropped": sorted(set(np.unique(C).tolist()) - set(minima["C"].tolist())),
           **{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in minima.items()}}
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(C == c) for c in np.unique(C)]
        draws = []
        for _ in range(bootstrap):
            if resample == "residuals":
                m = _isoflop_minima(N, D, _residual_resample(N, L, C, minima, rng), C)
            else:
                idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
                m = _isoflop_minima(N[idx], D[idx], L[idx], C[idx])
            if len(m["C"]) >= 2:
                draws.append((_loglog_line(m["C"], m["N_opt"])[0],
                              _loglog_line(m["C"], m["D_opt"])[0]))
        draws = np.array(draws)
        out["ci"] = {"a": tuple(np.percentile(draws[:, 0], [2.5, 97.5]).tolist()),
                     "b": tuple(np.percentile(draws[:, 1], [2.5, 97.5]).tolist())}
        out["bootstrap_kept"] = len(draws)
        out["resample"] = resample
    return out


# ---------------------------------------------------------------------------- approach 1


def fit_envelope(curves: list[dict], num_budgets: int = 20, *, bootstrap: int = 0,
                 seed: int = 0) -> dict:
    """Approach 1: at each of `num_budgets` log-spaced FLOP counts, the run with the lowest
    loss (interpolated along its training curve in log C) gives N_opt and D_opt; then power
    laws in C as in approach 2. `curves`: one dict per run with N (scalar) and arrays C, D, L.
    With bootstrap > 0, `ci` holds 95% intervals of a and b from resampling whole runs.

    Hoffmann et al. trained each size at several lengths, each with a cosine schedule matched to
    its length; a single run's intermediate points are not at their optimum, so the envelope of
    single runs is biased towards small models at small C.
    """
    if len(curves) < 2:
        raise ValueError("fit_envelope: at least 2 training curves are needed.")
    out = _envelope_fit(curves, num_budgets)
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = [_envelope_fit([curves[i] for i in rng.integers(0, len(curves), len(curves))],
                               num_budgets) for _ in range(bootstrap)]
        out["ci"] = {k: tuple(np.percentile([d[k] for d in draws], [2.5, 97.5]).tolist())
                     for k in ("a", "b")}
    return out


def _envelope_fit(curves: list[dict], num_budgets: int) -> dict:
    lo = max(min(np.min(c["C"]) for c in curves), 1.0)
    hi = max(np.max(c["C"]) for c in curves)
    budgets = np.geomspace(lo, hi, num_budgets)
    C_env, N_opt, D_opt, L_env = [], [], [], []
    for budget in budgets:
        best = None
        for c in curves:
            logc = np.log(np.asarray(c["C"], np.float64))
            if not logc[0] <= np.log(budget) <= logc[-1]:
                continue
            loss = np.interp(np.log(budget), logc, c["L"])
            if best is None or loss < best[0]:
                d = np.exp(np.interp(np.log(budget), logc, np.log(c["D"])))
                best = (loss, c["N"], d)
        if best is not None:
            C_env.append(budget), L_env.append(best[0]), N_opt.append(best[1])
            D_opt.append(best[2])
    C_env, N_opt, D_opt = map(np.asarray, (C_env, N_opt, D_opt))
    a, k_N = _loglog_line(C_env, N_opt)
    b, k_D = _loglog_line(C_env, D_opt)
    return {"a": a, "b": b, "k_N": k_N, "k_D": k_D, "C": C_env.tolist(),
            "N_opt": N_opt.tolist(), "D_opt": D_opt.tolist(), "L_opt": [float(x) for x in L_env]}
