"""Chinchilla's approach 3: L(N, D) = E + A/N^alpha + B/D^beta fitted to final losses, under two
objectives, and the compute-optimal allocation the law implies.

hoffmann   Hoffmann et al. 2022 (App. D.2): Huber loss (delta 1e-3) on log L, L-BFGS from
           the best of a grid of initialisations, to a tight tolerance (Besiroglu et al. 2024
           found the published fit had stopped early).
besiroglu  Besiroglu et al. 2024, "Chinchilla scaling: a replication attempt" (and their
           code): the Huber function of the residual over a fitted scale sigma, normalised, as
           the log-density of log L; the law and sigma maximise the likelihood together. A
           likelihood also gives the parameters' covariance (`cov`, `se`), besides the
           bootstrap's intervals.

Bootstrap intervals refit each resample from the whole start grid: every start is scored on the
resample (vectorised) and L-BFGS runs from the resample's own `keep_bootstrap` best, and from
the full data's optimum; the lowest objective wins. Starting each resample from the full data's
optimum alone (lmjax did until issue 22) leaves it in that optimum's basin, so the spread
understates the uncertainty; the grid's best-scored start alone can stall on a plateau (a term
whose weight vanishes), which would widen it: with both, a resample's fit is never worse than
either.
"""

import itertools

import numpy as np
import scipy.stats

from lmjax.scaling import fit

OBJECTIVES = ("hoffmann", "besiroglu")
NAMES = ("E", "A", "B", "alpha", "beta")  # the law's parameters, in `draws` rows
# theta = (log A, log B, alpha, beta, log E): lse form c_i - k_i·x_i over (log N, log D), e.
_GRID = fit.CHINCHILLA_GRID
STARTS = np.array([(a, b, al, be, e) for al, be, e, a, b in itertools.product(
    _GRID["alpha"], _GRID["beta"], _GRID["e"], _GRID["a"], _GRID["b"])])


def parametric_loss(N, D, law: dict) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]


def exponents(law: dict, gamma: float = 1.0) -> tuple[float, float]:
    """(a, b) of N_opt ∝ C^a, D_opt ∝ C^b when C = k · N^gamma · D (compute_optimal)."""
    alpha, beta = law["alpha"], law["beta"]
    return beta / (alpha + gamma * beta), alpha / (alpha + gamma * beta)


def compute_optimal(C, law: dict, k: float = 6.0, gamma: float = 1.0) -> tuple:
    """(N_opt, D_opt) minimising L(N, D) under C = k · N^gamma · D, in closed form.

    FLOPs per token = k · N^gamma: Kaplan's and Chinchilla's 6N is k = 6, gamma = 1 (Hoffmann
    et al. 2022, eq. 4); a sweep's own convention (attention terms, embeddings counted or not)
    is fitted from its runs by `table.flops_convention`. Setting dL/dN = 0 along the budget:
    N^(alpha + gamma·beta) = alpha·A / (gamma·beta·B) · (C / k)^beta.
    """
    C = np.asarray(C, np.float64)
    alpha, beta = law["alpha"], law["beta"]
    power = alpha + gamma * beta
    N_opt = ((alpha * law["A"] / (gamma * beta * law["B"])) ** (1 / power)
             * (C / k) ** (beta / power))
    return N_opt, C / (k * N_opt ** gamma)


def _law(theta: np.ndarray) -> dict:
    a, b, alpha, beta, e = theta[:5]
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": float(alpha), "beta": float(beta)}


# ------------------------------------------------------------ the Huber likelihood (besiroglu)


def _log_z(delta: float) -> float:
    """log of the normaliser of exp(-huber_delta(u)) over the real line."""
    inner = np.sqrt(2 * np.pi) * (2 * scipy.stats.norm.cdf(delta) - 1)
    return float(np.log(inner + 2 * np.exp(-delta**2 / 2) / delta))


def _psi_squared(delta: float) -> float:
    """E[huber'(u)^2] under that density: the Fisher information of its location."""
    inner = np.sqrt(2 * np.pi) * (2 * scipy.stats.norm.cdf(delta) - 1
                                  - 2 * delta * scipy.stats.norm.pdf(delta))
    return float((inner + 2 * delta * np.exp(-delta**2 / 2)) / np.exp(_log_z(delta)))


def _nll(params: np.ndarray, features: np.ndarray, log_l: np.ndarray, delta: float,
         log_z: float):
    """-log likelihood of log L under the Huber density of scale sigma around log L_pred, and
    its gradient; params = (theta, log sigma), log_z = _log_z(delta)."""
    theta, log_sigma, n = params[:5], params[5], len(log_l)
    sigma = np.exp(log_sigma)
    terms = fit.lse_terms(theta, features)[0]
    pred = np.logaddexp.reduce(terms, axis=1)
    u = (pred - log_l) / sigma
    value, psi = fit.huber(u, delta)
    w = np.exp(terms - pred[:, None]) * (psi / sigma)[:, None]  # d nll / d term
    grad = np.concatenate([w[:, :2].sum(0), -(w[:, :2] * features).sum(0), w[:, 2:].sum(0),
                           [n - np.sum(psi * u)]])
    return value.sum() + n * (log_sigma + log_z), grad


def _covariance(theta: np.ndarray, sigma: float, features: np.ndarray, delta: float) -> np.ndarray:
    """Inverse expected Fisher information of theta: (E[psi^2] / sigma^2) · J^T J, J the
    Jacobian of log L_pred. Expected, not observed: at delta = 1e-3 the density is nearly
    Laplace, whose curvature sits at the few points in the quadratic zone."""
    terms = fit.lse_terms(theta, features)[0]
    w = np.exp(terms - np.logaddexp.reduce(terms, axis=1)[:, None])  # d pred / d term
    J = np.concatenate([w[:, :2], -w[:, :2] * features, w[:, 2:]], axis=1)
    return np.linalg.pinv(_psi_squared(delta) / sigma**2 * J.T @ J)


