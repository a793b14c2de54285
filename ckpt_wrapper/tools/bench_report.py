"""Reporting for ``ckpt-wrapper bench``: the JSON summary, the goals it judges, the Markdown table and the Pareto plot.

``summarize`` turns what ``ckpt_wrapper.tools.bench`` measured (a ``Measurements``) into the report
``bench.json`` holds; ``markdown`` and ``plot`` read only that report.

Example:
    >>> from ckpt_wrapper.tools.bench_report import goals
    >>> [goal["met"] for goal in goals({}, cuda=True)]  # nothing planned: nothing judged
    [None, None, None, None, None, None]
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ckpt_wrapper.testing.models import GPTConfig
from ckpt_wrapper.tools import benchkit
from ckpt_wrapper.tools.bench_configs import BenchConfig

__all__ = ["GOALS", "PREDICTION_TOLERANCE", "Measurements", "goals", "markdown", "plot", "summarize"]

# Goals per device: budget -> the most step time a plan may take there (docs/benchmarks.md, "The planner's bar", and the GPU goals).
GOALS = {"cpu": {0.5: 1.05, 0.3: 1.10, 0.1: 1.15}, "cuda": {0.5: 1.05, 0.35: 1.10}}
PREDICTION_TOLERANCE = 0.10
_MiB = 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurements:
    """What one ``ckpt-wrapper bench`` run measured, by configuration name: the input of ``summarize``."""

    environment: dict[str, Any]
    """``benchkit.environment`` of the run."""
    preset: str
    """The workload's name."""
    config: GPTConfig
    """The workload's shape."""
    dtype: torch.dtype
    """Parameter and activation dtype."""
    batch: int
    """Sequences per step."""
    rounds: int
    """Timed rounds."""
    warmup: int
    """Untimed rounds before them."""
    budgets: Sequence[float]
    """Planner budgets asked for."""
    hand_k: Sequence[int]
    """K of the hand recipes."""
    configs: Sequence[BenchConfig]
    """The configurations that ran, in table order (plans that found no plan left out)."""
    losses: dict[str, float]
    """First-step loss."""
    times: dict[str, list[float]]
    """Step seconds, one per timed round."""
    peaks: dict[str, list[int]]
    """CUDA: peak bytes above the start, one per timed round; empty lists on CPU."""
    held: dict[str, int]
    """Activation bytes held after forward."""
    flops: dict[str, int | None]
    """FLOPs of one step; ``None`` where ``FlopCounterMode`` cannot count them (compiled code)."""
    plans: dict[str, dict[str, Any]]
    """Per plan configuration: ``budget``, ``feasible``, and ``plan`` or ``error``."""


