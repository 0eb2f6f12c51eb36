"""The scripts of benchmarks/ loaded as modules, for their CPU smoke tests."""

import importlib.util
import os

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