def _standard_errors(law: dict, cov: np.ndarray, gamma: float) -> dict:
    """Delta method from theta's covariance to E, A, B (log-scale parameters) and a, b."""
    alpha, beta = law["alpha"], law["beta"]
    power = alpha + gamma * beta
    grads = {"A": [law["A"], 0, 0, 0, 0], "B": [0, law["B"], 0, 0, 0],
             "alpha": [0, 0, 1, 0, 0], "beta": [0, 0, 0, 1, 0], "E": [0, 0, 0, 0, law["E"]],
             "a": [0, 0, -beta / power**2, alpha / power**2, 0],
             "b": [0, 0, gamma * beta / power**2, -gamma * alpha / power**2, 0]}
    return {k: float(np.sqrt(max(np.dot(g, cov @ g), 0.0))) for k, g in grads.items()}


# ---------------------------------------------------------------------------- the fit


def _fit(features: np.ndarray, log_l: np.ndarray, objective: str, delta: float, keep: int,
         also: np.ndarray | None = None) -> np.ndarray:
    """The best optimum of `objective` from the `keep` best of the start grid, and from `also`
    if given: theta, plus log sigma for besiroglu."""
    r_SN = np.logaddexp.reduce(fit.lse_terms(STARTS, features), axis=2) - log_l
    if objective == "hoffmann":
        starts, scores = STARTS, fit.huber(r_SN, delta)[0].sum(1)
        fun, args, bounds = fit.lse_objective, (features, log_l, delta), None
    else:
        # sigma starts at delta · mean |r|: the scale's maximum likelihood in the Laplace limit
        sigma_S = np.maximum(delta * np.abs(r_SN).mean(1), 1e-12)
        starts = np.column_stack([STARTS, np.log(sigma_S)])
        scores = (fit.huber(r_SN / sigma_S[:, None], delta)[0].sum(1)
                  + len(log_l) * np.log(sigma_S))
        fun, args = _nll, (features, log_l, delta, _log_z(delta))
        bounds = [(None, None)] * 5 + [(np.log(1e-12), 0.0)]  # sigma: no overflow on the way
    if also is not None:  # polished besides the grid's best, whatever its score
        starts, scores, keep = np.vstack([also, starts]), np.r_[-np.inf, scores], keep + 1
    return fit.minimize_from(fun, starts, scores, keep, args, bounds=bounds)


def fit_parametric(N, D, L, *, objective: str = "hoffmann", bootstrap: int = 0, seed: int = 0,
                   delta: float = fit.HUBER_DELTA, keep: int = 8, keep_bootstrap: int = 1,
                   gamma: float = 1.0) -> dict:
    """Approach 3 under `objective` (module docstring): fit L(N, D) = E + A/N^alpha + B/D^beta.

    Returns E, A, B, alpha, beta, the compute-optimal exponents a, b (`exponents` with gamma:
    C ∝ N^gamma · D), `huber` (Hoffmann's objective per point) and for besiroglu `sigma`,
    `cov` (of log A, log B, alpha, beta, log E) and `se`. With bootstrap > 0: `ci`, 95%
    percentile intervals of each over `bootstrap` resamples of the points, each refitted from
    the whole grid (L-BFGS from its `keep_bootstrap` best starts and from the full data's
    optimum, against `keep` starts for the full data); `draws` holds each resample's (E, A,
    B, alpha, beta), for intervals on anything derived (the planner).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}.")
    N, D, L = fit.check("fit_parametric", N, D, L)
    features, log_l = np.stack([np.log(N), np.log(D)], axis=1), np.log(L)
    params = _fit(features, log_l, objective, delta, keep)
    out = _law(params)
    out["a"], out["b"] = exponents(out, gamma)
    out["huber"] = float(fit.lse_objective(params[:5], features, log_l, delta)[0] / len(L))
    out["n_points"], out["objective"] = len(L), objective
    if objective == "besiroglu":
        out["sigma"] = float(np.exp(params[5]))
        cov = _covariance(params[:5], out["sigma"], features, delta)
        out["cov"], out["se"] = cov.tolist(), _standard_errors(out, cov, gamma)
    if bootstrap:
        def fit_once(idx):
            law = _law(_fit(features[idx], log_l[idx], objective, delta, keep_bootstrap,
                            also=params))
            return {**law, **dict(zip("ab", exponents(law, gamma), strict=True))}

        draws = fit.bootstrap_draws(fit_once, len(L), bootstrap, seed)
        out["ci"] = fit.percentile_ci(draws, [*NAMES, "a", "b"])
        out["draws"] = [[d[k] for k in NAMES] for d in draws]
    return out


def plan(C: float, result: dict, k: float = 6.0, gamma: float = 1.0) -> dict:
    """N_opt, D_opt for a budget of C FLOPs under a fitted law, with 95% intervals from its
    bootstrap draws (when it has them) and the loss the law predicts there."""
    N_opt, D_opt = compute_optimal(C, result, k, gamma)
    out = {"C": float(C), "N_opt": float(N_opt), "D_opt": float(D_opt),
           "L_opt": float(parametric_loss(N_opt, D_opt, result))}
    if result.get("draws"):
        laws = [dict(zip(NAMES, row, strict=True)) for row in result["draws"]]
        optima = np.array([compute_optimal(C, law, k, gamma) for law in laws])
        out["ci"] = {"N_opt": tuple(np.percentile(optima[:, 0], [2.5, 97.5]).tolist()),
                     "D_opt": tuple(np.percentile(optima[:, 1], [2.5, 97.5]).tolist())}
    return out
