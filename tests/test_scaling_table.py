"""`lmjax fit --table`: a CSV or JSONL of runs (published data) is read, fitted and planned as a
sweep's own runs; bad tables are one sentence; runs log their epochs of repeated data."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize

from lmjax import paths
from lmjax.scaling import collect, parametric, report, table

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def published(n: int = 24, seed: int = 0) -> list[dict]:
    """Rows as a paper's table gives them: total params, tokens, FLOPs = 6ND, final loss."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    L = parametric.parametric_loss(N, D, CHINCHILLA) * np.exp(rng.normal(0, 0.005, n))
    return [{"Model Size": float(a), "Training Tokens": float(b), "Training FLOP": 6 * a * b,
             "loss": float(c)} for a, b, c in zip(N, D, L, strict=True)]


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_and_jsonl_round_trip_local_and_on_gcs(tmp_path, bucket):
    rows = published()
    write_csv(tmp_path / "runs.csv", rows)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    remote = paths.resolve(f"{bucket}/runs.csv")
    remote.write_text((tmp_path / "runs.csv").read_text())
    got = [table.read(p, "total") for p in (tmp_path / "runs.csv", tmp_path / "runs.jsonl",
                                           str(remote))]
    for runs in got:
        assert len(runs) == len(rows)
        for run, row in zip(runs, rows, strict=True):
            assert run["params"] == pytest.approx(row["Model Size"], rel=1e-15)
            assert run["tokens"] == pytest.approx(row["Training Tokens"], rel=1e-15)
            assert run["flops"] == pytest.approx(row["Training FLOP"], rel=1e-15)
            assert run["eval_loss"] == pytest.approx(row["loss"], rel=1e-15)
            assert run["flops_per_token"] == pytest.approx(6 * row["Model Size"])
            assert np.isnan(run["epochs"])
    # the FLOP convention read back from 6ND rows: k = 6, gamma = 1
    convention = table.flops_convention(got[0], "params")
    assert convention["k"] == pytest.approx(6.0) and convention["gamma"] == pytest.approx(1.0)


def test_d_or_c_alone_and_generic_names(tmp_path):
    """With C only, D = C / 6N (Chinchilla's count) unless a flops_per_token column says more;
    'N' is whichever kind --params names."""
    (tmp_path / "c.jsonl").write_text('{"N": 1e8, "C": 6e18, "L": 3.1}\n'
                                      '{"N": 2e8, "C": 6e18, "L": 3.0, "epochs": 2.5}\n')
    runs = table.read(tmp_path / "c.jsonl")
    assert runs[0]["params_non_embedding"] == 1e8 and runs[0]["tokens"] == pytest.approx(1e10)
    assert runs[1]["tokens"] == pytest.approx(5e9) and runs[1]["epochs"] == 2.5
    assert runs[0]["flops_budget"] == 6e18
    (tmp_path / "d.csv").write_text("params,tokens,flops_per_token,loss\n1e8,1e9,7e8,3.0\n")
    run = table.read(tmp_path / "d.csv", "total")[0]
    assert run["flops"] == pytest.approx(7e17)


@pytest.mark.parametrize("name,text,message", [
    ("none.csv", None, "does not exist"),
    ("empty.csv", "", "has no rows"),
    ("header.csv", "N,D,loss\n", "has no rows"),
    ("cols.csv", "N,loss\n1e8,3.0\n", "has no column for D or C (one of ('tokens', 'd'"),
    ("loss.csv", "N,D\n1e8,1e9\n", "has no column for loss"),
    ("word.csv", "N,D,loss\n1e8,1e9,3.0\n2e8,lots,2.9\n", "row 2: d='lots' is not a number."),
    ("zero.csv", "N,D,loss\n0,1e9,3.0\n", "row 1: n='0' must be positive."),
    ("bad.jsonl", '{"N": 1e8, "D": 1e9, "loss": 3}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("runs.txt", "N,D,loss\n", "is neither .csv nor .jsonl"),
])
def test_bad_tables_are_one_sentence(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=None) as e:
        table.read(tmp_path / name, "total")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_curve_methods_say_a_table_has_final_points_only(tmp_path):
    write_csv(tmp_path / "pub.csv", published(8))
    with pytest.raises(ValueError, match="approach1 needs training curves; a table holds final "
                                         "points only."):
        report.analyze("", "approach1", "", "total", table_path=str(tmp_path / "pub.csv"))
    with pytest.raises(ValueError, match="Give one of --root"):
        report.analyze(str(tmp_path), table_path=str(tmp_path / "pub.csv"))


def test_plan_flops_prints_the_optimum_and_the_nearest_shape(tmp_path):
    """`lmjax fit --table --plan_flops=1e21` end to end: both objectives fitted and printed,
    and the plan under each. The truth at 1e21 FLOPs under the law
    that wrote the table, by numerical minimisation of L(N, 1e21 / 6N): N ~ 1.8e9, nearest
    GPT-3 XL (1.5e9 total parameters counted as configs/gpt2.py builds it)."""
    write_csv(tmp_path / "pub.csv", published(40, seed=2))
    loss = lambda logn: parametric.parametric_loss(np.exp(logn), 1e21 / 6 / np.exp(logn),
                                                   CHINCHILLA)
    n_true = np.exp(scipy.optimize.minimize_scalar(loss, bounds=(15, 30), method="bounded").x)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "lmjax", "fit", f"--table={tmp_path}/pub.csv",
                          "--params=total", "--method=approach3", "--bootstrap=6",
                          "--plan_flops=1e21"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    fits = [line for line in out.stdout.splitlines() if line.startswith("approach3")]
    assert [line.split()[0] for line in fits] == ["approach3", "approach3_besiroglu"]
    for line in fits:  # the law that wrote the table
        alpha, beta = (float(line.split(f"{k} ")[1].split()[0]) for k in ("alpha", "beta"))
        assert abs(alpha - 0.34) < 0.05 and abs(beta - 0.28) < 0.05, line
    plans = [line for line in out.stdout.splitlines() if line.startswith("plan ")]
    assert len(plans) == 2 and "approach3_besiroglu" in plans[1]
    for line in plans:
        n_opt = float(line.split("N_opt ")[1].split()[0])
        assert abs(np.log(n_opt / n_true)) < 0.3, (line, n_true)
        assert "GPT-3 xl" in line and "tokens/param" in line and "[" in line


def test_runs_log_their_epochs(smoke_workdir):
    """Every metrics row has epochs = tokens / one pass over the training rows (a constant
    number of tokens, the pipeline's train_tokens), and collect reads the last into the
    table."""
    rows = collect.read_rows(smoke_workdir)
    per_pass = {round(r["tokens"] / r["epochs"]) for r in rows if "tokens" in r}
    assert len(per_pass) == 1 and per_pass.pop() > 0
    assert collect.load_run(smoke_workdir)["epochs"] == rows[-1]["epochs"]
