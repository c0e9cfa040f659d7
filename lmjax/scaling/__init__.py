"""Scaling-law toolkit: run a sweep (`sweep`), read its workdirs (`collect`) or a table of runs
(`table`), fit Kaplan and Chinchilla laws (`fit`, `parametric`), and draw them (`plots`);
`lmjax sweep` and `lmjax fit` drive it."""

from lmjax.scaling.fit import (
    fit_envelope,
    fit_isoflop,
    fit_power_law,
    lower_envelope,
    power_law_loss,
)
from lmjax.scaling.parametric import compute_optimal, fit_parametric, parametric_loss, plan

__all__ = ["compute_optimal", "fit_envelope", "fit_isoflop", "fit_parametric", "fit_power_law",
           "lower_envelope", "parametric_loss", "plan", "power_law_loss"]
