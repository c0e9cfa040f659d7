"""Load checks for docs/reliability.md: a long run keeps its memory and speed, many saves keep
exactly `checkpoint.max_to_keep` checkpoints.

    python scripts/soak.py steps  [--steps=20000] [--workdir=DIR]   # RSS and step time flat
    python scripts/soak.py saves  [--steps=2000]  [--workdir=DIR]   # a save every step

Each runs `python -m lmjax train` on the smoke config as a subprocess, samples its resident
memory (VmRSS, Linux /proc) once a second, and prints one line per check with the figures and
PASS or FAIL; the exit status is the number of failed checks. "Flat" compares the window around
10% of the run with the last 10%: RSS grown by at most 5% (a fall passes: memory handed back is
no leak), tokens/s down by at most 10% (faster passes).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def train(workdir: str, steps: int, overrides: list[str]) -> tuple[int, list[tuple]]:
    """Run to the end; (exit code, [(seconds, RSS MiB, newest logged step)] once a second)."""
    command = [sys.executable, "-m", "lmjax", "train", "--config=configs/smoke.py",
               f"--workdir={workdir}", f"--config.train.steps={steps}",
               "--config.train.eval_every=0", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start, samples = time.monotonic(), []
    with open(os.path.join(os.path.dirname(workdir), "train.log"), "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        while proc.poll() is None:
            time.sleep(1)
            rss = rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - start, rss, last_step(workdir)))
    return proc.returncode, samples


def last_step(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 4096))
            lines = f.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def windows(samples: list[tuple], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """RSS samples logged between 5% and 15% of the steps, and in the last 10%."""
    rss = np.array([r for _, r, s in samples if 0.05 * steps <= s <= 0.15 * steps])
    end = np.array([r for _, r, s in samples if s >= 0.9 * steps])
    return rss, end


def rates(workdir: str, steps: int) -> tuple[float, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    early = [r["tokens_per_s"] for r in rows if 0.05 * steps <= r["step"] <= 0.15 * steps]
    late = [r["tokens_per_s"] for r in rows if r["step"] >= 0.9 * steps]
    return float(np.median(early)), float(np.median(late))


def check(name: str, ok: bool, text: str) -> int:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["steps", "saves"])
    parser.add_argument("--steps", type=int, default=0, help="20000 (steps) or 2000 (saves)")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    args = parser.parse_args()
    steps = args.steps or {"steps": 20000, "saves": 2000}[args.what]
    folder = args.workdir or tempfile.mkdtemp(prefix=f"soak_{args.what}_")
    os.makedirs(folder, exist_ok=True)
    workdir = os.path.join(folder, "run")
    overrides = (["--config.train.log_every=100", f"--config.checkpoint.every={steps // 4}"]
                 if args.what == "steps" else
                 ["--config.train.log_every=10", "--config.checkpoint.every=1",
                  "--config.checkpoint.max_to_keep=2"])
    print(f"soak {args.what}: {steps} steps in {workdir}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    code, samples = train(workdir, steps, overrides)
    failed = check("exit", code == 0, f"exit code {code} after {samples[-1][0]:.0f} s "
                   f"(log: {folder}/train.log)" if samples else f"exit code {code}")
    early, late = windows(samples, steps)
    if len(early) and len(late):
        ratio = np.median(late) / np.median(early)
        failed += check("rss", ratio <= 1.05,  # growth is a leak; a drop is the allocator
                        f"resident memory {np.median(early):.0f} MiB at 10% of the steps, "
                        f"{np.median(late):.0f} MiB in the last 10% ({ratio:.3f}x); peak "
                        f"{max(r for _, r, _ in samples):.0f} MiB")
    else:
        failed += check("rss", False, "too few samples: run more steps")
    if code == 0:
        early_rate, late_rate = rates(workdir, steps)
        failed += check("speed", late_rate / early_rate >= 0.90,  # slower is the failure
                        f"{early_rate:,.0f} tokens/s at 10% of the steps, {late_rate:,.0f} in "
                        f"the last 10% ({late_rate / early_rate:.3f}x)")
    if args.what == "saves":
        names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
        failed += check("kept", names == [str(steps - 1), str(steps)],
                        f"checkpoints/ holds {names} after {steps} saves (max_to_keep=2)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