def summarize(measured: Measurements) -> dict[str, Any]:
    """The report ``bench.json`` holds: per configuration, medians and ratios to ``none``; per plan, its
    predictions beside the measurement and the best PyTorch recipe within its budget; the goals."""
    m = measured
    environment, times, peaks, held, flops, losses = m.environment, m.times, m.peaks, m.held, m.flops, m.losses
    cuda = environment["device"].startswith("cuda")
    median = {name: statistics.median(values) for name, values in times.items()}
    results: dict[str, dict[str, Any]] = {}
    for cfg in m.configs:
        name = cfg.name
        entry: dict[str, Any] = {
            "family": cfg.family, "description": cfg.description, "median_s": median[name],
            "min_s": min(times[name]), "times_s": times[name], "time_ratio": median[name] / median["none"],
            "held_after_forward_bytes": held[name], "held_ratio": held[name] / max(held["none"], 1),
            "step_flops": flops[name], "extra_flops": None if flops[name] is None else flops[name] - flops["none"], "first_loss": losses[name],
        }
        if cuda:
            entry["peak_bytes"] = max(peaks[name])
            entry["peak_ratio"] = max(peaks[name]) / max(max(peaks["none"]), 1)
        entry["memory_ratio"] = entry["peak_ratio"] if cuda else entry["held_ratio"]
        results[name] = entry

    plan_rows: dict[str, dict[str, Any]] = {}
    anchors = [n for n, r in results.items() if r["family"] == "pytorch" and "offload" not in n]
    for name, info in m.plans.items():
        row: dict[str, Any] = {"budget": info["budget"], "feasible": info["feasible"]}
        if not info["feasible"]:
            row["error"] = info["error"]
            plan_rows[name] = row
            continue
        plan, measured = info["plan"], results[name]
        strategies = collections.Counter(str(e.strategy) for e in plan.entries)
        best = min((n for n in anchors if results[n]["memory_ratio"] <= info["budget"]), key=lambda n: results[n]["median_s"], default=None)
        best_flops = min((n for n in anchors if results[n]["memory_ratio"] <= info["budget"] and results[n]["extra_flops"] is not None), key=lambda n: results[n]["extra_flops"], default=None)
        row.update({
            "strategies": dict(strategies),
            "entries": [e.to_dict() for e in plan.entries],
            "budget_bytes": plan.budget_bytes, "unwrapped_bytes": plan.unwrapped_bytes,
            "predicted_bytes": plan.predicted_bytes, "predicted_seconds": plan.predicted_seconds,
            "plan_step_seconds": plan.step_seconds, "predicted_ratio": plan.predicted_seconds / plan.step_seconds,
            "measured_seconds": measured["median_s"], "measured_ratio": measured["time_ratio"],
            "measured_held_bytes": measured["held_after_forward_bytes"], "measured_memory_ratio": measured["memory_ratio"],
            "held_within_budget": measured["held_after_forward_bytes"] <= plan.budget_bytes,
            "memory_ratio_within_budget": measured["memory_ratio"] <= info["budget"],
            "time_error": abs(plan.predicted_seconds - measured["median_s"]) / measured["median_s"],
            "ratio_error": abs(plan.predicted_seconds / plan.step_seconds - measured["time_ratio"]) / measured["time_ratio"],
            "best_pytorch_within_budget": best,
            "best_pytorch_ratio": results[best]["time_ratio"] if best else None,
            "no_slower_than_best_pytorch": None if best is None else measured["median_s"] <= results[best]["median_s"],
            "best_pytorch_by_flops": best_flops,
            "no_more_flops_than_best_pytorch": None if best_flops is None else measured["extra_flops"] <= results[best_flops]["extra_flops"],
        })
        plan_rows[name] = row

    return {
        "benchmark": "ckpt-wrapper bench", "command": benchkit.command_line(),
        "environment": environment,
        "model": {"preset": m.preset, **dataclasses.asdict(m.config), "batch": m.batch, "dtype": str(m.dtype).removeprefix("torch.")},
        "rounds": m.rounds, "warmup": m.warmup, "budgets": list(m.budgets), "hand_k": list(m.hand_k),
        "memory_measure": "peak allocated during a step above the start (CUDA)" if cuda else "held after forward (glibc mallinfo2)",
        "goals_workload": "gpu-reference" if cuda else "cpu-reference",
        "configs": results, "plans": plan_rows, "goals": goals(plan_rows, cuda),
    }


def goals(plans: dict[str, dict[str, Any]], cuda: bool) -> list[dict[str, Any]]:
    """The planner's bar (docs/benchmarks.md), judged on this run: ``met`` is None where nothing was measured."""
    goals = []
    for budget, limit in GOALS["cuda" if cuda else "cpu"].items():
        row = plans.get(f"plan_{budget:g}")
        value = "not run" if row is None else (f"{row['measured_ratio']:.3f}x" if row["feasible"] else "no plan fits")
        goals.append({"goal": f"plan at budget {budget:g}: step time <= {limit:.2f}x", "value": value,
                      "met": None if row is None else bool(row["feasible"] and row["measured_ratio"] <= limit)})
    feasible = [row for row in plans.values() if row["feasible"]]
    checks = (
        ("every plan: measured activation memory within its budget", "held_within_budget", None),
        (f"every plan: predicted step time within {PREDICTION_TOLERANCE:.0%} of measured", "time_error", PREDICTION_TOLERANCE),
        ("every plan: no slower than the best PyTorch recipe within its budget", "no_slower_than_best_pytorch", None),
        ("every plan: no more extra FLOPs than the best PyTorch recipe within its budget", "no_more_flops_than_best_pytorch", None),
    )
    for text, field, tolerance in checks:
        values = [row[field] for row in feasible if row[field] is not None]
        passed = [v <= tolerance if tolerance is not None else bool(v) for v in values]
        goals.append({"goal": text, "value": f"{sum(passed)} of {len(values)}",
                      "met": all(passed) if values else None})
    return goals


