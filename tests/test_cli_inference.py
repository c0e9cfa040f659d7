"""`lmjax eval | sample | convert` as a user runs them: `python -m lmjax ...` in a subprocess."""

import json
import os

import pytest

from configs import smoke
from lmjax.interop import hf
from tests.test_cli import lmjax


@pytest.mark.slow
def test_eval_sample_convert_commands(smoke_workdir, tmp_path):
    out = lmjax("eval", f"--workdir={smoke_workdir}", "--batches=1", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and result["eval/sequences"] == 8 and "bits_per_byte" in out.stdout

    out = lmjax("sample", f"--workdir={smoke_workdir}", "--prompt=ROMEO:", "--max_new_tokens=8",
                devices=1)
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr[-2000:]

    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    out = lmjax("convert", "--to_hf", f"--workdir={smoke_workdir}", f"--out={hf_dir}", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors", "tokenizer.model"]
    out = lmjax("convert", f"--from_hf={hf_dir}", f"--workdir={back}", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.load(open(back / "config.json"))["model"]["num_kv_heads"] == 2
    assert os.listdir(back / "checkpoints") == ["0"]


@pytest.mark.parametrize("args,message", [
    (["convert", "--from_hf=/nonexistent/hf", "--workdir=/tmp/unused"],
     "lmjax convert: Hugging Face checkpoint directory '/nonexistent/hf' does not exist."),
    (["eval", "--workdir=/nonexistent/run"],
     "lmjax eval: /nonexistent/run is not an lmjax workdir: it has no config.json."),
    (["sample", "--workdir=/nonexistent/run"],
     "lmjax sample: /nonexistent/run is not an lmjax workdir: it has no config.json."),
    (["convert", "--workdir=/tmp/unused"],
     "convert needs --from_hf=HF_DIR, or --to_hf with --out=HF_DIR."),
])
def test_bad_input_is_one_sentence(args, message):
    out = lmjax(*args, devices=1)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_convert_of_unreadable_weights_is_one_sentence_and_writes_nothing(tmp_path):
    hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf.config_to_hf(smoke.get_config())))
    (hf_dir / "model.safetensors").write_bytes(b"\x00\x01\x02")
    out = lmjax("convert", f"--from_hf={hf_dir}", f"--workdir={workdir}", devices=1)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"lmjax convert: {hf_dir}/model.safetensors is truncated or not a safetensors file: its "
        "header claims 8 bytes, the file holds 3.")
    assert not workdir.exists()
