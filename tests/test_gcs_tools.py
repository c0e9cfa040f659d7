"""The tools around runs on a bucket (tests/gcs.py's server): `lmjax sweep` and `lmjax fit`
with a gs:// root, `lmjax sample` and `lmjax convert` on gs:// folders. Sweep and fit read
hand-written runs (no training); sample and convert reuse the session's smoke run. Nothing may
land in a local folder named `gs:`."""

import io
import json
import sys

import pytest
from etils import epath

from configs import smoke
from lmjax import config, sample
from lmjax.interop import hf
from lmjax.scaling import collect, report, sweep
from tests.test_gcs import assert_no_local_gs

SWEEP = '''
from configs import smoke

def get_config(arg=None):
    return smoke.get_config()

def get_sweep():
    return {"done": {"train.steps": 4}, "todo": {"train.steps": 6}}
'''


def test_sweep_with_a_gs_root_skips_finished_members_and_keeps_logs(bucket, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray os.path.abspath would write here
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP)
    root = epath.Path(f"{bucket}/sweep")
    # on gs:// Orbax cannot rename a step into place: it writes commit_success.txt into it last
    (root / "done" / "checkpoints" / "4" / "commit_success.txt").write_text("")
    (root / "todo" / "checkpoints" / "6" / "state" / "x").write_text("")  # begun, not committed
    (root / "todo" / "train.log").write_text("first attempt\n")
    (root / "todo" / "metrics.jsonl").write_text(json.dumps({"step": 6, "eval/loss": 2.5}) + "\n")
    assert sweep.is_finished(str(root / "done"), 4)
    assert not sweep.is_finished(str(root / "todo"), 6)

    lines = []  # the TPU runner hands the pod the gs:// workdir itself
    assert sweep.run_tpu(str(path), str(root), "pod", dry_run=True, log=lines.append) == {
        "done": "skipped"}
    assert lines[-1].endswith(f" --workdir={root}/todo --config.train.steps=6"), lines

    # the local runner, with a stand-in for `lmjax train` that prints its workdir
    monkeypatch.setattr(sweep, "train_command", lambda path, workdir, member: [
        sys.executable, "-c", f"print('trained', {workdir!r})"])
    lines = []
    status = sweep.run_local(str(path), str(root), log=lines.append)
    assert status == {"done": "skipped", "todo": "done"}
    # no append on a bucket: written locally, uploaded after what the first attempt left
    assert (root / "todo" / "train.log").read_text() == f"first attempt\ntrained {root}/todo\n"
    assert "done todo in " in lines[-1] and lines[-1].endswith(", eval/loss 2.5000"), lines
    assert not (root / "done" / "train.log").exists()
    assert_no_local_gs(tmp_path)


def write_runs(root: epath.Path) -> None:
    """Three finished smoke runs of widths 16, 32 and 64 (config.json and metrics.jsonl, the
    files `fit` reads): the wider, the lower the loss."""
    for d in (16, 32, 64):
        cfg = smoke.get_config()
        cfg.model.update(d_model=d, head_dim=d // 4)
        rows = [{"step": s, "train/loss": 2 + (8 / d) ** 0.6 * (1 + 1 / s), "tokens": 256 * s,
                 "flops": 1e6 * d * s} for s in range(1, cfg.train.steps + 1)]
        rows[-1]["eval/loss"] = rows[-1]["train/loss"]
        (root / f"d{d}").mkdir(parents=True, exist_ok=True)
        config.save(cfg, root / f"d{d}" / "config.json")
        (root / f"d{d}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fit_with_a_gs_root_and_out(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, out = epath.Path(f"{bucket}/runs"), epath.Path(f"{bucket}/figures")
    write_runs(root)
    write_runs(epath.Path(tmp_path / "runs"))
    results = report.analyze(str(root), "kaplan_n", str(out), bootstrap=0)
    assert results["root"] == str(root) and results["runs"] == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "kaplan.png", "loss_vs_flops.png", "results.json", "runs.csv"]
    assert json.loads((out / "results.json").read_text()) == results
    collect.write_table(collect.collect(tmp_path / "runs"), tmp_path / "runs.csv")
    assert (out / "runs.csv").read_text() == (tmp_path / "runs.csv").read_text()
    assert (out / "kaplan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_no_local_gs(tmp_path)


@pytest.mark.slow
def test_convert_both_ways_and_sample_on_gs_folders(bucket, smoke_workdir, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf.convert_to_hf(smoke_workdir, f"{bucket}/hf")
    assert sorted(p.name for p in epath.Path(f"{bucket}/hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"]
    run = f"{bucket}/run"  # config.json, the tokenizer and Orbax's step 0, all on the bucket
    cfg = hf.convert_from_hf(f"{bucket}/hf", run)
    assert cfg.data.tokenizer == f"{run}/tokenizer.model"
    greedy = dict(max_new_tokens=6, temperature=0.0)
    assert sample.main(run, ["ROMEO:"], out=io.StringIO(), **greedy) == sample.main(
        smoke_workdir, ["ROMEO:"], out=io.StringIO(), **greedy)  # the same weights
    assert_no_local_gs(tmp_path)
