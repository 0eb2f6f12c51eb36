"""CPU smoke test of benchmarks/compare_torch_tools.py on the zoo's MLP."""

import json

import torch

import mutwo_backend.models  # noqa: F401  (the script then imports the package normally)
from benchmark_scripts import load_benchmark  # (tests/)


def test_every_tool_on_cpu(tmp_path):
    ctt = load_benchmark("compare_torch_tools")
    case = ctt.Case("mlp", 8, 0, torch.device("cpu"))
    result = ctt.compare(case, str(tmp_path), str(tmp_path / "artifacts"))
    truth, tools = result["ground_truth"], result["tools"]
    assert "error" not in truth, truth.get("traceback")
    assert truth["params_bytes"] == sum(p.nbytes for p in ctt.fresh(case).model.parameters())
    # exp_avg and exp_avg_sq per param, plus a scalar step each
    assert 2 * truth["params_bytes"] < truth["optimizer_state_bytes"] < 2 * truth["params_bytes"] + 1024
    for tool in ("torch_profiler", "mem_tracker"):
        assert "error" not in tools[tool], tools[tool].get("traceback")
        assert tools[tool]["peak_bytes"] > truth["params_bytes"] + truth["optimizer_state_bytes"]
        assert ctt.mapped(tool, tools[tool]["breakdown"])["params"] == truth["params_bytes"]
    for tool in ("mutwo_train_step", "mutwo_compile"):  # a failure is recorded, not raised
        assert "error" in tools[tool] or tools[tool]["peak_bytes"] > 0
    assert {c["status"] for c in result["goals"]} <= {"PASS", "FAIL", "SKIP"}
    saved = json.loads((tmp_path / "compare_torch_tools_mlp.json").read_text())
    compiled = result["ground_truth_compiled"]
    assert "error" not in compiled, compiled.get("traceback")
    # the compiled MLP keeps the eager step's params and state: its peak is above them
    assert compiled["peak_bytes"] > truth["params_bytes"] + truth["optimizer_state_bytes"]
    assert saved["summary"] == result["summary"] and len(saved["table"]) == 6
    table = ctt.format_table(result["table"])
    assert all(tool in table for tool in ctt.TOOLS)


def test_goal_checks_and_mapping():
    ctt = load_benchmark("compare_torch_tools")
    truth = {"peak_bytes": 1000, "params_bytes": 100, "params_alloc_bytes": 512, "grads_bytes": 100,
             "grads_alloc_bytes": 512, "optimizer_state_bytes": 200, "optimizer_state_alloc_bytes": 1024,
             "kernel_time_ms": 10.0, "step_ms": 11.0}
    mutwo = {"time_s": 5.0, "peak_bytes": 1000, "measured_peak_bytes": 1000, "simulated_peak_bytes": 1005,
             "node_time_sum_ms": 10.4,
             "breakdown": {"PARAM": 512, "GRAD": 60, "OPT_STATE": 200, "ACT": 96, "INPUT": 7, "OTHER": 130},
             "max_over_iteration": {"GRAD": 100}}
    result = {"model": "resnet152", "batch": 64, "device": "cuda:0", "device_name": "test",
              "ground_truth": truth,
              "tools": {"mutwo_train_step": mutwo, "mutwo_compile": {"error": "RuntimeError: not there"},
                        "torch_profiler": {"time_s": 6.0, "peak_bytes": 990, "breakdown": {"ACTIVATION": 90}},
                        "mem_tracker": {"time_s": 1.0, "peak_bytes": 1000, "breakdown": {"Activation": 100}}}}
    status = {c["goal"]: c["status"] for c in ctt.goal_checks(result)}
    assert status == {
        "mutwo_train_step: peak within 1%": "PASS", "mutwo_train_step: PARAM exact": "PASS",
        "mutwo_train_step: OPT_STATE exact": "PASS", "mutwo_train_step: GRAD exact": "PASS",
        "mutwo_train_step: ACT within 5% of MemTracker": "PASS",
        "mutwo_train_step: time to report <= 20 s": "PASS", "mutwo_train_step: time <= torch.profiler's": "PASS",
        "mutwo_train_step: node times within 5% of kernel time": "PASS", "mutwo_compile: report": "FAIL"}
    assert ctt.mapped("mutwo_train_step", mutwo["breakdown"]) == {
        "params": 512, "grads": 60, "optimizer state": 200, "activations": 96, "other": 137}
    result["tools"]["mutwo_train_step"]["breakdown"]["ACT"] = 90
    result["ground_truth"]["kernel_time_ms"] = None
    status = {c["goal"]: c["status"] for c in ctt.goal_checks(result)}
    assert status["mutwo_train_step: ACT within 5% of MemTracker"] == "FAIL"
    assert status["mutwo_train_step: node times within 5% of kernel time"] == "SKIP"


def test_compile_path_is_held_to_the_compiled_step():
    """mutwo_compile's peak and node times are checked against the compiled
    program (aot_eager_default_partitioner), and the eager error is shown."""
    ctt = load_benchmark("compare_torch_tools")
    truth = {"peak_bytes": 1000, "params_bytes": 100, "params_alloc_bytes": 512, "grads_bytes": 100,
             "grads_alloc_bytes": 512, "optimizer_state_bytes": 200, "optimizer_state_alloc_bytes": 1024,
             "kernel_time_ms": 10.0, "step_ms": 11.0}
    compiled = {"peak_bytes": 1400, "kernel_time_ms": 12.0, "step_ms": 13.0}
    mutwo = {"time_s": 5.0, "peak_bytes": 1405, "measured_peak_bytes": 1405, "simulated_peak_bytes": 1300,
             "node_time_sum_ms": 11.9, "breakdown": {"PARAM": 512, "GRAD": 100, "OPT_STATE": 200, "ACT": 150},
             "max_over_iteration": {"GRAD": 100}}
    result = {"model": "bert", "batch": 16, "device": "cuda:0", "device_name": "test", "ground_truth": truth,
              "ground_truth_compiled": compiled,
              "tools": {"mutwo_compile": mutwo,
                        "mem_tracker": {"time_s": 1.0, "peak_bytes": 1000, "breakdown": {"Activation": 100}}}}
    checks = {c["goal"]: c for c in ctt.goal_checks(result)}
    peak = checks["mutwo_compile: peak within 1%"]
    assert peak["status"] == "PASS" and "(+0.36%)" in peak["detail"] and "(+40.50%)" in peak["detail"]
    assert checks["mutwo_compile: node times within 5% of kernel time"]["status"] == "PASS"
    act = checks["mutwo_compile: ACT within 5% of MemTracker"]
    assert act["status"] == "FAIL" and "+40.00% off the eager one" in act["detail"]
    rows = {r["tool"]: r for r in ctt.table_rows(result)}
    assert rows["mutwo_compile"]["vs"] == "compiled" and rows["ground truth (compiled)"]["peak_error_pct"] == 40.0
    del result["ground_truth_compiled"]  # not measured: the eager step is the reference
    assert ctt.goal_checks(result)[0]["status"] == "FAIL"
