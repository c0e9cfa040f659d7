"""Run the context-extension study and print its tables (Markdown) and a JSON of every figure.

    python experiments/context_extension_cpu/run.py --root=workdirs/context_extension_cpu

Trains the base model at seq_len 64 (400 steps), finetunes it at 256 for 40 steps with RoPE
scaling none / linear (PI) / yarn, and evaluates the held-out tail of Shakespeare at contexts
64, 128 and 256 (non-overlapping windows), plus the base model at context 64 with smaller
strides. Re-running reuses finished runs.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from lmjax import evaluate, train, validate  # noqa: E402

CONTEXTS = (64, 128, 256)
FINETUNES = ("none", "linear", "yarn")
BASE_STRIDES = (64, 32, 16)


def scaling_overrides(kind: str, factor: float) -> tuple[str, ...]:
    return (f"model.rope_scaling={kind}", f"model.rope_scaling_factor={factor}",
            "model.rope_original_max_len=64")


def main(root: str) -> dict:
    spec = os.path.join(HERE, "config.py")
    base = os.path.join(root, "base")
    train.run(validate.load(spec), base)
    for kind in FINETUNES:
        train.run(validate.load(f"{spec}:{kind}", [f"train.init_from={base}"]),
                  os.path.join(root, f"finetune_{kind}"))

    def ppl(workdir, context, extra=(), stride=None):
        r = evaluate.evaluate(workdir, overrides=(f"data.seq_len={context}", *extra),
                              stride=stride)
        return {k: r[k] for k in ("eval/loss", "eval/loss_se", "eval/perplexity",
                                  "eval/tokens", "eval/sequences", "eval/stride")}

    rows = {}
    for kind, label in (("none", "base, no scaling"), ("linear", "base + PI (s = L/64)"),
                        ("yarn", "base + YaRN (s = L/64)")):
        rows[label] = {c: ppl(base, c, scaling_overrides(kind, c / 64)) for c in CONTEXTS}
    for kind, label in (("none", "finetuned at 256, no scaling"),
                        ("linear", "finetuned at 256 + PI (s = 4)"),
                        ("yarn", "finetuned at 256 + YaRN (s = 4)")):
        rows[label] = {c: ppl(os.path.join(root, f"finetune_{kind}"), c) for c in CONTEXTS}
    strides = [ppl(base, 64, stride=s) for s in BASE_STRIDES]

    lines = ["| model, RoPE at evaluation | " + " | ".join(f"ppl @ {c}" for c in CONTEXTS) + " |",
             "|---|" + "---:|" * len(CONTEXTS)]
    for label, by_context in rows.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{r['eval/perplexity']:.2f} (loss {r['eval/loss']:.3f} ± {r['eval/loss_se']:.3f})"
            for r in by_context.values()) + " |")
    lines += ["", "| base model, context 64: stride | loss | perplexity |", "|---:|---:|---:|"]
    lines += [f"| {r['eval/stride']} | {r['eval/loss']:.4f} ± {r['eval/loss_se']:.4f} | "
              f"{r['eval/perplexity']:.2f} |" for r in strides]
    print("\n".join(lines))
    out = {"contexts": rows, "strides": strides}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="workdirs/context_extension_cpu")
    main(parser.parse_args().root)
