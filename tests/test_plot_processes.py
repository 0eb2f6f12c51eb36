"""Plots drawn by child processes: the same pixels as drawn in this one, the
parent drawing what a child could not, unused children ended."""

import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from mutwo_backend import plot_processes, plots  # noqa: E402
from mutwo_backend.models import get_model, zoo_train_step  # noqa: E402
from mutwo_backend.plot_processes import PLOTS, PlotProcesses  # noqa: E402
from mutwo_backend.profiler import profile_train_step  # noqa: E402


@pytest.fixture(scope="module")
def report():
    spec = get_model("mlp")
    torch.manual_seed(0)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    inputs, targets = spec.make_batch(8, spec.default_seq_len, torch.device("cpu"))
    return profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, iters=1, model_name="mlp")


@pytest.fixture
def children_everywhere(monkeypatch):
    """Children even on a machine of two cores, where none start by default."""
    monkeypatch.setattr(plot_processes, "_spare_cores", lambda: True)


def test_children_draw_the_pixels_this_process_draws(report, tmp_path, children_everywhere, caplog):
    with PlotProcesses() as processes, caplog.at_level(logging.WARNING, logger="mutwo"):
        assert sorted(processes._children) == sorted(PLOTS)
        processes.draw(report.to_dict(), str(tmp_path))
        processes.wait()
    assert caplog.text == ""  # (a failed child would leave its plot to this process, with a warning)
    for name in PLOTS:
        here = str(tmp_path / f"{name}_here.png")
        getattr(plots, name)(report.to_dict(), here)
        drawn = imread(str(tmp_path / f"{name}.png"))
        assert drawn.shape == imread(here).shape and np.array_equal(drawn, imread(here)), name


def test_a_plot_whose_child_failed_is_drawn_here_with_a_warning(report, tmp_path, children_everywhere,
                                                                monkeypatch, caplog):
    monkeypatch.setattr(plot_processes, "_CHILD", "import sys; sys.stderr.write('no luck'); sys.exit(3)")
    with caplog.at_level(logging.WARNING, logger="mutwo"):
        path = report.save(str(tmp_path))
    assert os.path.exists(path)
    for name in PLOTS:
        assert imread(str(tmp_path / f"{name}.png")).size > 0
        assert f"the process drawing {name}.png failed (exit code 3)" in caplog.text
    assert "no luck" in caplog.text


def test_children_given_nothing_to_draw_end_with_the_context(children_everywhere):
    with PlotProcesses() as processes:
        children = [child for child, _ in processes._children.values()]
    assert len(children) == len(PLOTS) and all(child.poll() is not None for child in children)


def test_profile_train_step_saves_to_report_dir(tmp_path, children_everywhere):
    spec = get_model("mlp")
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    inputs, targets = spec.make_batch(8, spec.default_seq_len, torch.device("cpu"))
    report = profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, iters=1,
                                report_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["report.json", "nodes.csv", "activations.csv", "modules.csv", "trace.json",
                                                   *(f"{name}.png" for name in PLOTS)])
    assert list(report.to_dict()["meta"]["phase_seconds"])[-1] == "save"


def test_children_whose_plots_nobody_waits_for_are_ended(report, tmp_path, children_everywhere):
    """A caller that fails between draw and wait (a full disk while writing
    report.json, say) leaves no child running and no data file behind."""
    with pytest.raises(OSError):
        with PlotProcesses() as processes:
            processes.draw(report.to_dict(), str(tmp_path))
            children = [child for child, *_ in processes._pending.values()]
            data_file = processes._data_file.name
            raise OSError("no space left on device")
    assert len(children) == len(PLOTS) and all(child.poll() is not None for child in children)
    assert not os.path.exists(data_file)
