"""The command line: profile end to end in a subprocess, sweep with its plots
and its out-of-memory stop, the compile capture, and argparse errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mutwo_backend import cli
from mutwo_backend.interpreter import NodeExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_FILES = {"report.json", "nodes.csv", "activations.csv", "modules.csv", "trace.json", "memory_breakdown.png",
                "memory_timeline.png"}


def test_profile_bert_tiny_end_to_end(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "mutwo_backend", "profile", "--model", "bert-tiny",
                             "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(out)) == REPORT_FILES
    for table in ["iteration time", "region", "top 15 nodes by time", "activations by size"]:
        assert table in result.stdout
    assert f"report saved to {out}" in result.stdout
    for phase in ["capture", "passes", "warm-up: none, the recorded capture", "measurement", "report"]:
        assert f"] {phase}" in result.stderr and "done in" in result.stderr, phase
    with open(out / "report.json") as f:
        meta = json.load(f)["meta"]
    assert (meta["model"], meta["batch_size"], meta["seq_len"], meta["device"]) == ("bert-tiny", 2, 64, "cpu")


def test_sweep_mlp_writes_both_plots_and_sweep_json(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", "mlp", "--device", "cpu", "--batch-sizes", "8,2", "--iters", "1",
                     "--out", str(out), "--quiet"]) == 0
    assert {"sweep.json", "peak_memory_vs_batch.png", "latency_vs_batch.png"} <= set(os.listdir(out))
    with open(out / "sweep.json") as f:
        sweep = json.load(f)
    assert sweep["schema"] == "mutwo.sweep/1" and sweep["meta"]["model"] == "mlp"
    assert [r["batch_size"] for r in sweep["runs"]] == [2, 8]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 and r["iteration_time_ms"] > 0 for r in sweep["runs"])
    # a bigger batch holds more activations
    assert sweep["runs"][1]["activation_bytes"] > sweep["runs"][0]["activation_bytes"]
    assert set(os.listdir(out / "batch_2")) == REPORT_FILES
    assert "peak_memory_vs_batch.png" in capsys.readouterr().out


def test_sweep_stops_cleanly_at_the_first_out_of_memory(tmp_path, monkeypatch):
    real = cli.profile_zoo_model

    def profile_zoo_model(args, batch_size, phases, keep=None):
        if batch_size >= 8:  # as the interpreter raises it: wrapped, naming the node
            try:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            except torch.OutOfMemoryError as error:
                raise NodeExecutionError("node addmm (rank 7) failed: OutOfMemoryError") from error
        return real(args, batch_size, phases, keep)

    monkeypatch.setattr(cli, "profile_zoo_model", profile_zoo_model)
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", "mlp", "--device", "cpu", "--batch-sizes", "2,8,16", "--iters", "1",
                     "--no-reports", "--out", str(out), "--quiet"]) == 0
    with open(out / "sweep.json") as f:
        sweep = json.load(f)
    assert [(r["batch_size"], r["status"]) for r in sweep["runs"]] == [(2, "ok"), (8, "oom")]
    assert "addmm" in sweep["runs"][1]["error"]
    assert sweep["meta"]["not_run"] == [16]
    assert {"peak_memory_vs_batch.png", "latency_vs_batch.png"} <= set(os.listdir(out))
    assert not any(name.startswith("batch_") for name in os.listdir(out))


def test_other_errors_in_a_sweep_are_not_taken_for_out_of_memory():
    assert not cli.is_out_of_memory(RuntimeError("shape mismatch"))
    assert cli.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))


def test_profile_with_compile_capture(tmp_path):
    out = tmp_path / "report"
    assert cli.main(["profile", "--model", "mlp", "--device", "cpu", "--batch-size", "4", "--capture",
                     "compile", "--optimizer", "sgd", "--out", str(out), "--quiet"]) == 0
    with open(out / "report.json") as f:
        data = json.load(f)
    assert data["meta"]["capture"] == "compile" and data["meta"]["model"] == "mlp"
    assert data["meta"]["optimizer"] == "sgd" and data["nodes"]


@pytest.mark.parametrize("argv, message", [
    (["profile", "--model", "gpt5"], "invalid choice: 'gpt5'"),
    (["profile", "--batch-size", "0"], "is not a positive integer"),
    (["profile", "--iters", "two"], "is not an integer"),
    (["profile", "--capture", "jit"], "invalid choice: 'jit'"),
    (["sweep", "--model", "mlp"], "the following arguments are required: --batch-sizes"),
    (["sweep", "--model", "mlp", "--batch-sizes", "4,x"], "invalid batch sizes '4,x'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_non_zero_with_argparse_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "usage: python -m mutwo_backend" in err and message in err


@pytest.mark.parametrize("command", [["profile"], ["sweep", "--batch-sizes", "2"]])
def test_an_unwritable_out_directory_exits_2_before_anything_runs(command, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(cli, "get_model", lambda name: pytest.fail("the model was built"))
    assert cli.main([*command, "--model", "mlp", "--device", "cpu", "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write a report to '{tmp_path / 'file' / 'out'}'" in err and "Nothing has run" in err


def test_module_depth_and_timeline_axis_reach_the_report(tmp_path, capsys):
    assert cli.main(["profile", "--model", "mlp", "--device", "cpu", "--iters", "1", "--module-depth", "1",
                     "--timeline-x", "rank", "--out", str(tmp_path), "--quiet"]) == 0
    assert "modules (depth 1) by time" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["module_depth"] == 1


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["profile", "--model", "mlp", "--device", "cuda", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_without_a_gpu_and_without_device_the_cpu_is_used_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["profile", "--model", "mlp", "--iters", "1", "--out", str(tmp_path), "--quiet"]) == 0
    assert "no CUDA GPU is visible: profiling on the CPU" in capsys.readouterr().err
    meta = json.loads((tmp_path / "report.json").read_text())["meta"]
    assert (meta["device"], meta["batch_size"]) == ("cpu", 2)
    assert cli.main(["profile", "--model", "mlp", "--device", "cpu", "--iters", "1", "--out", str(tmp_path),
                     "--quiet"]) == 0
    assert "no CUDA GPU" not in capsys.readouterr().err


def test_help_documents_every_flag():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "profile" in a.choices).choices
    for name in ("profile", "sweep", "plan", "optimize", "max-batch"):
        for action in subparsers[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    for name in ("profile", "sweep"):
        text = subparsers[name].format_help()
        for flag in ["--model", "--seq-len", "--device", "--warmup", "--iters", "--timer", "--swap", "--capture",
                     "--optimizer", "--out", "--module-depth", "--timeline-x"]:
            assert flag in text
    assert "--batch-size " in subparsers["profile"].format_help()
    assert "--batch-sizes" in subparsers["sweep"].format_help()
