"""A memory budget as users write it, in bytes."""

import re

from .errors import PlanningError

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
HOW = ('a fraction of the profiled peak in (0, 1] (0.5), a number of bytes (6_000_000_000), or a size with '
       'units ("6GiB", "6GB", "512MiB")')


def budget_bytes(memory_budget, baseline_peak_bytes: int) -> int:
    """``memory_budget`` as bytes: a float in (0, 1] is a fraction of
    ``baseline_peak_bytes``, an int is bytes, a string is a size with
    binary (GiB) or decimal (GB) units."""
    if isinstance(memory_budget, bool):
        raise PlanningError(f"memory_budget={memory_budget!r}: give {HOW}")
    if isinstance(memory_budget, float):
        if not 0 < memory_budget <= 1:
            raise PlanningError(f"memory_budget={memory_budget!r} is a float outside (0, 1]: give {HOW}")
        return int(memory_budget * baseline_peak_bytes)
    if isinstance(memory_budget, int):
        if memory_budget <= 0:
            raise PlanningError(f"memory_budget={memory_budget!r} bytes: give {HOW}")
        return memory_budget
    if isinstance(memory_budget, str):
        match = _SIZE.match(memory_budget)
        unit = match and _UNITS.get(match.group(2).lower())
        if unit is None:
            raise PlanningError(f"memory_budget={memory_budget!r} is not a size: give {HOW}")
        value = float(match.group(1)) * unit
        if value <= 0:
            raise PlanningError(f"memory_budget={memory_budget!r}: give {HOW}")
        return int(value)
    raise PlanningError(f"memory_budget is a {type(memory_budget).__name__}: give {HOW}")
