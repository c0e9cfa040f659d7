"""Fits recover the laws that generated synthetic data (several seeds, with noise)."""

import numpy as np
import pytest
import scipy.optimize

from lmjax.scaling import fit

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann eq. 10
OTHER = {"E": 2.5, "A": 80.0, "B": 3000.0, "alpha": 0.25, "beta": 0.4}


def sample(law: dict, seed: int, n: int = 80, noise: float = 0.005):
    """Sizes and token counts spread as in Chinchilla's runs (N 1e7..1e10, D 1e9..1e12), loss
    from the law times log-normal noise."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    return N, D, fit.parametric_loss(N, D, law) * np.exp(rng.normal(0.0, noise, n))


def test_noise_free_data_is_fitted_exactly():
    """The tight L-BFGS tolerance matters (Besiroglu et al. 2024): a loose one stops early."""
    N, D, L = sample(CHINCHILLA, seed=0, noise=0.0)
    got = fit.fit_parametric(N, D, L)
    for k, v in CHINCHILLA.items():
        assert got[k] == pytest.approx(v, rel=1e-3), k
    assert got["a"] == pytest.approx(0.28 / 0.62, rel=1e-3)
    assert got["a"] + got["b"] == pytest.approx(1.0)


@pytest.mark.parametrize("law", [CHINCHILLA, OTHER], ids=["chinchilla", "other"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parametric_fit_recovers_the_law_from_noisy_data(law, seed):
    got = fit.fit_parametric(*sample(law, seed))
    assert got["alpha"] == pytest.approx(law["alpha"], abs=0.02)
    assert got["beta"] == pytest.approx(law["beta"], abs=0.02)
    assert got["E"] == pytest.approx(law["E"], rel=0.03)
    for k in ("A", "B"):  # A, B trade off against alpha, beta: known within ~1.5x at 0.5% noise
        assert abs(np.log(got[k] / law[k])) < 0.4, (k, got[k])


def test_bootstrap_intervals_cover_the_truth_and_shrink_with_data():
    few = fit.fit_parametric(*sample(CHINCHILLA, seed=4, n=40, noise=0.01), bootstrap=40, seed=0)
    many = fit.fit_parametric(*sample(CHINCHILLA, seed=4, n=160, noise=0.01), bootstrap=40,
                              seed=0)
    truth = {**CHINCHILLA, "a": 0.28 / 0.62}
    for got in (few, many):
        for k in ("E", "alpha", "beta", "a"):
            lo, hi = got["ci"][k]
            assert lo <= truth[k] <= hi, (k, got["ci"][k])
    width = lambda got, k: got["ci"][k][1] - got["ci"][k][0]
    assert width(many, "alpha") < width(few, "alpha")
    assert width(many, "beta") < width(few, "beta")


def test_compute_optimal_matches_a_numerical_minimum():
    for C in (1e18, 5.76e23):  # 5.76e23: Chinchilla's own budget
        N_opt, D_opt = fit.compute_optimal(C, CHINCHILLA)
        assert 6 * N_opt * D_opt == pytest.approx(C)
        loss_at = lambda logn, C=C: fit.parametric_loss(np.exp(logn), C / 6 / np.exp(logn),
                                                        CHINCHILLA)
        best = scipy.optimize.minimize_scalar(loss_at, bounds=(10, 35), method="bounded",
                                              options={"xatol": 1e-10})
        assert np.log(N_opt) == pytest.approx(best.x, abs=1e-4)
    # Vectorised, and N_opt grows as C^(beta / (alpha + beta)).
    N_opt, _ = fit.compute_optimal(np.array([1e20, 1e22]), CHINCHILLA)
    assert np.log(N_opt[1] / N_opt[0]) / np.log(100) == pytest.approx(0.28 / 0.62)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaplan_power_law_is_recovered(seed):
    rng = np.random.default_rng(seed)
    law = {"E": 1.8, "x_c": 3e8, "alpha": 0.35}
    N = np.geomspace(1e6, 1e10, 25)
    L = fit.power_law_loss(N, law) * np.exp(rng.normal(0, 0.003, N.size))
    got = fit.fit_power_law(N, L)
    assert got["alpha"] == pytest.approx(law["alpha"], abs=0.03)
    assert got["E"] == pytest.approx(law["E"], rel=0.02)
    assert abs(np.log(got["x_c"] / law["x_c"])) < 0.3


def isoflop_data(seed: int, noise: float = 0.003):
    """Per budget, 7 sizes from N_opt/4 to 4·N_opt, trained on D = C / 6N tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in (1e18, 1e19, 1e20, 1e21):
        N_opt, _ = fit.compute_optimal(C, CHINCHILLA)
        for N in N_opt * np.geomspace(0.25, 4, 7):
            L = fit.parametric_loss(N, C / (6 * N), CHINCHILLA) * np.exp(rng.normal(0, noise))
            rows.append((N, C / (6 * N), L, C))
    return np.array(rows).T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isoflop_fit_recovers_the_compute_optimal_exponents(seed):
    got = fit.fit_isoflop(*isoflop_data(seed), bootstrap=100, seed=seed)
    assert got["a"] == pytest.approx(0.28 / 0.62, abs=0.03)
    assert got["a"] + got["b"] == pytest.approx(1.0)  # D = C / 6N at every point
    assert got["ci"]["a"][0] <= 0.28 / 0.62 <= got["ci"]["a"][1]
    N_true, _ = fit.compute_optimal(np.array(got["C"]), CHINCHILLA)
    np.testing.assert_allclose(np.log(got["N_opt"]), np.log(N_true), atol=0.15)


def test_isoflop_drops_budgets_that_do_not_bracket_their_optimum():
    N, D, L, C = isoflop_data(0, noise=0.0)
    keep = ~((C == 1e21) & (N > fit.compute_optimal(1e21, CHINCHILLA)[0] / 1.5))
    N, D, C = N[keep], D[keep], C[keep]
    L = np.where(C == 1e21, -np.log(N) + 40, L[keep])  # loss falls monotonically with N
    got = fit.fit_isoflop(N, D, L, C)
    assert got["dropped"] == [1e21] and len(got["C"]) == 3


def test_envelope_of_training_curves_recovers_the_exponent():
    """Approach 1 on curves of 40 sizes: each curve is L(N, D) along D = C / 6N."""
    curves = []
    for N in np.geomspace(1e7, 1e10, 40):
        D = np.geomspace(1e8, 1e12, 60)
        curves.append({"N": N, "C": 6 * N * D, "D": D,
                       "L": fit.parametric_loss(N, D, CHINCHILLA)})
    got = fit.fit_envelope(curves)
    assert got["a"] == pytest.approx(0.28 / 0.62, abs=0.03)
    assert got["b"] == pytest.approx(1 - 0.28 / 0.62, abs=0.03)


def test_bad_inputs_name_the_cause():
    with pytest.raises(ValueError, match="different lengths"):
        fit.fit_parametric([1e7, 1e8], [1e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="finite and positive"):
        fit.fit_power_law([1e7, 0.0, 1e9], [3.0, 2.9, 2.8])
    N, D, L, C = isoflop_data(0)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        fit.fit_isoflop(N[C == 1e18], D[C == 1e18], L[C == 1e18], C[C == 1e18])
