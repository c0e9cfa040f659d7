"""Run one command on every host of a Cloud TPU VM slice (gcloud), from this checkout, and see
it through preemptions.

    python launch/tpu_pod.py --tpu=NAME [--zone=Z --project=P] [--create [--reuse] [--queued]
        [--spot] --accelerator=v5p-64 --version=v2-alpha-tpuv5] [--num_slices=K] [--delete] \\
        [--max_restarts=3] [--env=LIBTPU_INIT_ARGS=...] [--dry_run] \\
        -- lmjax train --config=configs/llama.py:1b --workdir=gs://BUCKET/run

What it does, each step one gcloud command (`--dry_run` prints them all and runs nothing):
  1. create the slice (`tpu-vm create`), or with --queued ask for it as a queued resource and
     poll until it is ACTIVE (capacity may take hours; it never fails for lack of it at once);
  2. pack this git checkout (tracked and untracked, not ignored files; outside a checkout it
     stops) and copy it to every host (`scp --worker=all`);
  3. on every host: stop what an earlier launch left holding the TPU (the process group it
     recorded, whatever has /dev/accel* or /dev/vfio open) and remove /tmp/libtpu_lockfile;
     unpack into ~/lmjax/src, make ~/lmjax/venv with Python 3.11 (uv, which fetches that
     Python if the image has an older one) and install `.[tpu]` with constraints.txt;
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
--num_slices=K (K > 1) runs on K slices NAME-0 .. NAME-(K-1) as one job (Multislice): with
--create --queued one queued resource of K nodes (`--node-count`, `--node-prefix`); every host
gets MEGASCALE_COORDINATOR_ADDRESS (slice 0's host 0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID
and MEGASCALE_PORT, as MaxText's multihost_runner sets them; and an `lmjax train` command whose
config's mesh.dcn_* do not multiply to K is refused before anything is created.
Without --zone/--project gcloud's configured defaults apply. The workdir must be a path every
host reaches (gs://); metrics and checkpoints are written there by the hosts themselves.
`lmjax sweep --runner=tpu --tpu=NAME` hands each member to this script as `--tpu=NAME -- ...`;
with `--tpu_count=K` as `--tpu=NAME-I --create --reuse ... -- ...` (the slice is made by its
first member and kept for the next), and at the sweep's end `--tpu=NAME-I --delete --` (no
command: delete only).
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
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


def _nodes(args) -> list[str]:
    """The TPU VMs of the run: NAME, or NAME-0 .. NAME-(K-1) for --num_slices=K."""
    return [args.tpu] if args.num_slices == 1 else [f"{args.tpu}-{i}"
                                                     for i in range(args.num_slices)]


def _ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}")


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
    """The slices: (what, argv) steps; 'poll' repeats until it prints ACTIVE."""
    spot = ["--spot"] if args.spot else []
    kind = [f"--accelerator-type={args.accelerator}"]
    if args.queued:
        nodes = ([f"--node-id={args.tpu}"] if args.num_slices == 1 else
                 [f"--node-count={args.num_slices}", f"--node-prefix={args.tpu}"])
        return [("run", _gcloud(args, "queued-resources", "create", args.tpu, *nodes, *kind,
                                f"--runtime-version={args.version}", *spot)),
                ("poll", _gcloud(args, "queued-resources", "describe", args.tpu,
                                 "--format=value(state.state)"))]
    return [("run", _gcloud(args, "tpu-vm", "create", node, *kind, f"--version={args.version}",
                            *spot)) for node in _nodes(args)]


def delete(args) -> list[list[str]]:
    if args.queued:
        return [_gcloud(args, "queued-resources", "delete", args.tpu, "--force", "--quiet")]
    return [_gcloud(args, "tpu-vm", "delete", node, "--quiet") for node in _nodes(args)]


def _megascale(args, address: str) -> list[list[str]]:
    """Each slice's MEGASCALE_* exports (none for one slice)."""
    if args.num_slices == 1:
        return [[]]
    return [[f"MEGASCALE_COORDINATOR_ADDRESS={address}:8080",
             f"MEGASCALE_NUM_SLICES={args.num_slices}", f"MEGASCALE_SLICE_ID={i}",
             "MEGASCALE_PORT=8080"] for i in range(args.num_slices)]


def coordinator(args) -> list[str]:
    """Slice 0's host 0's internal address, which every slice's hosts meet at."""
    return _gcloud(args, "tpu-vm", "describe", _nodes(args)[0],
                   "--format=value(networkEndpoints[0].ipAddress)")


