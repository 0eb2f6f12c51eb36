"""Memory plots of a report and of a batch-size sweep (PNG, matplotlib's Agg
backend). matplotlib is an optional extra (``pip install 'mutwo[plot]'``):
it is imported only when a plot is drawn; ``available()`` says whether it can
be."""

import importlib.util

from passes.enums import NodeType, Region

from .report import KINDS, _ordered, format_bytes, memory_graph

# One colour per kind, the same in every plot.
KIND_COLORS = {k.value: colour for k, colour in (
    (NodeType.PARAM, "#4c72b0"), (NodeType.BUFFER, "#8172b3"), (NodeType.OPT_STATE, "#937860"),
    (NodeType.GRAD, "#dd8452"), (NodeType.ACT, "#c44e52"), (NodeType.INPUT, "#55a868"), (NodeType.OTHER, "#8c8c8c"))}
REGION_COLORS = {r.value: colour for r, colour in (
    (Region.FORWARD, "#e8f0fb"), (Region.LOSS, "#fdf2e3"), (Region.BACKWARD, "#fbe9e9"),
    (Region.OPTIMIZER, "#eaf5ec"))}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def warm_up() -> None:
    """Import matplotlib and draw a small figure with text, which loads the
    font: what a first plot pays once per process (plot_processes.py)."""
    import io
    fig, ax = _figure((1, 1))
    ax.set_title("mutwo")
    fig.savefig(io.BytesIO(), format="png", dpi=20)


