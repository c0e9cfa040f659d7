"""Run one command as N real JAX processes on this machine, each with its own fake CPU devices.

    python launch/multiprocess_local.py 2 [--devices_per_process=4] -- lmjax train \\
        --config=configs/smoke.py --workdir=/tmp/mp --config.mesh.data=1 --config.mesh.fsdp=8

A multi-host run, debugged on a laptop: the processes meet through a coordinator on
127.0.0.1 (lmjax/distributed.py reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, set here per process) and talk over gloo, as hosts of a pod do over their
network. Process 0's output is shown and every process's goes to <logdir>/process_<i>.log.
If one process fails the others are killed (a dead peer would stop them anyway, after the
heartbeat timeout) and this exits non-zero naming it. Ctrl-C or SIGTERM is passed on to every
process, so `lmjax train` saves a checkpoint at a step they agree on and stops (exit 75).
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

PREEMPTED = 75  # what `lmjax train` exits with after saving at a preemption notice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(num_processes: int, devices_per_process: int, port: int,
             command: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) of each process."""
    if command[:1] == ["lmjax"] and shutil.which("lmjax") is None:  # not installed: the module
        command = [sys.executable, "-m", "lmjax", *command[1:]]
    count = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    flags = " ".join([*kept, f"{count}={devices_per_process}"])
    return [({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
              "JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(i),
              "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}, command)
            for i in range(num_processes)]


def _shell(env: dict[str, str], argv: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def _tee(pipe, log, show: bool) -> None:
    for line in iter(pipe.readline, b""):
        log.write(line)
        log.flush()
        if show:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def run(specs: list[tuple[dict[str, str], list[str]]], logdir: str) -> int:
    """Start every process, wait for all; 0 if all succeed, 75 if they were preempted (saved
    and stopped), else 1 after killing the rest."""
    os.makedirs(logdir, exist_ok=True)
    procs, threads = [], []
    for i, (env, argv) in enumerate(specs):
        log = open(os.path.join(logdir, f"process_{i}.log"), "wb")  # noqa: SIM115 - tee owns it
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        threads.append(threading.Thread(target=_tee, args=(proc.stdout, log, i == 0),
                                        daemon=True))
        threads[-1].start()
        procs.append(proc)
    forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, code in enumerate(codes) if code not in (None, 0, PREEMPTED)]
            if failed or None not in codes:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in threads:
            t.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not failed:  # every process preempted (they saved one step together): say so too
        return PREEMPTED if PREEMPTED in (p.returncode for p in procs) else 0
    first = failed[0]
    path = os.path.join(logdir, f"process_{first}.log")
    with open(path, errors="replace") as f:
        tail = "".join(f.readlines()[-15:])
    print(f"{tail}\nmultiprocess_local: process {first} of {len(procs)} failed with exit code "
          f"{procs[first].returncode}; stopped the others. Logs: {logdir}/process_<i>.log",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("num_processes", type=int)
    parser.add_argument("--devices_per_process", type=int, default=4,
                        help="fake CPU devices each process sees")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--logdir", default="multiprocess_logs", help="one log per process")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        ours, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    else:  # the command starts at the first word after N that is not an --option=value
        start = next((i for i, a in enumerate(argv) if i and not a.startswith("-")), len(argv))
        ours, command = argv[:start], argv[start:]
    args = parser.parse_args(ours)
    if not command:
        parser.error("give the command to run after the options, e.g. -- lmjax train ...")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("num_processes and --devices_per_process must be at least 1")
    specs = commands(args.num_processes, args.devices_per_process, args.port or free_port(),
                     command)
    if args.dry_run:
        print("\n".join(f"{_shell(env, argv)} > {args.logdir}/process_{i}.log"
                        for i, (env, argv) in enumerate(specs)))
        return 0
    return run(specs, args.logdir)


if __name__ == "__main__":
    sys.exit(main())
