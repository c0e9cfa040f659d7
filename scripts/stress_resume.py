"""Kill `lmjax train` many times and check that the run still ends bitwise equal to an
uninterrupted one. The longer sibling of tests/test_reliability.py, built on its harness.

    python scripts/stress_resume.py --kills=50 [--seed=0] [--random_fraction=0.3]

Kills are spread over rounds (one workdir each, at most 8 kills a round). Most land at seeded
phase points through the LMJAX_FAULT hook (after a step's dispatch, as an eval starts, while
an async save is being written); `--random_fraction` of them are plain SIGKILLs from outside
at a random wall-clock time, wherever the process happens to be (import, compile, restore,
a save, the final wait). Prints one line per round and exits non-zero on the first mismatch.
"""

import argparse
import os
import random
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("LMJAX_CACHE", tempfile.mkdtemp(prefix="lmjax-stress-cache-"))

from tests import test_reliability as harness  # noqa: E402

PER_ROUND = 8


def external_kill(workdir, env, rng: random.Random) -> float:
    """SIGKILL after a random delay; returns the delay (the process may have finished first)."""
    delay = rng.uniform(2.0, 10.0)  # import to the final save, with a warm compile cache
    proc = harness.start_train(workdir, env)
    try:
        proc.wait(timeout=delay)
    except Exception:  # noqa: BLE001 - still running: kill it where it stands
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return delay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random_fraction", type=float, default=0.3)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = tempfile.mkdtemp(prefix="lmjax-stress-")
    env = harness.subprocess_env(os.path.join(scratch, "xla_cache"))
    base_dir = os.path.join(scratch, "uninterrupted")
    code, log = harness.run_train(base_dir, env)
    if code:
        sys.exit(f"the uninterrupted run failed:\n{log[-3000:]}")
    baseline = {r["step"]: harness.without_timing(r) for r in harness.read_rows(base_dir)}

    done, round_index, start = 0, 0, time.time()
    while done < args.kills:
        kills = min(PER_ROUND, args.kills - done)
        workdir = os.path.join(scratch, f"round{round_index}")
        randoms = sum(rng.random() < args.random_fraction for _ in range(kills))
        randoms += kills - randoms == 1  # a hooked plan needs two kills (a save and an eval)
        delays = [external_kill(workdir, env, rng) for _ in range(randoms)]
        hooked = kills - randoms
        plan = harness.kill_plan(args.seed * 1000 + round_index, hooked) if hooked >= 2 else []
        harness.crash_and_resume(workdir, env, plan, baseline)  # asserts every row matches
        rows = harness.read_rows(workdir)
        harness.assert_rows_match(rows, baseline)
        assert [r["step"] for r in rows] == sorted(baseline), "the run did not finish"
        done += len(plan) + randoms
        print(f"round {round_index}: {len(plan)} hooked kills {plan}, {randoms} random kills "
              f"after {[round(d, 1) for d in delays]} s: bitwise equal "
              f"({done}/{args.kills} kills, {time.time() - start:.0f} s)", flush=True)
        round_index += 1
    print(f"OK: {done} kills, every run equal to the uninterrupted one. Scratch: {scratch}")


if __name__ == "__main__":
    main()
