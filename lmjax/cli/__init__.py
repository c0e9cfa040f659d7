"""`lmjax <command> --config=configs/x.py[:arg] [--config.a.b=value ...] [flags]`.

Each command is a module of this package that defines its own flags and `run(args, overrides)`;
only the chosen one is imported, so `lmjax <command> --help` lists that command's flags. Config
overrides are taken out of argv before absl parses the rest, so that a mistyped key gets one
sentence naming it (and a close match) instead of a traceback.
"""

import importlib
import sys

from absl import app, flags, logging

from lmjax import lease
from lmjax.backends import cpu_host

# command -> (its module in lmjax/cli/, one line of usage)
COMMANDS = {
    "train": ("train", "train a model in --workdir (resumes if it holds a checkpoint)"),
    "info": ("info", "print parameter counts and FLOPs per token of a config"),
    "bench": ("bench", "measure training throughput of a named model on synthetic data"),
    "sweep": ("sweep", "train every member of --sweep=FILE under --root (skips finished, "
                       "resumes the rest)"),
    "fit": ("fit", "fit scaling laws to the runs under --root or in --table; write results, "
                   "table and figures; --plan_flops plans a budget"),
    "tokenizer": ("tokenizer", "tokenizer train --input=GLOB|lang=GLOB,... --vocab_size=N "
                               "--out=PREFIX [--model_type=unigram --language_alpha=0.3] | "
                               "tokenizer fertility --tokenizer=PATH --input=lang=GLOB,..."),
    "data": ("data", "data build --input=GLOB --name=NAME --data_dir=DIR | data corpus --out=DIR "
                     "| data multilingual --out=DIR | data bench --input=GLOB --tokenizer=PATH"),
    "eval": ("eval", "loss, perplexity, bits/byte, accuracy (± s.e.) of --workdir "
                     "[--split|--text]"),
    "sample": ("sample", "continue --prompt=TEXT with the model of --workdir, streamed to the "
                         "terminal"),
    "convert": ("convert", "--from_hf=HF_DIR --workdir=OUT | --to_hf --workdir=DIR --out=HF_DIR"),
    "plan": ("plan", "compile the train step for --devices fake CPU devices; memory and "
                     "collectives"),
    "coord-check": ("coord_check", "--config=FILE --widths=64,128,256,512 --steps=5 --out=DIR: "
                                   "activation scale vs width under SP and μP (flat under μP)"),
}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv without its `--config.a.b=value` items, and those items as `a.b=value`."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a real process (console script, python -m lmjax), not a caller's test
        cpu_host.prepare(sys.argv)  # may re-execute this process: before anything else
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        usage = "\n".join(f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items())
        given = f"Unknown command {argv[1]!r}. " if len(argv) > 1 else ""
        sys.exit(f"{given}Usage: lmjax <command> [flags]\n{usage}")
    command = argv.pop(1)
    module = importlib.import_module(f"lmjax.cli.{COMMANDS[command][0]}")  # defines its flags
    for flag in flags.FLAGS.get_key_flags_for_module(module):  # what absl's --help lists
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    rest, overrides = split_overrides(argv)

    def absl_main(args):
        if not any(a.startswith(("--verbosity", "-v")) for a in rest):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        try:
            module.run(args[1:], overrides)
        # OSError: a missing file, a full disk, a folder without permission; its text names it
        except (ValueError, KeyError, OSError, FloatingPointError, lease.Busy) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            sys.exit(f"lmjax {command}: {message}")
        except KeyboardInterrupt:  # Ctrl-C (train has saved at a step boundary first): as a shell
            sys.exit(130)

    app.run(absl_main, argv=rest)
