"""Run one command on every host of a Cloud TPU VM slice (gcloud), from this checkout, and see
it through preemptions.

    python launch/tpu_pod.py --tpu=NAME [--zone=Z --project=P] [--create [--queued] [--spot]
        --accelerator=v5p-64 --version=v2-alpha-tpuv5] [--delete] [--max_restarts=3] \\
        [--env=LIBTPU_INIT_ARGS=...] [--dry_run] \\
        -- lmjax train --config=configs/llama.py:1b --workdir=gs://BUCKET/run

What it does, each step one gcloud command (`--dry_run` prints them all and runs nothing):
  1. create the slice (`tpu-vm create`), or with --queued ask for it as a queued resource and
     poll until it is ACTIVE (capacity may take hours; it never fails for lack of it at once);
  2. pack this git checkout (tracked and untracked, not ignored files; outside a checkout it
     stops) and copy it to every host (`scp --worker=all`);
  3. on every host: unpack into ~/lmjax/src, make ~/lmjax/venv with Python 3.11 (uv, which
     fetches that Python if the image has an older one) and install `.[tpu]` with this
     checkout's constraints.txt; stop what an earlier launch left holding the TPU (the process
     it recorded, whatever has /dev/accel* or /dev/vfio open) and remove /tmp/libtpu_lockfile;
  4. start the command on every host at once, detached, with `--env` exported (from a script
     file, so it arrives as typed, quotes and $ included); each host logs to ~/lmjax/RUN.log and
     writes the command's exit status to ~/lmjax/RUN.rc (RUN: this launch);
  5. watch: every --poll seconds, the slice's state, each host's exit file and the new lines of
     host 0's log (each poll is a fresh ssh, so a dropped connection costs nothing);
  6. when every host has finished: their logs go to WORKDIR/logs/RUN/worker-I.log; the exit
     status is the run's (the first failing host's tail is shown);
  7. preemption (the slice PREEMPTED, the queued resource SUSPENDED or FAILED, or the command
     exiting 75, `lmjax train`'s status after saving at a preemption notice): the slice is
     deleted and created again when it is gone, the code copied and the same command started,
     which resumes from the workdir's newest checkpoint; each restart is logged with the steps
     it lost, up to --max_restarts, after which it exits 75;
  8. with --delete, delete the slice in any case (a failure, Ctrl-C: idle TPUs cost money).
Without --zone/--project gcloud's configured defaults apply. The workdir must be a path every
host reaches (gs://); metrics and checkpoints are written there by the hosts themselves.
`lmjax sweep --runner=tpu --tpu=NAME` hands each member to this script as `--tpu=NAME -- ...`.
"""

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED = 75  # `lmjax train`'s exit status after it saved at a preemption notice
HOME = "~/lmjax"  # on each host: src/ (the code), venv/, RUN.log, RUN.rc, pid
UP = {"READY", "ACTIVE"}  # a slice's (or queued resource's) state while it can run
SETUP = (f"mkdir -p {HOME} && rm -rf {HOME}/src && mkdir {HOME}/src && "
         f"tar xzf ~/lmjax.tar.gz -C {HOME}/src && cd {HOME}/src && export PATH=~/.local/bin:$PATH"
         f" && (command -v uv > /dev/null || python3 -m pip install -q --user uv) && "
         f"([ -x {HOME}/venv/bin/python ] || uv venv -q --python 3.11 {HOME}/venv) && "
         f'uv pip install -q --python {HOME}/venv/bin/python -c constraints.txt -e ".[tpu]"')
CLEAR = (f"(kill -9 -$(cat {HOME}/pid 2>/dev/null) 2>/dev/null; "
         "sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo -n kill -9; "
         "sudo -n rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile; true)")


