"""`lmjax plan --config=FILE [--devices=N | --topology=v5p-64]`: compile the train step ahead of
time for devices this host need not have; print memory and collectives."""

from absl import flags

from lmjax import plan
from lmjax.cli import common

common.define_config()
flags.DEFINE_integer("devices", 1, "how many fake CPU devices to compile for")
flags.DEFINE_string("topology", "", "TPU topology to compile for from this host, e.g. "
                    "v5p-64, v4-32, v5e-16, v6e-8 or v5p:4x4x2 (needs libtpu); default: "
                    "--devices fake CPU devices")
flags.DEFINE_integer("slices", 1, "copies of --topology joined over DCN (multi-slice; "
                     "set the mesh.dcn_* keys to match)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    # devices before the config, which may start JAX
    devices = (plan.tpu_devices(FLAGS.topology, FLAGS.slices) if FLAGS.topology
               else plan.cpu_devices(FLAGS.devices))
    print(plan.report(plan.plan(common.load_config(overrides), devices)))
