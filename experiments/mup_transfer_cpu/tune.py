"""The base width's tuning run for sweep.py (μTransfer's step 1): at width 32, where μP is SP,
the LR and the output multiplier α_out (logits x α_out / m_D) on a 2x grid, one seed.

    lmjax sweep --sweep=experiments/mup_transfer_cpu/tune.py --root=workdirs/mup_tune --parallel=2
"""

from experiments.mup_transfer_cpu import sweep

OUTPUT_MULTS = (1.0, 2.0, 4.0, 8.0)
LOG2_LRS = (-10, -9, -8, -7, -6, -5)
get_config = sweep.get_config


def get_sweep() -> dict[str, dict]:
    return {f"w32_out{a:g}_log2lr{k}": {"model.parametrization": "mup",
                                        "model.mup_output_mult": a, "optim.lr": 2.0**k}
            for a in OUTPUT_MULTS for k in LOG2_LRS}
