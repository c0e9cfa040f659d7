"""Flags and steps that several commands share. The flags are defined by the commands that call
these helpers (absl then lists them under that command's --help), never at import."""

import ml_collections
from absl import app, flags

flags.disclaim_key_flags()  # a flag defined here belongs to the command module that asked for it
FLAGS = flags.FLAGS


def define_config() -> None:
    flags.DEFINE_string("config", None,
                        "Config file, optionally with an argument: configs/x.py:arg")


def define_workdir() -> None:
    flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, metrics.jsonl")


def define_step(what: str) -> None:
    flags.DEFINE_integer("step", None, f"checkpoint step to {what} (default: last)")


def load_config(overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of --config with the command line's `a.b=value` overrides, and train.steps
    from its token or FLOP budget if it sets one."""
    from lmjax import validate  # the model and pipeline: not for tokenizer and data commands

    if not FLAGS.config:
        raise app.UsageError("--config=configs/x.py[:arg] is required.")
    return validate.load(FLAGS.config, overrides)


def require_workdir(command: str) -> str:
    if not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for {command}.")
    return FLAGS.workdir


def need(*names: str) -> None:
    """One sentence naming every missing flag of a subcommand."""
    missing = [f"--{n}" for n in names if not FLAGS[n].value]
    if missing:
        raise ValueError(f"Missing {', '.join(missing)}.")
