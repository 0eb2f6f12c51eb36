"""The memory commands of the CLI on the CPU: plan reproduces plan_memory
on a saved report, optimize prints predictions against measurements, and
max-batch finds what a brute-force search over the same predictions finds."""

import argparse
import json

import pytest

from mutwo_backend import Plan, Report, cli, plan_memory
from mutwo_backend.memory_commands import parse_budget, search_max_batch, try_batch


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["profile", "--model", "resnet18", "--device", "cpu", "--batch-size", "16", "--iters", "1",
                     "--out", str(out), "--quiet"]) == 0
    return out


def test_plan_reproduces_plan_memory_on_a_saved_report(saved_report, tmp_path, capsys):
    assert cli.main(["plan", str(saved_report / "report.json"), "--budget", "0.95", "--out", str(tmp_path),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and f"plan saved to {tmp_path / 'plan.json'}" in out
    assert Plan.load(str(tmp_path / "plan.json")) == plan_memory(Report.load(str(saved_report)), 0.95)
    assert cli.main(["plan", str(saved_report), "--budget", "0.95", "--quiet"]) == 0  # next to the report
    assert (saved_report / "plan.json").exists()


def test_plan_errors_are_clear(saved_report, capsys):
    assert cli.main(["plan", str(saved_report), "--budget", "0.01", "--quiet"]) == 2
    assert "no plan fits a budget of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plan", str(saved_report), "--budget", "lots"])
    assert "is not a size" in capsys.readouterr().err
    assert parse_budget("0.5") == 0.5 and parse_budget("6GiB") == "6GiB" and parse_budget("1000000") == 1000000


def test_optimize_prints_predicted_against_measured(tmp_path, capsys):
    assert cli.main(["optimize", "--model", "resnet18", "--device", "cpu", "--batch-size", "16", "--iters", "1",
                     "--budget", "0.95", "--steps", "1", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "measured (graph code)" in out and "eager (measured)" in out
    measured = json.loads((tmp_path / "measurement.json").read_text())
    # MemTracker around one optimized step: the plan's peak, within 5%
    assert abs(measured["measured_peak_bytes"] / measured["predicted_peak_bytes"] - 1) <= 0.05
    assert measured["measured_peak_bytes"] < measured["eager_peak_bytes"]
    assert {"plan.json", "measurement.json", "report"} <= {p.name for p in tmp_path.iterdir()}


def test_max_batch_finds_what_a_brute_force_search_finds(tmp_path, capsys):
    """The MLP within a simulated limit: the doubling and bisecting search
    against every batch size up to the end, with the same predictions."""
    args = cli.build_parser().parse_args(["max-batch", "--model", "mlp", "--device", "cpu", "--iters", "1",
                                          "--memory", "135000", "--out", str(tmp_path)])
    outcomes = {}

    def tried(batch):
        if batch not in outcomes:
            outcomes[batch] = try_batch(args, batch, 135000, args_device(args))
        return outcomes[batch]

    found = search_max_batch(tried, 48)
    brute = [tried(batch) for batch in range(1, 49)]
    for fits in ("eager_fits", "mutwo_fits"):
        largest = max((o.batch_size for o in found.values() if getattr(o, fits)), default=None)
        assert largest == max((o.batch_size for o in brute if getattr(o, fits)), default=None), fits
    eager = max(o.batch_size for o in brute if o.eager_fits)
    mutwo = max(o.batch_size for o in brute if o.mutwo_fits)
    assert 1 < eager < mutwo < 48  # the limit sits where a plan helps
    assert cli.main(["max-batch", "--model", "mlp", "--device", "cpu", "--iters", "1", "--memory", "135000",
                     "--max-batch-size", "48", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"eager: largest batch {eager}," in out and f"mutwo: largest batch {mutwo}," in out


def args_device(args: argparse.Namespace):
    import torch
    return torch.device(args.device or "cpu")


def test_sweep_with_a_budget_runs_each_batch_with_the_plan_and_marks_what_only_it_fits(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", "resnet18", "--device", "cpu", "--batch-sizes", "16", "--iters", "1",
                     "--budget", "0.95", "--memory", "195MiB", "--no-reports", "--out", str(out), "--quiet"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    run = sweep["runs"][0]
    assert sweep["meta"]["budget"] == 0.95 and sweep["meta"]["memory"] == 195 * 2 ** 20
    assert not run["fits"] and run["with_plan"]["status"] == "ok"  # 201.6 MiB eagerly, under 195 MiB with the plan
    plan = run["with_plan"]
    assert abs(plan["peak_bytes"] / plan["predicted_peak_bytes"] - 1) <= 0.05 and plan["recompute"] > 0
    assert {"peak_memory_vs_batch.png", "latency_vs_batch.png"} <= {p.name for p in out.iterdir()}
    assert "time with plan (ms)" in capsys.readouterr().out
    assert cli.main(["sweep", "--model", "mlp", "--device", "cpu", "--batch-sizes", "2", "--memory", "1GiB",
                     "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "give --budget too" in capsys.readouterr().err
