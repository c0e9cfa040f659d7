"""`lmjax train --config=FILE --workdir=DIR`: train, or resume the run in DIR."""

from absl import flags

from lmjax import distributed, train
from lmjax.cli import common

common.define_config()
common.define_workdir()
flags.DEFINE_bool("force_resume", False,
                  "continue a workdir (or fork a train.fork_from) whose config.json differs "
                  "in keys that matter or in the learning rate of steps already taken")
flags.DEFINE_string("coordinator", "", "HOST:PORT of process 0 in a multi-process run "
                    "(default: $JAX_COORDINATOR_ADDRESS, or a TPU pod / SLURM / Open MPI "
                    "cluster JAX detects; none: one process)")
flags.DEFINE_integer("num_processes", 0, "processes in the run (default: "
                     "$JAX_NUM_PROCESSES or the detected cluster's)")
flags.DEFINE_integer("process_id", -1, "this process's index, 0 is the coordinator "
                     "(default: $JAX_PROCESS_ID or the detected cluster's)")
flags.DEFINE_string("local_device_ids", "", "comma-separated numbers of the GPUs this process "
                    "drives in a multi-process run (default: $JAX_LOCAL_DEVICE_IDS, else 0 where "
                    "CUDA_VISIBLE_DEVICES names one GPU, else with --coordinator the GPU numbered "
                    "$SLURM_LOCALID or $LOCAL_RANK, else JAX's choice)")
flags.DEFINE_integer("init_timeout", 300, "seconds to wait for every process to join")
flags.DEFINE_integer("heartbeat_timeout", 100, "seconds without a heartbeat after which "
                     "a process counts as dead and the others stop")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    workdir = common.require_workdir("train")
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.init_timeout, FLAGS.heartbeat_timeout,
                           FLAGS.local_device_ids)  # before any device
    with distributed.stop_on_lost_peer():
        train.run(common.load_config(overrides), workdir, force_resume=FLAGS.force_resume)