def _figure(figsize: tuple[float, float]):
    """A figure and its axes, drawn by Agg: matplotlib's object interface,
    which leaves pyplot and the user's backend alone."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def _unit(max_bytes: float) -> tuple[float, str]:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if max_bytes >= size:
            return size, unit
    return 1, "B"


def _title(data: dict) -> str:
    meta = data["meta"]
    parts = [meta.get("model") or "model"]
    if meta.get("batch_size") is not None:
        parts.append(f"batch {meta['batch_size']}")
    parts.append(meta.get("device_name", ""))
    return ", ".join(p for p in parts if p)


def memory_breakdown(data: dict, path: str) -> None:
    """One stacked bar: memory at the simulated peak by kind, each part
    labelled with its size and share of the peak."""
    memory = data["memory"]
    breakdown = memory["breakdown_at_peak"]
    kinds = [k for k in _ordered(breakdown, KINDS) if breakdown[k] > 0]
    total = sum(breakdown[k] for k in kinds) or 1
    scale, unit = _unit(total)
    measured = memory.get("measured_peak_bytes")
    top = max(total, measured or 0) / scale
    fig, ax = _figure((7, 6))
    bottom, centres = 0.0, []
    for kind in kinds:
        value = breakdown[kind] / scale
        ax.bar([0], [value], bottom=bottom, width=0.6, color=KIND_COLORS.get(kind, "#cccccc"),
               edgecolor="white")
        centres.append(bottom + value / 2)
        bottom += value
    # labels beside the bar, pushed apart so that thin parts stay readable
    gap, placed = top * 0.045, []
    for centre in centres:
        placed.append(max(centre, placed[-1] + gap) if placed else centre)
    for kind, centre, y in zip(kinds, centres, placed):
        ax.annotate(f"{kind}  {format_bytes(breakdown[kind])}  ({100 * breakdown[kind] / total:.1f}%)",
                    xy=(0.31, centre), xytext=(0.45, y), va="center", fontsize=9,
                    arrowprops={"arrowstyle": "-", "color": "#666666", "linewidth": 0.7})
    ax.set_xlim(-0.5, 2.0)
    ax.set_ylim(0, max([top * 1.05] + [y + gap / 2 for y in placed]))
    ax.set_xticks([0])
    ax.set_xticklabels([f"at the peak, while {_node_label(memory_graph(data)['nodes'], memory['peak_rank'])} runs"])
    ax.set_ylabel(f"memory at peak ({unit})")
    ax.spines[["top", "right"]].set_visible(False)
    subtitle = f"simulated peak {format_bytes(memory['peak_bytes'])}"
    if measured is not None:
        subtitle += f", measured peak {format_bytes(measured)} (dashed)"
        ax.plot([-0.35, 0.35], [measured / scale] * 2, color="black", linestyle="--", linewidth=1.2)
    ax.set_title(f"Peak memory breakdown: {_title(data)}\n{subtitle}", fontsize=10)
    # fixed margins, not tight_layout, which measures every text: a third of
    # the time of the two plots a report saves
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.07, top=0.9)
    fig.savefig(path, dpi=120)


TIMELINE_X_AXES = ("time", "rank")


def memory_timeline(data: dict, path: str, x_axis: str = "time") -> None:
    """Simulated live memory after each node stacked by kind, the regions
    shaded, the peak marked, and the allocator's measured curve on top when
    there is one (GPU). ``x_axis`` "time" spaces the nodes by their median
    times (the step as it runs: views and graph inputs take no width),
    "rank" evenly in graph order."""
    if x_axis not in TIMELINE_X_AXES:
        raise ValueError(f"x_axis is {x_axis!r}: choose one of {', '.join(TIMELINE_X_AXES)}")
    memory = data["memory"]
    timeline = memory["timeline"]
    kinds = [k for k in _ordered(timeline, KINDS) if any(timeline[k])]
    length = len(next(iter(timeline.values()), []))
    nodes = memory_graph(data)["nodes"][:length]
    starts, ends = _node_spans(nodes, length, x_axis)
    middles = [(a + b) / 2 for a, b in zip(starts, ends)]
    totals = [sum(timeline[k][r] for k in timeline) for r in range(length)]
    measured = memory.get("measured_allocated_after_bytes")
    scale, unit = _unit(max(totals + (measured or []) + [memory["peak_bytes"], 1]))
    fig, ax = _figure((14, 5.5))
    for region, first, last in _region_spans(nodes):
        ax.axvspan(starts[first], ends[last], color=REGION_COLORS.get(region, "#f4f4f4"), zorder=0)
        ax.text((starts[first] + ends[last]) / 2, 1.0, region, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=9)
        if first > 0:
            ax.axvline(starts[first], color="#666666", linewidth=0.8, linestyle=":")
    # each node's value holds from its end to the next node's end
    if kinds:
        ax.stackplot(ends, [[b / scale for b in timeline[k]] for k in kinds], labels=kinds,
                     colors=[KIND_COLORS.get(k, "#cccccc") for k in kinds], step="post", zorder=2)
    during = [n["peak_bytes"] for n in nodes] if len(nodes) == length else []
    if during:  # while a node runs: from its start to its end
        ax.plot(starts + ends[-1:], [b / scale for b in during + during[-1:]], color="#333333", linewidth=0.6,
                alpha=0.7, zorder=3, drawstyle="steps-post",
                label="measured peak while each\nnode runs (allocator)" if measured else
                      "simulated, while each node runs\n(inputs held, outputs allocated)")
    if measured:
        ax.plot(ends, [b / scale for b in measured[:length]], color="black", linewidth=1.4,
                label="measured allocated after\neach node (allocator)", zorder=4, drawstyle="steps-post")
    peak_rank, peak = memory["peak_rank"], memory["peak_bytes"]
    peak_x = middles[peak_rank] if peak_rank < length else 0
    ax.plot([peak_x], [peak / scale], marker="v", color="black", markersize=7, zorder=5, linestyle="none")
    on_the_right = length and peak_x > starts[0] + 0.6 * (ends[-1] - starts[0])  # label to the left of it
    ax.annotate(f"simulated peak {format_bytes(peak)}\n{_while_runs(nodes, peak_rank, starts, x_axis)}",
                xy=(peak_x, peak / scale), xytext=(-8 if on_the_right else 8, 2), textcoords="offset points",
                fontsize=9, va="bottom", ha="right" if on_the_right else "left", zorder=5)
    top = max(totals + during + (measured or []) + [peak, 1])
    ax.set_xlim(starts[0] if length else 0, max(ends[-1] if length else 0, 1e-9))
    ax.set_ylim(0, top / scale * 1.15)
    ax.set_xlabel("time in the step (ms, node medians laid end to end)" if x_axis == "time"
                  else "node rank (graph order)")
    ax.set_ylabel(f"live memory after each node ({unit})")
    ax.set_title(f"Live memory per node: {_title(data)}", fontsize=10, pad=16)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.subplots_adjust(left=0.055, right=0.83, bottom=0.1, top=0.88)  # the legend on the right
    fig.savefig(path, dpi=120)


def _node_spans(nodes: list[dict], length: int, x_axis: str) -> tuple[list[float], list[float]]:
    """Where each node starts and ends on the x axis."""
    if x_axis == "rank" or len(nodes) < length or not any(n.get("run_time_ms") for n in nodes):
        return [r - 0.5 for r in range(length)], [r + 0.5 for r in range(length)]
    starts, ends, t = [], [], 0.0
    for n in nodes:
        starts.append(t)
        t += n["run_time_ms"]
        ends.append(t)
    return starts, ends


def _while_runs(nodes: list[dict], rank: int, starts: list[float], x_axis: str) -> str:
    """"while layer4.0.conv2 (convolution_backward_140) runs, at 45.2 ms"."""
    when = f", at {starts[rank]:.1f} ms" if x_axis == "time" and rank < len(starts) else f", rank {rank}"
    return f"while {_node_label(nodes, rank)} runs{when}"


def _node_label(nodes: list[dict], rank: int) -> str:
    """A node by its module and name where the report has them."""
    node = nodes[rank] if rank < len(nodes) else {}
    if "name" not in node:
        return f"node {rank}"
    return f"{node['module']} ({node['name']})" if node.get("module") else node["name"]


def _region_spans(nodes: list[dict]) -> list[tuple[str, int, int]]:
    """Consecutive runs of one region: (region, first rank, last rank)."""
    spans = []
    for rank, node in enumerate(nodes):
        if spans and spans[-1][0] == node["region"]:
            spans[-1][2] = rank
        else:
            spans.append([node["region"], rank, rank])
    return [tuple(s) for s in spans]


def peak_memory_vs_batch(sweep: dict, path: str) -> None:
    """Stacked bars of memory at the peak by kind, one bar per batch size;
    out-of-memory batch sizes are marked."""
    runs = sweep["runs"]
    ok = [r for r in runs if r["status"] == "ok"]
    kinds = [k for k in KINDS if any(r["breakdown_at_peak"].get(k, 0) for r in ok)]
    planned = [(i, r["with_plan"]) for i, r in enumerate(runs) if "peak_bytes" in r.get("with_plan", {})]
    memory = sweep["meta"].get("memory")
    top = max([r["peak_bytes"] for r in ok] + [r.get("measured_peak_bytes") or 0 for r in ok]
              + [p["peak_bytes"] for _, p in planned] + [memory or 0, 1])
    scale, unit = _unit(top)
    labels = [str(r["batch_size"]) for r in runs]
    x = list(range(len(runs)))
    fig, ax = _figure((max(7, 1.1 * len(runs) + 4), 5.5))
    bottom = [0.0] * len(runs)
    for kind in kinds:
        values = [r["breakdown_at_peak"].get(kind, 0) / scale if r["status"] == "ok" else 0 for r in runs]
        ax.bar(x, values, bottom=bottom, color=KIND_COLORS.get(kind, "#cccccc"), label=kind, edgecolor="white")
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(runs):
        if r["status"] == "ok":
            ax.text(i, r["peak_bytes"] / scale, format_bytes(r["peak_bytes"]), ha="center", va="bottom", fontsize=8)
            if r.get("measured_peak_bytes") is not None:
                ax.plot([i - 0.4, i + 0.4], [r["measured_peak_bytes"] / scale] * 2, color="black",
                        linestyle="--", linewidth=1, label="measured peak" if i == 0 else None)
        else:
            ax.text(i, top / scale * 0.05, "out of\nmemory" if r["status"] == "oom" else r["status"],
                    ha="center", va="bottom", fontsize=9, color="#c44e52", fontweight="bold")
    if planned:  # sweep --budget: the step with the plan, measured
        ax.plot([i for i, _ in planned], [p["peak_bytes"] / scale for _, p in planned], "D-", color="#8172b2",
                label=f"with the plan (budget {sweep['meta']['budget']})")
    if memory:
        ax.axhline(memory / scale, color="#c44e52", linestyle=":", linewidth=1, label="memory limit")
        for i, r in enumerate(runs):
            plan_fits = r.get("with_plan", {}).get("status") == "ok"
            if r["status"] == "ok" and not r.get("fits", True) and plan_fits:
                ax.text(i, top / scale * 0.5, "fits only\nwith the plan", ha="center", va="center", fontsize=9,
                        color="#8172b2", fontweight="bold", bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlabel("mini-batch size")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_ylim(0, top / scale * 1.12)
    ax.set_title(f"Peak memory vs mini-batch size: {_sweep_title(sweep)}", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def latency_vs_batch(sweep: dict, path: str) -> None:
    """Iteration time (sum of node medians) per batch size, and throughput."""
    ok = [r for r in sweep["runs"] if r["status"] == "ok"]
    sizes = [r["batch_size"] for r in ok]
    times = [r["iteration_time_ms"] for r in ok]
    fig, ax = _figure((7, 5.5))
    if len(sizes) > 1 and max(sizes) >= 4 * min(sizes):
        ax.set_xscale("log", base=2)
    ax.plot(sizes, times, marker="o", color="#4c72b0", label="iteration time (ms)")
    for size, ms in zip(sizes, times):
        ax.annotate(f"{ms:.1f} ms", (size, ms), xytext=(4, 6), textcoords="offset points", fontsize=8)
    ax.set_xlabel("mini-batch size")
    ax.set_ylabel("iteration time (ms)")
    ax.set_ylim(0, max(times + [1]) * 1.15)
    if ok:
        second = ax.twinx()
        second.plot(sizes, [s / (ms / 1000) if ms else 0 for s, ms in zip(sizes, times)], marker="s",
                    linestyle="--", color="#55a868", label="throughput (samples/s)")
        second.set_ylabel("throughput (samples/s)")
        second.set_ylim(bottom=0)
        h2, l2 = second.get_legend_handles_labels()
        planned = [(r["batch_size"], r["with_plan"]["iteration_time_ms"]) for r in ok
                   if "iteration_time_ms" in r.get("with_plan", {})]
        if planned:  # sweep --budget: the step with the plan, measured
            ax.plot([b for b, _ in planned], [t for _, t in planned], marker="D", color="#8172b2",
                    label=f"with the plan, budget {sweep['meta']['budget']} (ms)")
            ax.set_ylim(0, max(times + [t for _, t in planned] + [1]) * 1.15)
        h1, l1 = ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.minorticks_off()
    oom = [r["batch_size"] for r in sweep["runs"] if r["status"] == "oom"]
    if oom:
        ax.axvline(oom[0], color="#c44e52", linestyle=":", linewidth=1)
        ax.text(oom[0], ax.get_ylim()[1] * 0.5, f"out of memory \nat batch {oom[0]} ", color="#c44e52",
                fontsize=8, ha="right")
    ax.set_title(f"Iteration latency vs mini-batch size: {_sweep_title(sweep)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _sweep_title(sweep: dict) -> str:
    meta = sweep["meta"]
    return ", ".join(str(p) for p in (meta.get("model"), meta.get("device_name")) if p)