def start(args, command: list[str], run: str, address: str = "IP_OF_SLICE_0_HOST_0"
          ) -> list[tuple[str, list[str]]]:
    """Copy the code, set up every host, start the command: (what, argv) steps."""
    archive = f"/tmp/lmjax-{args.tpu}.tar.gz"
    pack = (f"set -o pipefail && cd {shlex.quote(ROOT)} && git rev-parse --is-inside-work-tree "
            f"> /dev/null && git ls-files -z --cached --others --exclude-standard | "
            f"tar czf {archive} --null -T -")
    log, rc, script = f"{HOME}/{run}.log", f"{HOME}/{run}.rc", f"{HOME}/{run}.sh"
    out = [("local", ["bash", "-c", pack])]
    for node in _nodes(args):
        out += [("run", _gcloud(args, "tpu-vm", "scp", archive, f"{node}:lmjax.tar.gz",
                                "--worker=all")),
                ("run", _ssh(args, node, f"{CLEAR} && {SETUP}"))]
    for node, env in zip(_nodes(args), _megascale(args, address), strict=True):
        text = _script(command, [*env, *args.env], rc)
        out.append(("run", _ssh(args, node, f"printf %s {shlex.quote(text)} > {script} && "
                                            f"cd {HOME}/src && rm -f {rc} && (setsid nohup bash "
                                            f"{script} > {log} 2>&1 < /dev/null & echo $! > "
                                            f"{HOME}/pid)")))
    return out


def steps(args, command: list[str], run: str = "RUN") -> list[tuple[str, list[str]]]:
    """Everything a launch runs, in order, for --dry_run (watching is a loop of the 'watch'
    lines: the slice's state, each host's exit file, host 0's new log bytes)."""
    out = create(args) if args.create else []
    out += [("resolve", coordinator(args))] if args.num_slices > 1 else []
    out += start(args, command, run)
    node = _nodes(args)[0]
    out += [("watch", _state(args, node)),
            ("watch", _ssh(args, node, f"cat {HOME}/{run}.rc 2>/dev/null; true", "I")),
            ("watch", _ssh(args, node, f"tail -c +OFFSET {HOME}/{run}.log", "0"))]
    return out + [("final", argv) for argv in delete(args)] * args.delete


def remove(args, dry_run: bool = False) -> None:
    """Delete the slice (or queued resource), each command shown as it runs."""
    for argv in delete(args):
        print(f"+ {shlex.join(argv)}", flush=True)
        if not dry_run:
            subprocess.run(argv)


def _state(args, node: str) -> list[str]:
    if args.queued:
        return _gcloud(args, "queued-resources", "describe", args.tpu,
                       "--format=value(state.state)")
    return _gcloud(args, "tpu-vm", "describe", node, "--format=value(state)")


def is_up(args) -> bool:
    """The slice (each node of it) is there and usable: --reuse keeps it, as a sweep's pool
    does between members."""
    ready = "ACTIVE" if args.queued else "READY"
    return all(_out(_state(args, node))[1].strip() == ready
               for node in ([args.tpu] if args.queued else _nodes(args)))


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


def hosts(args) -> list[tuple[str, int]]:
    """(node, worker) of every host of the run."""
    out = []
    for node in _nodes(args):
        code, count = _out(_gcloud(args, "tpu-vm", "describe", node,
                                   "--format=value(networkEndpoints.len())"))
        if code or not count.strip().isdigit():
            raise RuntimeError(f"cannot read the hosts of TPU VM {node}: is it there?")
        out += [(node, worker) for worker in range(int(count))]
    return out


def watch(args, run: str, workers: list[tuple[str, int]]) -> int | None:
    """Poll until every host's command has ended: its exit status (the first non-zero host's,
    PREEMPTED if any host was), or None when a slice itself is lost (preempted, deleted)."""
    shown, codes, first = 0, {}, _nodes(args)[0]
    while True:
        for node in _nodes(args) if not args.queued else [first]:
            state = _out(_state(args, node))[1].strip()
            if state not in UP:
                print(f"tpu_pod: TPU {args.tpu if args.queued else node} is {state or 'gone'}",
                      file=sys.stderr, flush=True)
                return None
        code, text = _out(_ssh(args, first, f"tail -c +{shown + 1} {HOME}/{run}.log "
                                            f"2>/dev/null", "0"))
        if not code and text:
            print(text, end="", flush=True)
            shown += len(text.encode())
        for node, worker in workers:
            if (node, worker) not in codes:
                code, text = _out(_ssh(args, node, f"cat {HOME}/{run}.rc 2>/dev/null; true",
                                       str(worker)))
                if not code and text.strip().lstrip("-").isdigit():
                    codes[node, worker] = int(text.strip())
        if len(codes) == len(workers):
            if PREEMPTED in codes.values() and set(codes.values()) <= {0, PREEMPTED}:
                return PREEMPTED
            failed = [host for host in workers if codes[host]]
            if failed:
                node, worker = failed[0]
                _, tail = _out(_ssh(args, node, f"tail -n 20 {HOME}/{run}.log", str(worker)))
                print(f"{tail}\ntpu_pod: host {worker} of {node} exited {codes[node, worker]}",
                      file=sys.stderr, flush=True)
                return codes[node, worker]
            return 0
        time.sleep(args.poll)


