"""`lmjax convert --from_hf=HF_DIR --workdir=OUT | --to_hf --workdir=DIR --out=HF_DIR`: a
Hugging Face checkpoint into an lmjax workdir, or back."""

from absl import app, flags

from lmjax.cli import common
from lmjax.interop import hf

common.define_workdir()
common.define_step("export with --to_hf")
flags.DEFINE_string("from_hf", None, "Hugging Face directory (or gs:// URL) to import into "
                    "--workdir")
flags.DEFINE_bool("to_hf", False, "export --workdir to a Hugging Face directory --out")
flags.DEFINE_string("out", "", "the Hugging Face directory (or gs:// URL) --to_hf writes")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    workdir = common.require_workdir("convert")
    if bool(FLAGS.from_hf) == FLAGS.to_hf or (FLAGS.to_hf and not FLAGS.out):
        raise app.UsageError("convert needs --from_hf=HF_DIR, or --to_hf with --out=HF_DIR.")
    if FLAGS.from_hf:
        hf.convert_from_hf(FLAGS.from_hf, workdir)
    else:
        hf.convert_to_hf(workdir, FLAGS.out, FLAGS.step)
