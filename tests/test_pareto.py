"""CPU smoke test of benchmarks/pareto.py on the zoo's MLP."""


import torch

from benchmark_scripts import load_benchmark  # (tests/)


def test_every_tool_runs_or_records_why_not(tmp_path):
    script = load_benchmark("pareto")
    runs = script.run_tools("mlp", 64, torch.device("cpu"), ["eager", "checkpoint_blocks", "save_on_cpu", "mutwo"],
                            [1.0, 0.01])
    assert runs["eager"]["step_ms"] > 0 and runs["save_on_cpu"]["step_ms"] > 0
    assert "no blocks known for mlp" in runs["checkpoint_blocks"]["error"]  # recorded, not raised
    kept = runs["mutwo_1.0"]
    assert kept["runtime"] == "graph code" and abs(kept["peak_bytes"] / kept["predicted_peak_bytes"] - 1) <= 0.05
    assert "no plan fits" in runs["mutwo_0.01"]["error"] and runs["mutwo_0.01"]["lowest_peak_bytes"] > 0
    goals = script.goals("mlp", runs)
    assert all(isinstance(met, bool) for _, met in goals)
    script.plot("mlp", runs, str(tmp_path / "pareto_mlp.png"))
    assert (tmp_path / "pareto_mlp.png").stat().st_size > 0
