"""CPU smoke test of benchmarks/validate_plan.py on the zoo's MLP."""


import torch

from benchmark_scripts import load_benchmark  # (tests/)


def test_validate_plan_measures_predictions_and_training_on_cpu():
    script = load_benchmark("validate_plan")
    result = script.validate("mlp", 64, torch.device("cpu"), [1.0, 0.1])
    kept, impossible = result["budgets"]
    # MemTracker around one step of the plan that keeps everything: the step frees values at their last use
    assert abs(kept["measured_peak_bytes"] / kept["predicted_peak_bytes"] - 1) <= 0.05
    assert kept["measured_peak_bytes"] <= kept["eager_peak_bytes"] and kept["runtime"] == "graph code"
    assert "no plan fits" in impossible["error"] and impossible["lowest_peak_bytes"] > 0.1 * result["profiled_peak_bytes"]
    training = result["training"]
    assert training["eager_vs_eager"] == training["mutwo_graph_code"] == 0.0  # deterministic on the CPU
    met = dict(script.goals(result))
    assert any("step time within 5%" in goal for goal in met) and all(isinstance(v, bool) for v in met.values())
