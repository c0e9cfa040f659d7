"""`lmjax <command> --config=configs/x.py[:arg] [--config.a.b=value ...] [flags]`.

Config overrides are taken out of argv before absl parses the rest, so that a mistyped key gets
one sentence naming it (and a close match) instead of a traceback.
"""

import json
import os
import sys

from absl import app, flags, logging

COMMANDS = {
    "train": "train a model in --workdir (resumes if it holds a checkpoint)",
    "info": "print parameter counts and FLOPs per token of a config",
    "bench": "measure training throughput of a named model on synthetic data",
    "sweep": "train every member of --sweep=FILE under --root (skips finished, resumes the rest)",
    "fit": "fit scaling laws to the runs under --root; write results, table and figures",
    "tokenizer": "tokenizer train --input=GLOB|lang=GLOB,... --vocab_size=N --out=PREFIX "
                 "[--model_type=unigram --language_alpha=0.3] | tokenizer fertility "
                 "--tokenizer=PATH --input=lang=GLOB,...",
    "data": "data build --input=GLOB --name=NAME --data_dir=DIR | data corpus --out=DIR "
            "| data multilingual --out=DIR "
            "| data bench --input=GLOB --tokenizer=PATH",
    "eval": "loss, perplexity, bits/byte, accuracy (± s.e.) of --workdir [--split|--text]",
    "sample": "continue --prompt=TEXT with the model of --workdir, streamed to the terminal",
    "convert": "--from_hf=HF_DIR --workdir=OUT | --to_hf --workdir=DIR --out=HF_DIR",
    "plan": "compile the train step for --devices fake CPU devices; memory and collectives",
    "coord-check": "--config=FILE --widths=64,128,256,512 --steps=5 --out=DIR: activation "
                   "scale vs width under SP and μP (flat under μP)",
}

flags.DEFINE_string("config", None, "Config file, optionally with an argument: configs/x.py:arg")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, metrics.jsonl")
flags.DEFINE_bool("force_resume", False,
                  "train: continue a workdir whose config.json differs in keys that matter")
flags.DEFINE_string("coordinator", "", "train: HOST:PORT of process 0 in a multi-process run "
                    "(default: $JAX_COORDINATOR_ADDRESS, or a TPU pod / SLURM / Open MPI "
                    "cluster JAX detects; none: one process)")
flags.DEFINE_integer("num_processes", 0, "train: processes in the run (default: "
                     "$JAX_NUM_PROCESSES or the detected cluster's)")
flags.DEFINE_integer("process_id", -1, "train: this process's index, 0 is the coordinator "
                     "(default: $JAX_PROCESS_ID or the detected cluster's)")
flags.DEFINE_integer("init_timeout", 300, "train: seconds to wait for every process to join")
flags.DEFINE_integer("heartbeat_timeout", 100, "train: seconds without a heartbeat after which "
                     "a process counts as dead and the others stop")
flags.DEFINE_string("model", "bench", "bench: the named model to measure")
flags.DEFINE_integer("devices", 1, "bench, plan: how many devices to use")
flags.DEFINE_integer("cpu_devices", 0, "bench on CPU: fake devices the client makes (default: "
                     "--devices); --devices=1 --cpu_devices=8 times one device under the "
                     "8-device client's thread pool")
flags.DEFINE_string("topology", "", "plan: TPU topology to compile for from this host, e.g. "
                    "v5p-64, v4-32, v5e-16, v6e-8 or v5p:4x4x2 (needs libtpu); default: "
                    "--devices fake CPU devices")
flags.DEFINE_integer("slices", 1, "plan: copies of --topology joined over DCN (multi-slice; "
                     "set the mesh.dcn_* keys to match)")
flags.DEFINE_integer("steps", 10, "bench: timed steps after warm-up; coord-check: steps trained")
flags.DEFINE_list("widths", ["64", "128", "256", "512"], "coord-check: d_model values to train")
flags.DEFINE_string("sweep", None, "sweep: a config file that also has get_sweep()")
flags.DEFINE_string("root", None, "sweep, fit: folder holding one workdir per sweep member")
flags.DEFINE_enum("runner", "local", ["local", "tpu"], "sweep: where members train")
flags.DEFINE_integer("parallel", 1, "sweep: members trained at once (local runner)")
flags.DEFINE_bool("dry_run", False, "sweep: print the members' commands, run nothing")
flags.DEFINE_string("tpu", "", "sweep: TPU VM name for --runner=tpu")
flags.DEFINE_string("method", "all", "fit: kaplan_n | kaplan_d | kaplan_c | approach1 | "
                    "approach2 | approach3 | all")
