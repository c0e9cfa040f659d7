"""`lmjax plan --config=FILE [--devices=N | --topology=v5p-64] [--max_batch] [--search]`:
compile the train step ahead of time for devices this host need not have; print memory,
collectives and the roofline; with --max_batch the largest batch that fits, with --search the
mesh and remat that fit fastest (lmjax/sizing.py)."""

from absl import flags

from lmjax import chips, plan, sizing
from lmjax.cli import common

common.define_config()
flags.DEFINE_integer("devices", 1, "how many fake CPU devices (or, with --platform=gpu, this "
                     "host's GPUs) to compile for")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "what --devices are: fake CPU devices, "
                  "or this host's GPUs (JAX compiles for a GPU only where it has one)")
flags.DEFINE_string("topology", "", "TPU topology to compile for from this host, e.g. "
                    "v5p-64, v4-32, v5e-16, v6e-8 or v5p:4x4x2 (needs libtpu); default: "
                    "--devices fake CPU devices")
flags.DEFINE_integer("slices", 1, "copies of --topology joined over DCN (multi-slice; "
                     "set the mesh.dcn_* keys to match)")
flags.DEFINE_bool("max_batch", False, "find the largest global batch whose step fits "
                  "(one compile per probe; after --search, for its best row)")
flags.DEFINE_bool("search", False, "compile every data x fsdp x tensor split of the chips "
                  "under each --remats policy and rank those that fit by their roofline")
flags.DEFINE_list("remats", list(sizing.REMATS), "model.remat policies --search tries")
flags.DEFINE_bool("zero1", True, "--search: also try every mesh with data > 1 with ZeRO-1 "
                  "(mesh.shard_optimizer); --nozero1 keeps it off")
flags.DEFINE_float("hbm_gib", 0.0, "size against this much memory per device instead of "
                   "the chip's datasheet HBM (headroom; fake CPU devices standing in)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    # devices before the config, which may start JAX
    devices = (chips.tpu_devices(FLAGS.topology, FLAGS.slices) if FLAGS.topology
               else chips.gpu_devices(FLAGS.devices) if FLAGS.platform == "gpu"
               else chips.cpu_devices(FLAGS.devices))
    cfg = common.load_config(overrides)
    hbm = int(FLAGS.hbm_gib * 2**30) or None
    if FLAGS.search:
        rows = sizing.search(cfg, devices, tuple(FLAGS.remats), hbm, zero1=FLAGS.zero1)
        print(sizing.search_report(rows, hbm))
        best = next((r for r in rows if r["fits"] and r["step_s"] is not None), None)
        if best is None or not FLAGS.max_batch:
            return
        cfg = sizing.candidate(cfg, best["mesh"], best["remat"])
    if FLAGS.max_batch:
        found = sizing.max_batch(cfg, devices, hbm)
        if found["plan"] is not None:
            print(plan.report(found["plan"]))
        print(sizing.max_batch_report(found))
        return
    print(plan.report(plan.plan(cfg, devices, hbm)))
