"""`lmjax fit` end to end on workdirs written from a known law (no training): collect reads
them back exactly, the fits find the law, the figures and tables are written."""

import csv
import functools
import json
import os

import numpy as np
import pytest

from configs import smoke
from lmjax import config, flops, validate
from lmjax.scaling import collect, parametric, report, shapes, table

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BUDGETS = (3e11, 1e12, 3e12)


@functools.cache
def shape(target: float) -> dict:
    model = smoke.get_config().model
    model.vocab_size = 256
    found = shapes.shape_for_params(target, model, aspect=16, head_dim=8)
    return {"vocab_size": 256, **{k: v for k, v in found.items() if k != "params"}}


def write_run(workdir: str, target: float, budget: float) -> None:
    """A finished run's config.json and metrics.jsonl, its losses given by LAW (eval: +0.01)."""
    cfg = smoke.get_config()
    cfg.model.update(shape(target))
    cfg.train.flops_budget = budget
    validate.apply_budget(cfg)
    os.makedirs(workdir)
    config.save(cfg, os.path.join(workdir, "config.json"))
    N = flops.count_params(cfg.model)["non_embedding"]
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    per_step = flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in np.unique(np.geomspace(1, cfg.train.steps, 40).astype(int)):
            D = step * tokens_per_step
            row = {"step": int(step), "train/loss": float(parametric.parametric_loss(N, D, LAW)),
                   "tokens": int(D), "flops": float(step * per_step)}
            if step == cfg.train.steps:
                row["eval/loss"] = row["train/loss"] + 0.01
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for c in BUDGETS:
        for n in np.geomspace(2.5e4, 2e6, 7):
            write_run(str(root / f"C{c:g}_N{n:.2g}"), n, c)
    os.makedirs(root / "not_a_run")  # ignored: no config.json
    return str(root), report.analyze(str(root), bootstrap=10)


def test_every_method_runs_and_writes_its_figures(analyzed):
    root, results = analyzed
    assert results["runs"] == 21 and results["skipped"] == {}
    out = os.path.join(root, "fit")
    for name in ("results.json", "runs.csv", "loss_vs_flops.png", "isoflop.png", "optimal.png",
                 "residuals.png", "kaplan.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000 or name.endswith("csv"), name
    assert json.load(open(os.path.join(out, "results.json")))["approach2"]["a"] == \
        results["approach2"]["a"]
    text = report.summary(results)
    assert f"a = {results['approach2']['a']:.3f} [" in text


def test_table_holds_exact_counts(analyzed):
    root, _ = analyzed
    rows = list(csv.DictReader(open(os.path.join(root, "fit", "runs.csv"))))
    assert len(rows) == 21
    saved = config.from_json(os.path.join(root, rows[0]["name"], "config.json"))
    assert int(rows[0]["params_non_embedding"]) == flops.count_params(saved.model)["non_embedding"]
    assert int(rows[0]["steps"]) == saved.train.steps == validate.budget_steps(saved)
    metrics = [json.loads(line) for line in open(os.path.join(root, rows[0]["name"],
                                                              "metrics.jsonl"))]
    assert float(rows[0]["eval_loss"]) == metrics[-1]["eval/loss"]
    last5 = np.mean([m["train/loss"] for m in metrics[-5:]])  # smoothed: trailing 5 rows
    assert float(rows[0]["train_loss"]) == pytest.approx(last5, rel=1e-12)


def test_fits_find_the_law_that_wrote_the_runs(analyzed):
    _, r = analyzed
    a_true = LAW["beta"] / (LAW["alpha"] + LAW["beta"])
    # Approach 3 sees exact losses (+0.01, absorbed by E): it recovers the law.
    assert r["approach3"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.02)
    assert r["approach3"]["beta"] == pytest.approx(LAW["beta"], abs=0.02)
    assert r["approach3"]["E"] == pytest.approx(LAW["E"] + 0.01, rel=0.02)
    # Approach 2: 7 sizes over 2 decades per budget, D from the lmjax FLOP count (6N plus
    # attention, not 6N): close to, not exactly, beta / (alpha + beta).
    assert r["approach2"]["a"] == pytest.approx(a_true, abs=0.06)
    lo, hi = r["approach2"]["ci"]["a"]
    assert lo <= r["approach2"]["a"] <= hi
    for m in ("kaplan_n", "kaplan_d", "kaplan_c"):
        assert r[m]["alpha"] > 0 and r[m]["ci"]["alpha"][0] <= r[m]["alpha"], m
    # L(C)'s points are approach 1's frontier (same grid, same curves); L(N)'s are the best
    # eval loss per size. (Exponents against a known law: tests/test_scaling_kaplan.py.)
    np.testing.assert_allclose(r["kaplan_c"]["points"]["L"], r["approach1"]["L_opt"])
    assert len(r["kaplan_n"]["points"]["N"]) == 7 and r["kaplan_d"]["x"] == "D"


def test_runs_csv_reads_back_as_a_table(analyzed):
    """runs.csv is a table `lmjax fit --table` reads: the same N, D, C, loss and FLOPs per token
    as the workdirs (so the same fits); approach 3's compute-optimal exponents are in the runs'
    FLOP count (6N plus attention: gamma < 1 over these tiny models), not 6ND."""
    root, by_root = analyzed
    rows = table.read(os.path.join(root, "fit", "runs.csv"))
    runs = collect.collect(root)
    for key in ("params_non_embedding", "tokens", "flops", "flops_budget", "eval_loss",
                "flops_per_token"):
        assert [r[key] for r in rows] == [float(r[key]) for r in runs], key
    c = by_root["flops_per_token"]
    assert c == table.flops_convention(runs, "params_non_embedding")
    assert c["gamma"] < 1 and c["max_error"] < 0.05
    for m in ("approach3", "approach3_besiroglu"):
        assert by_root[m]["a"] == pytest.approx(parametric.exponents(by_root[m], c["gamma"])[0])


def test_unknown_method_and_empty_root_name_the_cause(tmp_path):
    with pytest.raises(ValueError, match="--method='approach4' is not one of"):
        report.analyze(str(tmp_path), method="approach4")
    with pytest.raises(ValueError, match="No finished runs under"):
        report.analyze(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.analyze(str(tmp_path / "missing"))