flags.DEFINE_string("params", "non_embedding", "fit: N is 'non_embedding', 'total' or "
                    "'kaplan' (no embedding or unembedding table) params")
flags.DEFINE_integer("bootstrap", 200, "fit: bootstrap resamples for 95% intervals (0 = none)")
flags.DEFINE_string("out", "", "fit: output folder (default <root>/fit); coord-check: folder")
flags.DEFINE_string("input", None, "tokenizer, data: text files (a glob or a directory)")
flags.DEFINE_integer("vocab_size", 8192, "tokenizer train: vocabulary size")
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "tokenizer train: SentencePiece model")
flags.DEFINE_float("language_alpha", 0.3, "tokenizer train with --input=lang=GLOB,...: sample "
                   "language i with probability proportional to its lines^alpha (mT5, XLM-R)")
flags.DEFINE_string("name", None, "data build: TFDS dataset name (snake_case)")
flags.DEFINE_string("data_dir", None, "data build: TFDS data_dir to write into")
flags.DEFINE_enum("per", "file", ["file", "paragraph"], "data build: one document per file or "
                  "per blank-line-separated paragraph")
flags.DEFINE_float("eval_fraction", 0.05, "data build: last fraction of documents held out")
flags.DEFINE_string("cache", "~/.cache/lmjax/corpus", "data corpus: downloaded .debs, unpacked")
flags.DEFINE_string("tokenizer", None, "data bench: SentencePiece .model to encode with")
flags.DEFINE_integer("step", None, "eval, sample, convert --to_hf: checkpoint step (default: last)")
flags.DEFINE_enum("split", "eval", ["eval", "train", "all"], "eval: which part of the run's text")
flags.DEFINE_string("text", None, "eval: score all of these UTF-8 files (shipped name or glob)")
flags.DEFINE_integer("batches", 0, "eval: at most this many global batches (0 = all rows)")
flags.DEFINE_multi_integer("stride", [], "eval: slide windows of data.seq_len tokens this many "
                           "at a time (1..seq_len; repeat for a table of perplexity by stride)")
flags.DEFINE_multi_string("prompt", [], "sample: text to continue (repeat for a batch)")
flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens generated after each prompt")
flags.DEFINE_float("temperature", 0.8, "sample: softmax temperature; 0 = greedy")
flags.DEFINE_integer("top_k", 0, "sample: keep the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 0.95, "sample: keep the smallest set of tokens with this mass")
flags.DEFINE_integer("seed", 0, "sample: random seed")
flags.DEFINE_string("from_hf", None, "convert: Hugging Face directory to import into --workdir")
flags.DEFINE_bool("to_hf", False, "convert: export --workdir to a Hugging Face directory --out")
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


def _run(command: str, overrides: list[str], args: list[str] = ()) -> None:
    if command in ("eval", "sample", "convert"):
        _inference(command, overrides)
    elif command in ("tokenizer", "data"):
        from lmjax.data import commands

        commands.run(command, list(args), FLAGS)
    elif command == "train":
        from lmjax import distributed, train

        if not FLAGS.workdir:
            raise app.UsageError("--workdir is required for train.")
        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                               FLAGS.init_timeout, FLAGS.heartbeat_timeout)  # before any device
        with distributed.stop_on_lost_peer():
            train.run(_load_config(overrides), FLAGS.workdir, force_resume=FLAGS.force_resume)
    elif command == "info":
        from lmjax import flops

        print(flops.report(_load_config(overrides)))
    elif command == "plan":
        from lmjax import plan

        # devices before the config, which may start JAX
        devices = (plan.tpu_devices(FLAGS.topology, FLAGS.slices) if FLAGS.topology
                   else plan.cpu_devices(FLAGS.devices))
        print(plan.report(plan.plan(_load_config(overrides), devices)))
    elif command == "coord-check":
        from lmjax import coord_check

        if not FLAGS.out:
            raise app.UsageError("coord-check needs --out=DIR for its JSON and figures.")
        results = coord_check.run(_load_config(overrides), [int(w) for w in FLAGS.widths],
                                  FLAGS.steps, FLAGS.out)
        print(coord_check.report(results, FLAGS.steps))
        print(f"Figures: {FLAGS.out}/coord_check_sp.png, {FLAGS.out}/coord_check_mup.png")
    elif command == "bench":
        from lmjax import bench

        bench.main(FLAGS.model, FLAGS.devices, FLAGS.steps, overrides, FLAGS.cpu_devices)
    elif command in ("sweep", "fit"):
        if not FLAGS.root or (command == "sweep" and not FLAGS.sweep):
            raise app.UsageError(f"{command} needs --root" + (" and --sweep=FILE." if command ==
                                                              "sweep" else "."))
        if command == "fit":
            from lmjax.scaling import report

            print(report.summary(report.analyze(FLAGS.root, FLAGS.method, FLAGS.out,
                                                FLAGS.params, FLAGS.bootstrap)))
            return
        from lmjax.scaling import sweep

        try:
            if FLAGS.runner == "tpu":
                status = sweep.run_tpu(FLAGS.sweep, FLAGS.root, FLAGS.tpu, FLAGS.dry_run)
            else:
                status = sweep.run_local(FLAGS.sweep, FLAGS.root, FLAGS.parallel, FLAGS.dry_run)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, exit status 1
            sys.exit(f"lmjax sweep: {e.args[0] if e.args else 'interrupted.'}")
        failed = sorted(name for name, s in status.items() if s == "failed")
        if failed:
            raise ValueError(f"{len(failed)} member(s) failed: {', '.join(failed)} (see their "
                             "train.log); re-run the same command to retry them.")