def save_logs(args, run: str, workers: list[tuple[str, int]], workdir: str) -> None:
    """Every host's log into WORKDIR/logs/RUN/ (a gs:// workdir too, through etils.epath)."""
    if not workdir:
        return
    from etils import epath  # a dependency of lmjax; gs:// needs its [gcs] extra

    folder = epath.Path(workdir) / "logs" / run
    folder.mkdir(parents=True, exist_ok=True)
    for node, worker in workers:
        code, text = _out(_ssh(args, node, f"cat {HOME}/{run}.log", str(worker)))
        name = f"worker-{worker}.log" if args.num_slices == 1 else \
            f"slice-{_nodes(args).index(node)}-worker-{worker}.log"
        if not code:
            (folder / name).write_text(text)
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


def check_dcn(command: list[str], slices: int) -> None:
    """An `lmjax train` command's mesh must span the slices: its mesh.dcn_* (config file and
    --config.mesh.dcn_* overrides) multiply to --num_slices, or it is refused here."""
    if command[:2] != ["lmjax", "train"]:
        return
    spec = next((w.split("=", 1)[1] for w in command if w.startswith("--config=")), "")
    if not spec:
        return
    sys.path.insert(0, ROOT)
    from lmjax import config as config_lib  # reads the file only: no JAX, no devices

    overrides = [w.removeprefix("--config.") for w in command if w.startswith("--config.")]
    mesh = config_lib.load(spec, overrides).mesh
    dcn = {k: v for k, v in mesh.items() if k.startswith("dcn_")}
    if math.prod(dcn.values()) != slices:
        given = ", ".join(f"mesh.{k}={v}" for k, v in dcn.items() if v != 1) or "all 1"
        raise ValueError(f"--num_slices={slices} but the command's mesh.dcn_* multiply to "
                         f"{math.prod(dcn.values())} ({given}); set e.g. "
                         f"--config.mesh.dcn_data={slices}.")


def launch(args, command: list[str]) -> int:
    workdir = next((w.split("=", 1)[1] for w in command if w.startswith("--workdir=")), "")
    for attempt in range(args.max_restarts + 1):
        run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}"
        address = ""
        if args.num_slices > 1:
            code, address = _out(coordinator(args))
            if code or not address.strip():
                print(f"tpu_pod: cannot read the address of {_nodes(args)[0]}", file=sys.stderr)
                return 1
        if not do(start(args, command, run, address.strip()), args.poll):
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
            for argv in delete(args):
                subprocess.run(argv, capture_output=True)
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
    parser.add_argument("--reuse", action="store_true", help="--create: keep a slice of this "
                        "name that is already up (a sweep pool's, between members)")
    parser.add_argument("--queued", action="store_true", help="--create/--delete as a queued "
                        "resource (waits for capacity)")
    parser.add_argument("--spot", action="store_true", help="--create a spot (preemptible) slice")
    parser.add_argument("--num_slices", type=int, default=1, help="K slices NAME-0.. as one "
                        "job (Multislice); the config's mesh.dcn_* must multiply to K")
    parser.add_argument("--delete", action="store_true", help="delete the slice at the end")
    parser.add_argument("--max_restarts", type=int, default=3, help="re-creations and restarts "
                        "after preemptions before giving up (exit 75)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE exported on "
                        "every host (LIBTPU_INIT_ARGS, XLA_FLAGS, ...); repeat for more")
    parser.add_argument("--poll", type=float, default=30, help="seconds between checks")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command and args.delete:  # nothing to run: only delete (a sweep's pool, at its end)
        remove(args, args.dry_run)
        return 0
    if not command:
        parser.error("the command after -- is empty")
    try:
        if args.num_slices < 1:
            raise ValueError(f"--num_slices={args.num_slices} must be at least 1.")
        check_dcn(command, args.num_slices)
        plan = steps(args, command)
    except ValueError as e:
        parser.error(str(e))
    # Ctrl-C must reach us (to delete the slice) even if the parent left SIGINT blocked or
    # ignored, as its children inherit both: a scheduler, or a test process's libraries
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.dry_run:
        print("\n".join(shlex.join(a) + {"poll": "  # until it prints ACTIVE",
                                         "resolve": "  # -> IP_OF_SLICE_0_HOST_0",
                                         "watch": "  # polled"}.get(w, "") for w, a in plan))
        return 0
    try:
        if args.create and not (args.reuse and is_up(args)) and not do(create(args),
                                                                         args.poll):
            return 1
        return launch(args, command)
    except KeyboardInterrupt:
        print("tpu_pod: interrupted; the command goes on running on the hosts unless --delete",
              file=sys.stderr)
        return 130
    finally:
        if args.delete:
            remove(args)


if __name__ == "__main__":
    sys.exit(main())
