"""`lmjax coord-check --config=FILE --widths=64,128,256,512 --steps=5 --out=DIR`: activation
scale against width under SP and μP (flat under μP: the parametrization is wired right)."""

from absl import flags

from lmjax import coord_check
from lmjax.cli import common

common.define_config()
flags.DEFINE_list("widths", ["64", "128", "256", "512"], "d_model values to train")
flags.DEFINE_integer("steps", 10, "steps trained at each width")
flags.DEFINE_string("out", "", "folder for the JSON and figures")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    common.need("out")  # the JSON and figures go there
    results = coord_check.run(common.load_config(overrides), [int(w) for w in FLAGS.widths],
                              FLAGS.steps, FLAGS.out)
    print(coord_check.report(results, FLAGS.steps))
    print(f"Figures: {FLAGS.out}/coord_check_sp.png, {FLAGS.out}/coord_check_mup.png")
