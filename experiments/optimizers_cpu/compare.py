"""Loss at equal tokens for the four optimizers on the bench model's shapes (one CPU device).

    python experiments/optimizers_cpu/compare.py [STEPS] [OUT] [LR_FACTORS]

Each optimizer at one setting from the literature's rules: AdamW's lr and decay are the base;
Muon shares them (Moonlight's matched RMS); Lion takes lr / 3 and decay x 3 (Chen et al. 2023
keep lr x wd); Adafactor is in AdamW's units. LR_FACTORS (comma-separated, default 1) sweeps
each one's lr around that setting, decay fixed. Figures: docs/optimizers.md.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402

from configs import bench  # noqa: E402
from lmjax import train  # noqa: E402

SETTINGS = {"adamw": (3e-3, 0.1), "muon": (3e-3, 0.1), "lion": (1e-3, 0.3),
            "adafactor": (3e-3, 0.1)}  # (optim.lr, optim.weight_decay)


def main(steps: int, out: str, factors: tuple[float, ...] = (1.0,)) -> dict:
    results = {}
    for (name, (base_lr, wd)), factor in ((s, f) for s in SETTINGS.items() for f in factors):
        lr, key = base_lr * factor, name if factors == (1.0,) else f"{name}_lr_x{factor:g}"
        cfg = bench.get_config()
        # the bench's synthetic tokens cannot be learned: Shakespeare with its own tokenizer
        cfg.data.update(source="text", text="shakespeare", tokenizer="shakespeare_bpe2048")
        cfg.mesh.update(data=1, fsdp=1, tensor=1)
        cfg.optim.update(name=name, lr=lr, weight_decay=wd, warmup_steps=max(steps // 10, 1))
        cfg.train.update(steps=steps, log_every=10, eval_every=0, eval_batches=8)
        cfg.checkpoint.update(every=100000)
        workdir = os.path.join(out, key)
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.time()
        train.run(cfg, workdir, devices=jax.devices()[:1])
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        trained = [r for r in rows if "train/loss" in r]
        evals = [r for r in rows if "eval/loss" in r]
        results[key] = {"lr": lr, "tokens": trained[-1]["tokens"],
                        "train_loss": trained[-1]["train/loss"],
                        "eval_loss": evals[-1]["eval/loss"] if evals else None,
                        "wall_s": round(time.time() - start, 1), "load": os.getloadavg()}
        print(key, json.dumps(results[key]), flush=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300,
         sys.argv[2] if len(sys.argv) > 2 else "/tmp/lmjax_optimizers",
         tuple(float(f) for f in sys.argv[3].split(",")) if len(sys.argv) > 3 else (1.0,))
