"""`lmjax <command> --config=configs/x.py[:arg] [--config.a.b=value ...] [flags]`.

Config overrides are taken out of argv before absl parses the rest, so that a mistyped key gets
one sentence naming it (and a close match) instead of a traceback.
"""

import sys

from absl import app, flags, logging

COMMANDS = {
    "train": "train a model in --workdir (resumes if it holds a checkpoint)",
    "info": "print parameter counts and FLOPs per token of a config",
    "bench": "measure training throughput of a named model on synthetic data",
}

flags.DEFINE_string("config", None, "Config file, optionally with an argument: configs/x.py:arg")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, metrics.jsonl")
flags.DEFINE_string("model", "bench", "bench: the named model to measure")
flags.DEFINE_integer("devices", 1, "bench: how many devices to use")
flags.DEFINE_integer("steps", 10, "bench: timed steps after warm-up")
FLAGS = flags.FLAGS


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def _load_config(overrides: list[str]):
    from lmjax import config

    if not FLAGS.config:
        raise app.UsageError("--config=configs/x.py[:arg] is required.")
    return config.load(FLAGS.config, overrides)


def _run(command: str, overrides: list[str]) -> None:
    if command == "train":
        from lmjax import train

        if not FLAGS.workdir:
            raise app.UsageError("--workdir is required for train.")
        train.run(_load_config(overrides), FLAGS.workdir)
    elif command == "info":
        from lmjax import flops

        print(flops.report(_load_config(overrides)))
    elif command == "bench":
        from lmjax import bench

        bench.main(FLAGS.model, FLAGS.devices, FLAGS.steps, overrides)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        usage = "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items())
        given = f"Unknown command {argv[1]!r}. " if len(argv) > 1 else ""
        sys.exit(f"{given}Usage: lmjax <command> [flags]\n{usage}")
    command = argv.pop(1)
    rest, overrides = _split_overrides(argv)

    def absl_main(_):
        if not any(a.startswith(("--verbosity", "-v")) for a in rest):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        try:
            _run(command, overrides)
        except (ValueError, KeyError, FileNotFoundError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            sys.exit(f"lmjax {command}: {message}")

    app.run(absl_main, argv=rest)