def markdown(report: dict[str, Any]) -> str:
    """``bench.md``: the configurations table, the plans table and the goals, from ``summarize``'s report."""
    model, results = report["model"], report["configs"]
    cuda = report["environment"]["device"].startswith("cuda")
    lines = [
        benchkit.heading("ckpt-wrapper bench", report), "",
        f"{benchkit.model_line(report)} Median of {report['rounds']} interleaved rounds after {report['warmup']} warm-up"
        + benchkit.malloc_note(report),
        f"Memory ratio: {report['memory_measure']}, against `none`.", "",
    ]
    headers = ["configuration", "step ms", "/ none", "held MiB", *(["peak MiB"] if cuda else []), "memory / none",
               "extra GFLOP", "what"]
    lines += benchkit.markdown_table(headers, [
        [name, f"{r['median_s'] * 1e3:.1f}", f"{r['time_ratio']:.3f}", f"{r['held_after_forward_bytes'] / _MiB:.1f}",
         *([f"{r['peak_bytes'] / _MiB:.1f}"] if cuda else []), f"{r['memory_ratio']:.3f}",
         "-" if r["extra_flops"] is None else f"{r['extra_flops'] / 1e9:.2f}", r["description"]]
        for name, r in results.items()], align="lrrr" + ("r" if cuda else "") + "rrl")
    if report["plans"]:
        yes = lambda value: "-" if value is None else ("yes" if value else "NO")  # noqa: E731
        rows = []
        for name, p in report["plans"].items():
            if not p["feasible"]:
                least = re.search(r"\(([0-9.]+x) of unwrapped\)", p["error"])
                rows.append([name, "no plan fits" + (f" (least reachable about {least.group(1)})" if least else ""),
                             *[""] * 7])
                continue
            best = ("none fits" if p["best_pytorch_within_budget"] is None
                    else f"{p['best_pytorch_within_budget']} ({p['best_pytorch_ratio']:.3f})")
            rows.append([name, ", ".join(f"{s} x{c}" for s, c in p["strategies"].items()),
                         f"{p['measured_ratio']:.3f} ({p['predicted_ratio']:.3f})", f"{p['time_error']:.1%}",
                         f"{p['measured_memory_ratio']:.3f}", yes(p["held_within_budget"]), best,
                         yes(p["no_slower_than_best_pytorch"]), yes(p["no_more_flops_than_best_pytorch"])])
        lines += [""] + benchkit.markdown_table(
            ["plan", "strategies", "time / none (predicted)", "pred. error", "memory / none", "held <= budget",
             "best PyTorch recipe within budget", "plan no slower", "plan no more FLOPs"], rows, align="llrrrllll")
    lines.append("")
    lines.append("Goals" + (f" (set for the {report['goals_workload']} workload; on `{model['preset']}` indicative only)"
                            if model["preset"] != report["goals_workload"] else "") + ":")
    for goal in report["goals"]:
        verdict = "-" if goal["met"] is None else ("met" if goal["met"] else "NOT met")
        lines.append(f"- {goal['goal']}: {goal['value']}, {verdict}")
    return "\n".join(lines)


_STYLE = {"baseline": ("X", "black"), "ckpt_wrapper": ("o", "tab:blue"), "pytorch": ("s", "tab:orange"), "plan": ("*", "tab:green")}


def plot(report: dict[str, Any], path: Path, log: Callable[[str], None]) -> bool:
    """Write ``pareto.png`` (step time against memory, both / none, with the frontier); False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed
    except ImportError:
        log("matplotlib is not installed, so no pareto.png; `pip install matplotlib` (or the dev extra) to get the plot")
        return False
    results = report["configs"]
    figure = Figure(figsize=(9, 6), dpi=120)
    axes = figure.add_subplot()
    for family, (marker, color) in _STYLE.items():
        points = [(r["memory_ratio"], r["time_ratio"], n) for n, r in results.items() if r["family"] == family]
        if not points:
            continue
        axes.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color,
                     s=140 if family == "plan" else 45, label={"baseline": "none", "pytorch": "PyTorch tools (anchors)", "plan": "ckpt_wrapper.plan"}.get(family, family), zorder=3)
        for x, y, name in points:
            label = f"plan {report['plans'][name]['budget']:g}" if family == "plan" else name
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
    frontier, best = [], float("inf")
    for x, y in sorted((r["memory_ratio"], r["time_ratio"]) for r in results.values()):
        if y < best:
            frontier.append((x, y))
            best = y
    if frontier:  # carried to the right edge: the best time reachable within each memory ratio
        frontier.append((max(r["memory_ratio"] for r in results.values()), frontier[-1][1]))
        axes.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="gray", linestyle="--",
                  linewidth=1, label="Pareto frontier", zorder=2)
    for budget in report["budgets"]:
        axes.axvline(budget, color="tab:green", alpha=0.2, linewidth=1)
        axes.annotate(f"budget {budget:g}", (budget, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                      textcoords="offset points", fontsize=6, color="tab:green", rotation=90, va="top")
    env, model = report["environment"], report["model"]
    axes.set_xlabel(f"activation memory / none ({'peak during step' if env['device'].startswith('cuda') else 'held after forward'})")
    axes.set_ylabel("step time / none (median)")
    axes.set_title(f"{model['preset']} GPT ({model['n_layer']}x{model['d_model']}, seq {model['seq_len']}, batch {model['batch']}) "
                   f"on {env['device']}, torch {env['torch']}", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    return True