def _inference(command: str, overrides: list[str]) -> None:
    if not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for {command}.")
    if command == "eval":
        from lmjax import evaluate

        results = [evaluate.evaluate(FLAGS.workdir, split=FLAGS.split, text=FLAGS.text,
                                     step=FLAGS.step, batches=FLAGS.batches,
                                     overrides=tuple(overrides), stride=stride)
                   for stride in FLAGS.stride or [None]]
        for result in results:
            print(evaluate.report(result))
            print(json.dumps(result))
        if len(results) > 1 and all("eval/stride" in r for r in results):  # not a mixture
            print(evaluate.stride_table(results))
    elif command == "sample":
        from lmjax import sample

        sample.main(FLAGS.workdir, FLAGS.prompt, step=FLAGS.step,
                    max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    else:
        from lmjax.interop import hf

        if bool(FLAGS.from_hf) == FLAGS.to_hf or (FLAGS.to_hf and not FLAGS.out):
            raise app.UsageError("convert needs --from_hf=HF_DIR, or --to_hf with --out=HF_DIR.")
        if FLAGS.from_hf:
            hf.convert_from_hf(FLAGS.from_hf, FLAGS.workdir)
        else:
            hf.convert_to_hf(FLAGS.workdir, FLAGS.out, FLAGS.step)


# glibc's malloc hands every buffer over 32 MiB straight back to the kernel when it is freed, so
# XLA:CPU's per-step temporaries (one 445 MB buffer for the bench model) page-fault back in,
# zeroed, 4 KiB at a time, on every step: ~130k faults, a quarter of the step's CPU time
# (strace, perf). Backing them by transparent huge pages makes that 512x fewer faults (bench
# step 450 -> 350 ms, the same peak RSS; docs/performance.md). glibc reads tunables only at
# start-up, hence the re-exec.
HOST_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def tune_host_malloc(argv: list[str]) -> None:
    """Restart this process (same PID, same arguments) with HOST_MALLOC_TUNABLE added to
    GLIBC_TUNABLES, once. LMJAX_HOST_MALLOC=default keeps glibc's defaults."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
            or os.environ.get("LMJAX_HOST_MALLOC") == "default"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HOST_MALLOC_TUNABLE]))}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lmjax", *argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a real process (console script, python -m lmjax), not a caller's test
        tune_host_malloc(sys.argv)
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        usage = "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items())
        given = f"Unknown command {argv[1]!r}. " if len(argv) > 1 else ""
        sys.exit(f"{given}Usage: lmjax <command> [flags]\n{usage}")
    command = argv.pop(1)
    rest, overrides = _split_overrides(argv)

    def absl_main(args):
        if not any(a.startswith(("--verbosity", "-v")) for a in rest):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        try:
            _run(command, overrides, args[1:])
        except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            sys.exit(f"lmjax {command}: {message}")

    app.run(absl_main, argv=rest)
