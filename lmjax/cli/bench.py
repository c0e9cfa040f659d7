"""`lmjax bench --model=bench --devices=N [--config.a.b=value]`: training throughput of a named
model on synthetic data; a table, then one JSON line."""

from absl import flags

from lmjax import bench

flags.DEFINE_string("model", "bench", "the named model to measure")
flags.DEFINE_integer("devices", 1, "how many devices to use")
flags.DEFINE_integer("cpu_devices", 0, "on CPU: fake devices the client makes (default: "
                     "--devices); --devices=1 --cpu_devices=8 times one device under the "
                     "8-device client's thread pool")
flags.DEFINE_integer("steps", 10, "timed steps after warm-up")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    bench.main(FLAGS.model, FLAGS.devices, FLAGS.steps, overrides, FLAGS.cpu_devices)
