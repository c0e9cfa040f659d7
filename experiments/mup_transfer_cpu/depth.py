"""The depth transfer check: sweep.py's model at width 64 and 2, 4 and 8 layers, under μP with
Depth-μP (model.mup_base_depth=2: residual branches x sqrt(2/L), block LRs x sqrt(2/L); Yang
et al. 2023, Bordelon et al. 2023) and under μP alone, each on a 2x LR grid, one seed.

    lmjax sweep --sweep=experiments/mup_transfer_cpu/depth.py --root=workdirs/mup_depth \
        --parallel=2
"""

from experiments.mup_transfer_cpu import sweep

DEPTHS = (2, 4, 8)
WIDTH = 64
LOG2_LRS = sweep.MUP_LOG2_LRS
SEEDS = (0,)
get_config = sweep.get_config


def name(depth: int, kind: str, log2_lr: int, seed: int) -> str:
    return f"L{depth}_{kind}_log2lr{log2_lr}_s{seed}"


def get_sweep() -> dict[str, dict]:
    members = {}
    for seed in SEEDS:
        for depth in sorted(DEPTHS, reverse=True):
            kinds = {"depth_mup": 2, "mup": 0} if depth != DEPTHS[0] else {"depth_mup": 2}
            for kind, base_depth in kinds.items():  # at the base depth the two are the same
                for k in LOG2_LRS:
                    members[name(depth, kind, k, seed)] = {
                        **sweep.width(WIDTH), "model.num_layers": depth,
                        "model.parametrization": "mup", "model.mup_base_depth": base_depth,
                        "model.mup_output_mult": sweep.OUTPUT_MULT, "optim.lr": 2.0**k,
                        "seed": seed}
    return members
