"""The drift profiler: CLI end to end, JSON schema, plots, the τ² law, bad arguments."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from consopt import profiler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "consopt", "profile", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = run_cli("--preset", "quick", "--steps", "4", "--seeds", "2", "--lrs", "0.05,0.1,0.2", "--out", str(out),
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "slope" in r.stdout and "rescale:0" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "consopt.profile/1" and res["mode"] == "steps" and res["theory_slope"] == 2.0
    assert res["models"] == ["mlp"] and res["lrs"] == [0.05, 0.1, 0.2] and res["seeds"] == 2
    assert len(res["runs"]) == 3 * 2
    fams = {f["name"] for f in res["laws"]["mlp"]}
    assert {"rescale:0", "rescale:2"} <= fams
    for run in res["runs"]:
        assert run["steps"] == 4 and len(run["loss"]) == 4
        for fam in fams:
            assert len(run["rel"][fam]) == 4 and len(run["abs"][fam]) == 4
            assert all(v >= 0 for v in run["abs"][fam])
    s = res["summary"]["mlp"]["rescale:0"]
    assert set(s) >= {"metric", "per_lr", "slope", "ci95", "theory"} and len(s["per_lr"]) == 3
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 * 4 * len(fams)
    png = (out / "drift_mlp.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "drift_mlp.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and float(img.std()) > 0


def test_fixed_steps_slope_is_two(tmp_path):
    result, table, _ = profiler.profile(["mlp"], [0.005, 0.01, 0.02, 0.04], seeds=2, steps=10, batch=32,
                                        out_dir=str(tmp_path), progress=False)
    for fam in ("rescale:0", "rescale:2"):
        assert abs(table["mlp"][fam]["slope"] - 2.0) <= 0.2, table["mlp"][fam]
    # deviations really come from the runs: they grow with the lr at every seed
    for fam in ("rescale:0",):
        finals = {}
        for r in result["runs"]:
            finals.setdefault(r["seed"], []).append((r["lr"], r["abs"][fam][-1]))
        for seq in finals.values():
            vals = [v for _, v in sorted(seq)]
            assert all(a < b for a, b in zip(vals, vals[1:]))


def test_fixed_time_slope_is_one(tmp_path):
    _, table, _ = profiler.profile(["mlp"], [0.01, 0.02, 0.04, 0.08], seeds=1, time_T=0.32, batch=32,
                                   out_dir=str(tmp_path), progress=False)
    assert table["mlp"]["rescale:0"]["theory"] == 1.0
    assert abs(table["mlp"]["rescale:0"]["slope"] - 1.0) <= 0.25, table["mlp"]["rescale:0"]


def test_projection_modes_are_summarized_separately(tmp_path):
    result, table, pngs = profiler.profile(["mlp"], [0.02, 0.05, 0.1], seeds=1, steps=3, batch=16,
                                           projections=("none", "symmetry"), out_dir=str(tmp_path), progress=False)
    assert set(table) == {"mlp", "mlp[symmetry]"} and len(pngs) == 2
    plain, proj = table["mlp"]["rescale:0"], table["mlp[symmetry]"]["rescale:0"]
    assert proj["theory"] == "projected"
    for lr in (0.05, 0.1):  # projected runs stay at float32 rounding, far below the plain drift
        assert proj["per_lr"][lr][0] < 1e-5 < plain["per_lr"][lr][0]


def test_fit_slope_recovers_a_power_law():
    rng = np.random.default_rng(0)
    lrs = np.repeat([0.01, 0.02, 0.05, 0.1], 3)
    vals = 3.0 * lrs ** 1.7 * np.exp(rng.normal(0, 0.05, len(lrs)))
    s, ci = profiler.fit_slope(lrs, vals)
    assert abs(s - 1.7) < 3 * ci and 0 < ci < 0.2


@pytest.mark.parametrize("args, message", [
    (["--lrs=-0.1,0.1"], "learning rates must be positive"),
    (["--models", "alexnet"], "unknown model 'alexnet'"),
    (["--lrs", "abc"], "comma-separated list of numbers"),
    (["--model", "no_such_module_xyz:make"], "cannot load model factory"),
])
def test_bad_arguments_exit_2_without_traceback(tmp_path, args, message):
    r = run_cli(*args, "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    r = run_cli("--preset", "quick", "--out", str(blocker / "sub"), "--no-progress")
    assert r.returncode == 2
    assert "cannot write to output folder" in r.stderr and "Traceback" not in r.stderr


def test_user_model_factory(tmp_path):
    mod = tmp_path / "my_factory.py"
    mod.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))\n"
        "    return m, torch.randn(40, 5), torch.randint(0, 3, (40,))\n")
    r = subprocess.run([sys.executable, "-m", "consopt", "profile", "--model", "my_factory:make", "--lrs",
                        "0.05,0.1,0.2", "--seeds", "1", "--steps", "3", "--out", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["models"] == ["make"] and "rescale:0" in res["summary"]["make"]
