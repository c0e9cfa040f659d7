"""Kaplan's L(N), L(D), L(C) and approach 1's intervals, on training curves drawn from a known
law with noise (several seeds)."""

import numpy as np
import pytest

from lmjax.scaling import fit, parametric

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
GAMMA = 0.34 * 0.28 / (0.34 + 0.28)  # L_opt(C) - E ∝ C^-gamma along the compute-optimal frontier


def curves(seed: int, noise: float = 0.003, sizes=(1e7, 1e11, 30)) -> list[dict]:
    """One training curve per size (`sizes`: geomspace arguments), D from 1e8 to 1e12 tokens,
    C = 6ND, log-normal noise."""
    rng = np.random.default_rng(seed)
    out = []
    for N in np.geomspace(*sizes):
        D = np.geomspace(1e8, 1e12, 50)
        L = parametric.parametric_loss(N, D, CHINCHILLA) * np.exp(rng.normal(0, noise, D.size))
        out.append({"N": N, "C": 6 * N * D, "D": D, "L": L})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaplan_l_of_d_is_the_largest_model_limit(seed):
    """Along the envelope in D the largest model wins, whose loss is E + A/N^alpha + B/D^beta:
    a power law in D with exponent beta and an offset E + A / 1e11^0.34 = 1.76."""
    D, L = fit.lower_envelope(curves(seed), "D")
    assert len(D) == 20 and D[0] == pytest.approx(1e8) and D[-1] == pytest.approx(1e12)
    got = fit.fit_power_law(D, L)
    assert got["alpha"] == pytest.approx(CHINCHILLA["beta"], abs=0.02)
    assert got["E"] == pytest.approx(1.69 + 406.4 / 1e11 ** 0.34, abs=0.03)
    assert got["x_c"] ** got["alpha"] == pytest.approx(CHINCHILLA["B"], rel=0.3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaplan_l_of_c_follows_the_compute_optimal_frontier(seed):
    C, L = fit.lower_envelope(curves(seed, sizes=(1e6, 1e12, 60)), "C")
    inside = (C > 1e18) & (C < 1e22)  # where the frontier's size lies well inside 1e6..1e12
    got = fit.fit_power_law(C[inside], L[inside])
    assert got["alpha"] == pytest.approx(GAMMA, abs=0.02)
    assert got["E"] == pytest.approx(CHINCHILLA["E"], abs=0.1)


def test_lower_envelope_takes_the_minimum_where_curves_overlap():
    a = {"D": np.array([1.0, 100.0]), "L": np.array([3.0, 1.0])}
    b = {"D": np.array([10.0, 1000.0]), "L": np.array([2.5, 2.0])}
    D, L = fit.lower_envelope([a, b], "D", num_points=4)  # at D = 1, 10, 100, 1000
    np.testing.assert_allclose(D, [1, 10, 100, 1000])
    np.testing.assert_allclose(L, [3.0, 2.0, 1.0, 2.0])  # a alone, a (2.0 < 2.5), a, b alone
    with pytest.raises(ValueError, match="at least 2 training curves"):
        fit.lower_envelope([a], "D")


@pytest.mark.parametrize("seed", [0, 1])
def test_approach1_bootstrap_interval_covers_the_exponent(seed):
    got = fit.fit_envelope(curves(seed, noise=0.01), bootstrap=30, seed=seed)
    a_true = 0.28 / 0.62
    assert got["a"] == pytest.approx(a_true, abs=0.05)
    lo, hi = got["ci"]["a"]
    assert lo <= got["a"] <= hi and lo < a_true + 0.05 and hi > a_true - 0.05
    assert got["ci"]["b"][0] <= got["b"] <= got["ci"]["b"][1]
