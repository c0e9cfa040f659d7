"""`lmjax info --config=FILE`: parameter counts and FLOPs per token, nothing compiled."""

from lmjax import flops
from lmjax.cli import common

common.define_config()


def run(args: list[str], overrides: list[str]) -> None:
    print(flops.report(common.load_config(overrides)))
