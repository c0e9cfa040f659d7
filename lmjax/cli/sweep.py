"""`lmjax sweep --sweep=FILE --root=DIR`: train every member of FILE's get_sweep() in its own
workdir under DIR; finished members are skipped and the rest resume."""

import sys

from absl import app, flags

from lmjax.scaling import sweep

flags.DEFINE_string("sweep", None, "a config file that also has get_sweep()")
flags.DEFINE_string("root", None, "folder or gs:// URL holding one workdir per sweep member")
flags.DEFINE_enum("runner", "local", ["local", "tpu"], "where members train")
flags.DEFINE_integer("parallel", 1, "members trained at once (local runner)")
flags.DEFINE_bool("dry_run", False, "print the members' commands, run nothing")
flags.DEFINE_bool("status", False, "print each member's state (done, running where, failed, "
                  "pending) and run nothing")
flags.DEFINE_string("tpu", "", "--runner=tpu: the pool of TPU VM slices, NAME[,NAME...]; each "
                    "trains one member at a time")
flags.DEFINE_integer("tpu_count", 0, "--runner=tpu: a pool of this many slices NAME-0 .. "
                     "NAME-(K-1) that the sweep creates (as --tpu_flags say), keeps busy and "
                     "deletes at its end; 0: --tpu names slices that exist")
flags.DEFINE_string("tpu_flags", "", "--runner=tpu: launch/tpu_pod.py flags for every member's "
                    "launch, e.g. '--accelerator=v5p-8 --spot --queued --zone=us-east5-a'")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    if not FLAGS.root or not FLAGS.sweep:
        raise app.UsageError("sweep needs --root and --sweep=FILE.")
    if FLAGS.status:
        print(sweep.status_table(FLAGS.sweep, FLAGS.root))
        return
    try:
        if FLAGS.runner == "tpu":
            status = sweep.run_tpu(FLAGS.sweep, FLAGS.root, FLAGS.tpu, FLAGS.dry_run,
                                   count=FLAGS.tpu_count, pod_flags=FLAGS.tpu_flags)
        else:
            status = sweep.run_local(FLAGS.sweep, FLAGS.root, FLAGS.parallel, FLAGS.dry_run)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, exit status 1
        sys.exit(f"lmjax sweep: {e.args[0] if e.args else 'interrupted.'}")
    failed = sorted(f"{name}{' (preempted)' * (s == 'preempted')}" for name, s in status.items()
                    if s in ("failed", "preempted"))
    if failed:
        raise ValueError(f"{len(failed)} member(s) did not finish: {', '.join(failed)} (see "
                         "their train.log); re-run the same command to retry them.")