def _gcloud(args, *words: str) -> list[str]:
    where = [f"--zone={args.zone}"] if args.zone else []
    where += [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", *words, *where]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "tpu-vm", "ssh", args.tpu, f"--worker={worker}", f"--command={command}")


def _script(command: list[str], env: list[str], rc: str) -> str:
    """What each host runs: `--env` exported, the user's command (`lmjax` through the venv's
    interpreter, whose ~ the shell expands), its exit status kept in `rc`. Written to a file by
    printf with the text quoted once, so any character in the command arrives as typed."""
    if any("=" not in e for e in env):
        raise ValueError("--env takes NAME=VALUE.")
    python = []
    if command[:1] == ["lmjax"]:
        python, command = [f"{HOME}/venv/bin/python -m lmjax"], command[1:]
    exports = "".join(f"export {shlex.quote(e)}; " for e in env)
    return f"{exports}{' '.join([*python, shlex.join(command)])}; echo $? > {rc}"


def create(args) -> list[tuple[str, list[str]]]:
    """The slice: (what, argv) steps; 'poll' repeats until it prints ACTIVE."""
    spot = ["--spot"] if args.spot else []
    if args.queued:
        return [("run", _gcloud(args, "queued-resources", "create", args.tpu,
                                f"--node-id={args.tpu}", f"--accelerator-type={args.accelerator}",
                                f"--runtime-version={args.version}", *spot)),
                ("poll", _gcloud(args, "queued-resources", "describe", args.tpu,
                                 "--format=value(state.state)"))]
    return [("run", _gcloud(args, "tpu-vm", "create", args.tpu,
                            f"--accelerator-type={args.accelerator}", f"--version={args.version}",
                            *spot))]


def delete(args) -> list[str]:
    if args.queued:
        return _gcloud(args, "queued-resources", "delete", args.tpu, "--force", "--quiet")
    return _gcloud(args, "tpu-vm", "delete", args.tpu, "--quiet")


def start(args, command: list[str], run: str) -> list[tuple[str, list[str]]]:
    """Copy the code, set up every host, start the command: (what, argv) steps."""
    archive = f"/tmp/lmjax-{args.tpu}.tar.gz"
    pack = (f"set -o pipefail && cd {shlex.quote(ROOT)} && git rev-parse --is-inside-work-tree "
            f"> /dev/null && git ls-files -z --cached --others --exclude-standard | "
            f"tar czf {archive} --null -T -")
    log, rc, script = f"{HOME}/{run}.log", f"{HOME}/{run}.rc", f"{HOME}/{run}.sh"
    launch = (f"printf %s {shlex.quote(_script(command, args.env, rc))} > {script} && "
              f"cd {HOME}/src && rm -f {rc} && (setsid nohup bash {script} > {log} 2>&1 "
              f"< /dev/null & echo $! > {HOME}/pid)")
    return [("local", ["bash", "-c", pack]),
            ("run", _gcloud(args, "tpu-vm", "scp", archive, f"{args.tpu}:lmjax.tar.gz",
                            "--worker=all")),
            ("run", _ssh(args, f"{SETUP} && {CLEAR}")),
            ("run", _ssh(args, launch))]


def steps(args, command: list[str], run: str = "RUN") -> list[tuple[str, list[str]]]:
    """Everything a launch runs, in order, for --dry_run (watching is a loop of the last
    'watch' lines, one per host's exit file and one for host 0's log)."""
    out = create(args) if args.create else []
    out += start(args, command, run)
    out += [("watch", _state(args)),
            ("watch", _ssh(args, f"cat {HOME}/{run}.rc 2>/dev/null; true", "I")),
            ("watch", _ssh(args, f"tail -c +OFFSET {HOME}/{run}.log", "0"))]
    return out + ([("final", delete(args))] if args.delete else [])


def _state(args) -> list[str]:
    if args.queued:
        return _gcloud(args, "queued-resources", "describe", args.tpu,
                       "--format=value(state.state)")
    return _gcloud(args, "tpu-vm", "describe", args.tpu, "--format=value(state)")


def _out(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.returncode, done.stdout


def do(plan: list[tuple[str, list[str]]], poll_seconds: float) -> bool:
    """Run create/start steps; False at the first that fails (its command is named)."""
    for what, argv in plan:
        print(f"+ {shlex.join(argv)}", flush=True)
        if what == "poll":
            while (state := _out(argv)[1].strip()) != "ACTIVE":
                if state in ("FAILED", "SUSPENDED"):
                    print(f"tpu_pod: the queued resource is {state}", file=sys.stderr)
                    return False
                print(f"  queued resource is {state or 'unknown'}; waiting", flush=True)
                time.sleep(poll_seconds)
        elif subprocess.run(argv).returncode:
            print(f"tpu_pod: failed: {shlex.join(argv)}", file=sys.stderr)
            return False
    return True


def hosts(args) -> int:
    code, out = _out(_gcloud(args, "tpu-vm", "describe", args.tpu,
                             "--format=value(networkEndpoints.len())"))
    if code or not out.strip().isdigit():
        raise RuntimeError(f"cannot read the hosts of TPU VM {args.tpu}: is it there?")
    return int(out.strip())


def watch(args, run: str, workers: int) -> int | None:
    """Poll until every host's command has ended: its exit status (the first non-zero host's,
    PREEMPTED if any host was), or None when the slice itself is lost (preempted, deleted)."""
    shown, codes = 0, {}
    while True:
        state = _out(_state(args))[1].strip()
        if state not in UP:
            print(f"tpu_pod: TPU {args.tpu} is {state or 'gone'}", file=sys.stderr, flush=True)
            return None
        code, text = _out(_ssh(args, f"tail -c +{shown + 1} {HOME}/{run}.log 2>/dev/null",
                               "0"))
        if not code and text:
            print(text, end="", flush=True)
            shown += len(text.encode())
        for worker in range(workers):
            if worker not in codes:
                code, text = _out(_ssh(args, f"cat {HOME}/{run}.rc 2>/dev/null; true",
                                       str(worker)))
                if not code and text.strip().lstrip("-").isdigit():
                    codes[worker] = int(text.strip())
        if len(codes) == workers:
            if PREEMPTED in codes.values() and set(codes.values()) <= {0, PREEMPTED}:
                return PREEMPTED
            failed = [w for w in sorted(codes) if codes[w]]
            if failed:
                _, tail = _out(_ssh(args, f"tail -n 20 {HOME}/{run}.log", str(failed[0])))
                print(f"{tail}\ntpu_pod: host {failed[0]} of {workers} exited "
                      f"{codes[failed[0]]}", file=sys.stderr, flush=True)
                return codes[failed[0]]
            return 0
        time.sleep(args.poll)


def save_logs(args, run: str, workers: int, workdir: str) -> None:
    """Every host's log into WORKDIR/logs/RUN/ (a gs:// workdir too, through etils.epath)."""
    if not workdir:
        return
    from etils import epath  # a dependency of lmjax; gs:// needs its [gcs] extra

    folder = epath.Path(workdir) / "logs" / run
    folder.mkdir(parents=True, exist_ok=True)
    for worker in range(workers):
        code, text = _out(_ssh(args, f"cat {HOME}/{run}.log", str(worker)))
        if not code:
            (folder / f"worker-{worker}.log").write_text(text)
    print(f"tpu_pod: logs in {folder}", flush=True)


def progress(workdir: str) -> str:
    """'step S saved, L logged' from the workdir: what a restart resumes from and loses."""
    if not workdir:
        return "the workdir is not known"
    from etils import epath

    root = epath.Path(workdir)
    saved = [int(p.name) for p in (root / "checkpoints").glob("*") if p.name.isdigit()]
    logged = 0
    if (root / "metrics.jsonl").exists():
        for row in (root / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):  # a row torn by the preemption
                logged = max(logged, json.loads(row).get("step", 0))
    newest = max(saved, default=0)
    return f"newest checkpoint step {newest}, steps {newest + 1}-{logged} logged since are lost" \
        if logged > newest else f"newest checkpoint step {newest}, nothing lost"


def launch(args, command: list[str]) -> int:
    workdir = next((w.split("=", 1)[1] for w in command if w.startswith("--workdir=")), "")
    for attempt in range(args.max_restarts + 1):
        run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}"
        if not do(start(args, command, run), args.poll):
            return 1
        workers = hosts(args)
        outcome = watch(args, run, workers)
        if outcome is not None:
            save_logs(args, run, workers, workdir)
        if outcome is not None and outcome != PREEMPTED:
            return outcome
        print(f"tpu_pod: preempted ({progress(workdir)}); restart {attempt + 1} of "
              f"{args.max_restarts}", file=sys.stderr, flush=True)
        if attempt == args.max_restarts:
            break
        if outcome is None:  # the slice is gone or down: a new one, if we may make it
            if not args.create:
                print("tpu_pod: not re-creating a slice this launch did not create (--create)",
                      file=sys.stderr)
                return PREEMPTED
            subprocess.run(delete(args), capture_output=True)
            if not do(create(args), args.poll):
                return 1
    return PREEMPTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("tpu_pod: give the command after --, e.g. -- lmjax train --config=...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", default="", help="default: gcloud's compute/zone")
    parser.add_argument("--project", default="", help="default: gcloud's core/project")
    parser.add_argument("--accelerator", default="v5p-8", help="--create: slice type")
    parser.add_argument("--version", default="v2-alpha-tpuv5", help="--create: TPU VM runtime")
    parser.add_argument("--create", action="store_true", help="create the slice first")
    parser.add_argument("--queued", action="store_true", help="--create/--delete as a queued "
                        "resource (waits for capacity)")
    parser.add_argument("--spot", action="store_true", help="--create a spot (preemptible) slice")
    parser.add_argument("--delete", action="store_true", help="delete the slice at the end")
    parser.add_argument("--max_restarts", type=int, default=3, help="re-creations and restarts "
                        "after preemptions before giving up (exit 75)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE exported on "
                        "every host (LIBTPU_INIT_ARGS, XLA_FLAGS, ...); repeat for more")
    parser.add_argument("--poll", type=float, default=30, help="seconds between checks")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        parser.error("the command after -- is empty")
    try:
        plan = steps(args, command)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print("\n".join(shlex.join(a) + {"poll": "  # until it prints ACTIVE",
                                         "watch": "  # polled"}.get(w, "") for w, a in plan))
        return 0
    try:
        if args.create and not do(create(args), args.poll):
            return 1
        return launch(args, command)
    except KeyboardInterrupt:
        print("tpu_pod: interrupted; the command goes on running on the hosts unless --delete",
              file=sys.stderr)
        return 130
    finally:
        if args.delete:
            print(f"+ {shlex.join(delete(args))}", flush=True)
            subprocess.run(delete(args))


if __name__ == "__main__":
    sys.exit(main())
