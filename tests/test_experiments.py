"""The main job at quick size: every experiment writes its figure and data, and the key
numbers carry the paper's claims (checked here against the theorems, not against themselves).
"""

import json

import numpy as np
import pytest

from experiments import paper


@pytest.mark.slow
def test_paper_quick(tmp_path):
    res = paper.main(quick=True, out=tmp_path, progress=False)
    index = (tmp_path / "index.md").read_text()
    for name in paper.EXPERIMENTS:
        for ext in ("png", "pdf", "json", "npz"):
            f = tmp_path / name / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 0, f
        assert f"{name}/{name}.png" in index
        json.loads((tmp_path / name / f"{name}.json").read_text())
    r = res["results"]
    # Prop 1.2: only the argmin layer crosses zero; a crossing is shown
    assert r["fig3_node_dynamics"]["only_argmin_crosses"]
    assert r["fig3_node_dynamics"]["crossing_layers"] == [r["fig3_node_dynamics"]["argmin_layer"]]
    # Fig 4: every scale reaches 1e-10, larger scale faster, Theorem 2 holds along the path
    rows = r["fig4_init_scale"]["rows"]
    assert all(row["ok"] and np.isfinite(row["time_to_1e-10"]) for row in rows)
    assert r["fig4_init_scale"]["faster_with_scale"]
    assert all(row["bound_holds"] and row["rate_ratio"] >= 1 for row in rows)
    assert "time to L − L* < 1e-10" in index
    # Theorem 2 never violated on the grid
    assert r["rates"]["bound_respected"] and r["rates"]["all_ok"]
    # the implicit-bias prediction matches long flows
    ib = r["implicit_bias"]
    assert ib["all_converged"] and ib["max_flow_discrepancy"] < 1e-7
    # accuracy improves with rtol for every solver
    err = np.asarray(r["conservation_accuracy"]["error"])
    assert np.all(err[:, -1] < err[:, 0] * 1e-2)
    # GD is a first-order discretization of the flow; linear stability at converged minima
    fg = r["flow_vs_gd"]
    assert 0.8 < fg["order_slope"] < 1.2
    assert fg["converged_runs_end_below_2"] and any(fg["converged"]) and not all(fg["ok"])
    # SGD noise: limits closer to min-l1 than the gradient flow's, paths interpolate
    sb = r["stochastic_bias"]
    assert sb["sparser_with_noise"]
    assert all(max(row["failed_paths"]) == 0 and row["max_final_loss"] < 1e-8
               for row in sb["rows"])
    # conservation laws: every numeric count equals the count known in closed form
    cl = r["conservation_laws"]
    assert cl["all_counts_match"] and cl["all_commuting_match"]
    # GD/SGD at finite steps: the run's effective init reproduces its limit; ahead of time the
    # prediction is nearer the GD limit than the flow's own bias
    db = r["discrete_bias"]
    assert db["max_run_error"] < 1e-8 and db["ahead_beats_flow"]


@pytest.mark.slow
def test_sweep_cli_quick(tmp_path):
    from experiments import sweep

    s = sweep.main(quick=True, out=tmp_path, progress=False)
    assert (tmp_path / "sweep_phase_diagram.png").exists()
    assert (tmp_path / "sweep.npz").exists() and (tmp_path / "sweep.json").exists()
    assert s["all_ok"]
    # rerun resumes from the chunks on disk and gives the same summary
    again = sweep.main(quick=True, out=tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(again["median_time"]), np.asarray(s["median_time"]))


def test_device_bench_checks_rows_and_keeps_to_its_budget(tmp_path):
    # the prepared script for a lent GPU, here on the CPU: a first and a second call give the
    # same bits, rows agree with per-trajectory gradient_flow solves (diffrax, rtol 1e-10),
    # and a size whose projected time exceeds the budget is skipped, not started
    from experiments import device_bench

    rep = device_bench.main(sizes=(10**9, 16), budget_s=120.0, check=3, out=tmp_path)
    (row,) = rep["rows"]
    assert row["B"] == 16 and row["first_and_second_same_bits"] and row["all_ok"]
    assert row["check_rows"] == 3 and row["check_max_rel_error"] < device_bench.CHECK_TOL
    assert row["first_call_compiles"] > 0 and row["compiles"] == 0  # the second: none
    assert row["counters"]["retirements"] > 0 and row["counters"]["host_syncs"] > 0
    (skip,) = rep["skipped"]
    assert skip["B"] == 10**9 and skip["projected_s"] > skip["left_s"]
    saved = json.loads((tmp_path / "device_bench.json").read_text())
    assert [r["B"] for r in saved["rows"]] == [16] and saved["skipped"][0]["B"] == 10**9


def test_cli_help_is_instant_and_keeps_the_examples():
    # `--help` is answered from the module's source before JAX is imported (-X importtime
    # lists every module imported), and the usage examples keep their lines
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("sweep", "fig4_init_scale", "bench", "paper"):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", f"experiments.{name}",
                              "--help"], capture_output=True, text=True, cwd=root, timeout=120)
        assert run.returncode == 0, run.stderr
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "jax" not in imported and "numpy" not in imported, name
        assert f"usage: python -m experiments.{name}" in run.stdout
    assert "\n    python -m experiments.sweep --full --seeds 256    # paper grid\n" in run_help(
        root, "sweep")


def run_help(root, name):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"],
                          capture_output=True, text=True, cwd=root, timeout=120).stdout


def test_sweep_cli_uses_or_refuses_explicit_values(monkeypatch, tmp_path):
    from experiments import sweep

    for bad in (["--t1", "0"], ["--seeds", "0"], ["--depths", "1"], ["--scales", "-1"]):
        with pytest.raises(SystemExit):
            sweep._parse(bad)
    a = sweep._parse(["--t1", "5", "--seeds", "2"])
    assert a.t1 == 5.0 and a.seeds == 2 and a.depths is None
    # from Python: explicit values reach dd.sweep as given (0 is not replaced by the default)
    seen = {}

    class Stop(Exception):
        pass

    def fake_sweep(problem, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(sweep.dd, "sweep", fake_sweep)
    with pytest.raises(Stop):
        sweep.main(out=tmp_path, t1=0.0, seeds=0, depths=[], scales=[], progress=False)
    assert seen["t1"] == 0.0 and seen["seeds"] == 0 and seen["depths"] == []
    with pytest.raises(Stop):
        sweep.main(out=tmp_path, progress=False)
    assert seen["t1"] == sweep.QUICK["t1"] and seen["seeds"] == sweep.QUICK["seeds"]


def test_latency_rows_run_in_fresh_processes(tmp_path):
    # experiments.latency: each row a new process (cache off); the import ratio is a target
    from experiments import latency

    rep = latency.main(out=tmp_path, names=["import jax, diffrax, equinox, optax",
                                            "import ddln_jax", "metric"], warm=False)
    rows = rep["rows"]
    assert rows["metric"]["first"] > rows["metric"]["best_later"] > 0
    assert rows["metric"]["compiles"] >= 1 and "import" in rep["targets"]
    assert (tmp_path / "latency.md").read_text().startswith("| call |")
