"""Reporting for ``ckpt-wrapper bench``: the goals it judges, the Markdown table and the Pareto plot."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Goals per device: budget -> the most step time a plan may take there (DESIGN.md's CPU bar; the GPU goals).
GOALS = {"cpu": {0.5: 1.05, 0.3: 1.10, 0.1: 1.15}, "cuda": {0.5: 1.05, 0.35: 1.10}}
PREDICTION_TOLERANCE = 0.10
_MiB = 2**20


def goals(plans: dict[str, dict[str, Any]], cuda: bool) -> list[dict[str, Any]]:
    """The issue's and DESIGN.md's bar, judged on this run: ``met`` is None where nothing was measured."""
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
    env, model, results = report["environment"], report["model"], report["configs"]
    cuda = env["device"].startswith("cuda")
    lines = [
        f"### ckpt-wrapper bench: {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, {model['dtype']}",
        "",
        f"Model `{model['preset']}`: {model['n_layer']} blocks, width {model['d_model']}, {model['n_head']} heads, "
        f"sequence {model['seq_len']}, vocabulary {model['vocab_size']}, batch {model['batch']}. Median of {report['rounds']} "
        f"interleaved rounds after {report['warmup']} warm-up" + ("." if cuda else f"; malloc env {'set' if env['malloc_env_set'] else 'NOT set'}."),
        f"Memory ratio: {report['memory_measure']}, against `none`.",
        "",
        "| configuration | step ms | / none | held MiB | " + ("peak MiB | " if cuda else "") + "memory / none | extra GFLOP | what |",
        "| --- | ---: | ---: | ---: | " + ("---: | " if cuda else "") + "---: | ---: | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['median_s'] * 1e3:.1f} | {r['time_ratio']:.3f} | {r['held_after_forward_bytes'] / _MiB:.1f} | "
            + (f"{r['peak_bytes'] / _MiB:.1f} | " if cuda else "")
            + f"{r['memory_ratio']:.3f} | {r['extra_flops'] / 1e9:.2f} | {r['description']} |")
    if report["plans"]:
        lines += ["", "| plan | strategies | time / none (predicted) | pred. error | memory / none | held <= budget "
                      "| best PyTorch recipe within budget | plan no slower | plan no more FLOPs |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
        for name, p in report["plans"].items():
            if not p["feasible"]:
                least = re.search(r"\(([0-9.]+x) of unwrapped\)", p["error"])
                lines.append(f"| {name} | no plan fits" + (f" (least reachable about {least.group(1)})" if least else "") + " | | | | | | | |")
                continue
            strategies = ", ".join(f"{s} x{c}" for s, c in p["strategies"].items())
            best = "none fits" if p["best_pytorch_within_budget"] is None else f"{p['best_pytorch_within_budget']} ({p['best_pytorch_ratio']:.3f})"
            yes = lambda value: "-" if value is None else ("yes" if value else "NO")  # noqa: E731
            lines.append(
                f"| {name} | {strategies} | {p['measured_ratio']:.3f} ({p['predicted_ratio']:.3f}) | {p['time_error']:.1%} | "
                f"{p['measured_memory_ratio']:.3f} | {yes(p['held_within_budget'])} | {best} | "
                f"{yes(p['no_slower_than_best_pytorch'])} | {yes(p['no_more_flops_than_best_pytorch'])} |")
    lines.append("")
    lines.append("Goals" + (f" (set for the {report['goals_workload']} workload; on `{model['preset']}` indicative only)"
                            if model["preset"] != report["goals_workload"] else "") + ":")
    for goal in report["goals"]:
        verdict = "-" if goal["met"] is None else ("met" if goal["met"] else "NOT met")
        lines.append(f"- {goal['goal']}: {goal['value']}, {verdict}")
    return "\n".join(lines)


_STYLE = {"baseline": ("X", "black"), "ckpt_wrapper": ("o", "tab:blue"), "pytorch": ("s", "tab:orange"), "plan": ("*", "tab:green")}


def plot(report: dict[str, Any], path: Path, log: Callable[[str], None]) -> bool:
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


# --- command line ----------------------------------------------------------------------------------
