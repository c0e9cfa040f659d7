"""Submit one command as a multi-node GPU job on SLURM, from launch/slurm.sbatch.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 [--partition=P --account=A
        --time=24:00:00 --venv=.venv] [--dry_run] -- lmjax train --config=... --workdir=/shared/run

Renders the sbatch script (`--dry_run` prints it and submits nothing), writes it to
<logdir>/<job_name>.sbatch and submits it with `sbatch`. The job runs one task per GPU, as JAX's
SLURM detection expects (a task per node would see only its node's first GPU), every task the
same command; the workdir must be on a filesystem all nodes share. XLA_FLAGS gains the
collective-overlap flags MaxText and NVIDIA use on GPUs (OVERLAP_XLA_FLAGS; --plain_xla: none).
With --requeue, a job that is preempted or reaches --time saves (its tasks get SIGTERM) and goes
back to the queue, and the same command resumes it from the checkpoint.
"""

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "launch", "slurm.sbatch")
# XLA:GPU's collectives overlapped with compute, as NVIDIA's JAX-Toolbox (GPU_performance.md)
# and MaxText's GPU recipes set them: the latency-hiding scheduler on a high-priority stream,
# FSDP's all-gathers and reduce-scatters (and DP's all-reduces) pipelined across the scan over
# layers, whose loop is double-buffered, and collectives combined up to these sizes. Each flag
# is one this jaxlib's XLA knows (an unknown one aborts every task: tests/test_launch.py).
OVERLAP_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
)


def render(args, command: list[str]) -> str:
    if command[:1] == ["lmjax"]:  # the venv's interpreter, whatever PATH the nodes have
        command = ["python", "-m", "lmjax", *command[1:]]
    extra = [f"#SBATCH --{key}={value}" for key, value in
             (("partition", args.partition), ("account", args.account)) if value]
    if args.requeue:  # SIGTERM to every task before the limit; preempted jobs come back
        extra += ["#SBATCH --requeue", f"#SBATCH --signal=TERM@{args.signal_seconds}"]
    with open(TEMPLATE) as f:
        return f.read().format(
            job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task, time=args.time, logdir=os.path.abspath(args.logdir),
            extra="\n".join(extra), root=shlex.quote(ROOT), requeue=int(args.requeue),
            activate=f"source {shlex.quote(os.path.abspath(args.venv))}/bin/activate"
            if args.venv else "", command=shlex.join(command),
            xla_flags="" if args.plain_xla else  # after them the user's own, which win
            f'export XLA_FLAGS="{" ".join(OVERLAP_XLA_FLAGS)} ${{XLA_FLAGS:-}}"')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("slurm: give the command after --, e.g. -- lmjax train --config=...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--cpus_per_task", type=int, default=8, help="data loading threads")
    parser.add_argument("--time", default="24:00:00", help="wall-clock limit")
    parser.add_argument("--partition", default="", help="default: the cluster's")
    parser.add_argument("--account", default="", help="default: the user's")
    parser.add_argument("--job_name", default="lmjax")
    parser.add_argument("--venv", default="", help="virtual environment to activate on nodes")
    parser.add_argument("--logdir", default="logs", help="job output and the rendered script")
    parser.add_argument("--requeue", action="store_true", help="requeue the job when it is "
                        "preempted or nears --time: the tasks save at SIGTERM and exit 75")
    parser.add_argument("--signal_seconds", type=int, default=300, help="--requeue: SIGTERM "
                        "this long before the time limit (enough for a save)")
    parser.add_argument("--plain_xla", action="store_true", help="leave out the XLA:GPU "
                        "flags that overlap collectives with compute (OVERLAP_XLA_FLAGS)")
    parser.add_argument("--dry_run", action="store_true", help="print the script only")
    args = parser.parse_args(argv[:cut])
    if not argv[cut + 1:]:
        parser.error("the command after -- is empty")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus_per_node must be at least 1")
    script = render(args, argv[cut + 1:])
    if args.dry_run:
        print(script, end="")
        return 0
    os.makedirs(args.logdir, exist_ok=True)
    path = os.path.join(args.logdir, f"{args.job_name}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    print(f"+ sbatch {path}")
    return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
    sys.exit(main())
