"""`lmjax sample --workdir=DIR --prompt=TEXT`: continue each prompt with the run's model,
streamed to the terminal."""

from absl import flags

from lmjax import sample
from lmjax.cli import common

common.define_workdir()
common.define_step("sample from")
flags.DEFINE_multi_string("prompt", [], "text to continue (repeat for a batch)")
flags.DEFINE_integer("max_new_tokens", 200, "tokens generated after each prompt")
flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 0.95, "keep the smallest set of tokens with this mass")
flags.DEFINE_integer("seed", 0, "random seed")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    sample.main(common.require_workdir("sample"), FLAGS.prompt, step=FLAGS.step,
                max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
