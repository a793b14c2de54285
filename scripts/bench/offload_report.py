"""The report of ``scripts/bench/offload.py``: per-configuration summary, the transfer bound, goals, Markdown.

The transfer bound of every-block offload, on CUDA, from the measured host link:

    bound = max(F, D / bw_d2h) + max(B, D / bw_h2d)

with D the bytes the engine copies out per step, F and B the forward and backward time of ``none``.
It is the fastest a step could be if every copy ran at link speed and hid entirely behind compute of
its own phase, given that forward's copies out cannot overlap backward's copies in (backward first
needs the last block's tensors, the last to be copied out). The figure is ``offload`` step / bound.

Goals judged on CUDA, on the GPU reference workload (docs/benchmarks.md, "Reference workloads"):
- ``offload`` at least 2x faster than ``torch_offload`` at equal or lower peak, and within 15% of the
  transfer bound (``offload`` / bound <= 1.15);
- some ``offload_first_N`` at most 1.03x ``none`` while its peak drops by the bytes it offloads
  (drop / bytes copied >= 0.95);
- ``checkpoint_offload`` at most 1.01x ``checkpoint`` with a lower peak than ``checkpoint``.
"""

from __future__ import annotations

import statistics
from typing import Any

from offload_measure import Sample, Subject

from ckpt_wrapper.tools import benchkit

__all__ = ["bound", "goals", "markdown", "summarize"]

_MiB = 2**20
# The offload goals; judged on CUDA only.
_GOAL_SPEEDUP_VS_TORCH = 2.0
_GOAL_BOUND_RATIO = 1.15
_GOAL_FIRST_N_TIME = 1.03
_GOAL_FIRST_N_DROP = 0.95  # peak drop / bytes copied out
_GOAL_CKPT_OFFLOAD_TIME = 1.01


def summarize(
    subjects: list[Subject],
    samples: dict[str, list[Sample]],
    figures: dict[str, dict[str, Any] | None],
    held: dict[str, dict[str, int] | None],
    link: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """Per configuration: median step time and its split, IQR, ratio to ``none``, peaks or CPU memory, engine counters."""
    results: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        config = subject.config
        rows = samples[config.name]
        times = [s.seconds for s in rows]
        q1, q3 = benchkit.quartiles(times)
        forward = statistics.median(s.forward_s for s in rows)
        entry: dict[str, Any] = {
            "kind": config.kind,
            "blocks_offloaded": config.offloaded,
            "blocks_checkpointed": config.checkpointed,
            "median_s": statistics.median(times),
            "q1_s": q1,
            "q3_s": q3,
            "min_s": min(times),
            "times_s": times,
            "forward_median_s": forward,
            "backward_median_s": statistics.median(s.seconds - s.forward_s for s in rows),
            "wall_median_s": statistics.median(s.wall_s for s in rows),
            "engine_per_step": figures[config.name],
        }
        peaks = [s.peak_bytes for s in rows if s.peak_bytes is not None]
        if peaks:
            # The largest over rounds: a goal about staying under a peak is judged on its worst round.
            entry["peak_allocated_above_start_bytes"] = max(peaks)
            entry["peak_active_above_start_bytes"] = max(s.peak_active_bytes for s in rows)
            entry["peaks_allocated_bytes"] = peaks
            entry["peaks_active_bytes"] = [s.peak_active_bytes for s in rows]
        if held[config.name] is not None:
            entry["cpu_memory"] = held[config.name]
        engine = figures[config.name]
        if link is not None and engine is not None:
            entry["link_time_s"] = {
                "d2h": engine["copied_bytes"] / link["d2h"]["bytes_per_s"],
                "h2d": engine["copied_bytes"] / link["h2d"]["bytes_per_s"],
            }
        results[config.name] = entry
    none = results["none"]
    for entry in results.values():
        entry["ratio_to_none"] = entry["median_s"] / none["median_s"]
        peak = entry.get("peak_active_above_start_bytes")
        if peak is not None:
            entry["peak_drop_vs_none_bytes"] = none["peak_active_above_start_bytes"] - peak
            entry["peak_ratio_to_none"] = peak / none["peak_active_above_start_bytes"]
        elif "cpu_memory" in entry and "cpu_memory" in none:
            held = entry["cpu_memory"]["total_bytes"]
            entry["memory_drop_vs_none_bytes"] = none["cpu_memory"]["total_bytes"] - held
    return results



def bound(results: dict[str, dict[str, Any]], link: dict[str, Any] | None) -> dict[str, Any] | None:
    """The transfer bound of every-block offload (see the module docstring), or None without link or offload."""
    offload = results.get("offload")
    if link is None or offload is None or not offload["engine_per_step"]:
        return None
    none = results["none"]
    copied = offload["engine_per_step"]["copied_bytes"]
    d2h = copied / link["d2h"]["bytes_per_s"]
    h2d = copied / link["h2d"]["bytes_per_s"]
    bound = max(none["forward_median_s"], d2h) + max(none["backward_median_s"], h2d)
    return {
        "copied_bytes": copied,
        "d2h_s": d2h,
        "h2d_s": h2d,
        "transfer_s": d2h + h2d,
        "none_forward_s": none["forward_median_s"],
        "none_backward_s": none["backward_median_s"],
        "bound_s": bound,
        "offload_s": offload["median_s"],
        "offload_over_bound": offload["median_s"] / bound,
        "exposed_over_transfer": (offload["median_s"] - none["median_s"]) / (d2h + h2d),
        "definition": "bound = max(F_none, D/bw_d2h) + max(B_none, D/bw_h2d), D = bytes copied out per step",
    }



def goals(results: dict[str, dict[str, Any]], transfer: dict[str, Any] | None, cuda: bool) -> dict[str, Any]:
    """The GPU goals of the module docstring, judged on ``results`` (on CPU: a note that they are not)."""
    if not cuda:
        return {"note": "GPU goals; not judged on CPU (cpu_copy measures bookkeeping and memcpy, not overlap)"}
    goals: dict[str, Any] = {}
    offload, torch_offload = results.get("offload"), results.get("torch_offload")
    if offload and torch_offload:
        speedup = torch_offload["median_s"] / offload["median_s"]
        peak_ok = offload["peak_active_above_start_bytes"] <= torch_offload["peak_active_above_start_bytes"]
        goals["offload_vs_torch_offload"] = {
            "speedup": speedup,
            "peak_ratio": offload["peak_active_above_start_bytes"] / torch_offload["peak_active_above_start_bytes"],
            "goal": f"speedup >= {_GOAL_SPEEDUP_VS_TORCH}, peak ratio <= 1",
            "met": speedup >= _GOAL_SPEEDUP_VS_TORCH and peak_ok,
        }
    if transfer is not None:
        goals["offload_vs_transfer_bound"] = {
            "ratio": transfer["offload_over_bound"],
            "goal": f"<= {_GOAL_BOUND_RATIO}",
            "met": transfer["offload_over_bound"] <= _GOAL_BOUND_RATIO,
        }
    first = {name: r for name, r in results.items() if r["kind"] == "first_n" and r["engine_per_step"]}
    if first:
        judged = {}
        for name, entry in first.items():
            copied = entry["engine_per_step"]["copied_bytes"]
            drop = entry["peak_drop_vs_none_bytes"] / copied if copied else 0.0
            judged[name] = {
                "ratio": entry["ratio_to_none"],
                "peak_drop_over_copied": drop,
                "met": entry["ratio_to_none"] <= _GOAL_FIRST_N_TIME and drop >= _GOAL_FIRST_N_DROP,
            }
        passing = [n for n, j in judged.items() if j["met"]]
        best = max(passing, key=lambda n: results[n]["peak_drop_vs_none_bytes"]) if passing else None
        goals["first_n_hidden"] = {
            "per_n": judged,
            "best": best,
            "goal": f"time / none <= {_GOAL_FIRST_N_TIME} and peak drop >= {_GOAL_FIRST_N_DROP} x bytes copied",
            "met": best is not None,
        }
    ckpt, ckpt_offload = results.get("checkpoint"), results.get("checkpoint_offload")
    if ckpt and ckpt_offload:
        ratio = ckpt_offload["median_s"] / ckpt["median_s"]
        lower = ckpt_offload["peak_active_above_start_bytes"] < ckpt["peak_active_above_start_bytes"]
        goals["checkpoint_offload_vs_checkpoint"] = {
            "ratio": ratio,
            "peak_drop_bytes": ckpt["peak_active_above_start_bytes"] - ckpt_offload["peak_active_above_start_bytes"],
            "goal": f"time <= {_GOAL_CKPT_OFFLOAD_TIME}x checkpoint, peak below checkpoint's",
            "met": ratio <= _GOAL_CKPT_OFFLOAD_TIME and lower,
        }
    return goals



def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / _MiB:.1f}"



def markdown(report: dict[str, Any], cuda: bool) -> str:
    """The Markdown report: configurations, engine counters, host link, transfer bound, goals."""
    results = report["results"]
    lines = [
        benchkit.heading("Offload", report), "",
        f"{benchkit.model_line(report)} {benchkit.rounds_sentence(report)}. Offload options: `{report['offload_options']}`"
        + benchkit.malloc_note(report), "",
    ]
    if not cuda:
        lines += [
            "**CPU: these figures measure the engine's bookkeeping plus memcpy (cpu_copy=True), not GPU overlap. "
            "Offload frees no memory on CPU; the GPU goals are not judged here.**",
            "",
        ]
    memory = ["peak active MiB", "peak allocated MiB"] if cuda else ["held after fwd + host buffers MiB"]
    headers = ["configuration", "offloaded / checkpointed blocks", "step ms (median)", "IQR ms", "/ none", "fwd ms",
               "bwd ms", *memory, "drop vs none MiB"]
    rows = []
    for name, entry in results.items():
        if cuda:
            mem = [_mib(entry.get("peak_active_above_start_bytes")), _mib(entry.get("peak_allocated_above_start_bytes"))]
            drop = entry.get("peak_drop_vs_none_bytes")
        else:
            mem = [_mib(entry["cpu_memory"]["total_bytes"] if "cpu_memory" in entry else None)]
            drop = entry.get("memory_drop_vs_none_bytes")
        rows.append([
            name, f"{entry['blocks_offloaded']} / {entry['blocks_checkpointed']}", f"{entry['median_s'] * 1e3:.2f}",
            f"{entry['q1_s'] * 1e3:.2f}-{entry['q3_s'] * 1e3:.2f}", f"{entry['ratio_to_none']:.3f}",
            f"{entry['forward_median_s'] * 1e3:.2f}", f"{entry['backward_median_s'] * 1e3:.2f}", *mem, _mib(drop),
        ])
    lines += benchkit.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))
    if cuda:
        lines += [
            "",
            "Peaks are above what was allocated before the step, the largest over rounds. *Active* counts memory "
            "Python has freed but the allocator cannot reuse yet, because a side-stream copy recorded on it "
            "(`record_stream`) has not finished; *allocated* (`max_memory_allocated`) does not, so it understates "
            "an offloading step. Drops and goals use active.",
        ]
    engine_rows = [(n, e) for n, e in results.items() if e["engine_per_step"]]
    if engine_rows:
        lines += [
            "",
            "ckpt_wrapper engine, per step (copied = storages copied out; H2D = bytes copied back, prefetched or "
            "restored on demand" + ("; link ms = copied bytes at the measured link speed, D2H / H2D" if cuda else "")
            + "):",
            "",
        ]
        headers = ["configuration", "copied MiB", "copies", "shared", "kept small", "prefetched", "restores",
                   "H2D MiB", *(["link ms D2H / H2D"] if cuda else []), "host pool MiB"]
        rows = []
        for name, entry in engine_rows:
            e, link_s = entry["engine_per_step"], entry.get("link_time_s")
            link_cell = "-" if link_s is None else f"{link_s['d2h'] * 1e3:.1f} / {link_s['h2d'] * 1e3:.1f}"
            rows.append([
                name, _mib(e["copied_bytes"]), *(f"{e[k]:.0f}" for k in ("copies", "shared", "kept_small", "prefetched",
                                                                          "restores")),
                _mib(e["h2d_bytes"]), *([link_cell] if cuda else []), _mib(e["host_pool_bytes"]),
            ])
        lines += benchkit.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))
    link = report.get("host_link")
    if link:
        lines += [
            "",
            f"Host link (pinned, {link['bytes'] / _MiB:.0f} MiB copies, median of {link['repeats']}): "
            f"D2H {link['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, H2D {link['h2d']['bytes_per_s'] / 1e9:.1f} GB/s; "
            f"both at once: D2H {link['duplex']['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, "
            f"H2D {link['duplex']['h2d']['bytes_per_s'] / 1e9:.1f} GB/s.",
        ]
    bound = report.get("transfer_bound")
    if bound:
        lines += [
            "",
            f"Transfer bound of `offload` (every block): D = {bound['copied_bytes'] / 2**30:.2f} GiB copied out per "
            f"step; D/bw: D2H {bound['d2h_s'] * 1e3:.1f} ms, H2D {bound['h2d_s'] * 1e3:.1f} ms; `none` forward "
            f"{bound['none_forward_s'] * 1e3:.1f} ms, backward {bound['none_backward_s'] * 1e3:.1f} ms. "
            f"Bound = max(F, D/bw_d2h) + max(B, D/bw_h2d) = {bound['bound_s'] * 1e3:.1f} ms; `offload` "
            f"{bound['offload_s'] * 1e3:.1f} ms = **{bound['offload_over_bound']:.3f}x the bound**. "
            f"(Time above `none` / (D2H + H2D time): {bound['exposed_over_transfer']:.3f}.)",
        ]
    lines.append("")
    goals = report["goals"]
    if "note" in goals:
        lines.append(f"Goals: {goals['note']}.")
    for key, goal in goals.items():
        if key == "note":
            continue
        verdict = "met" if goal["met"] else "NOT met"
        if key == "offload_vs_torch_offload":
            detail = f"{goal['speedup']:.2f}x faster, peak {goal['peak_ratio']:.3f}x torch_offload's"
        elif key == "offload_vs_transfer_bound":
            detail = f"{goal['ratio']:.3f}x the bound"
        elif key == "first_n_hidden":
            detail = "; ".join(
                f"{n} {j['ratio']:.3f}x, peak drop {j['peak_drop_over_copied']:.2f}x copied"
                for n, j in goal["per_n"].items()
            ) + (f"; best {goal['best']}" if goal["best"] else "")
        else:
            detail = (
                f"{goal['ratio']:.4f}x checkpoint, peak {goal['peak_drop_bytes'] / _MiB:.1f} MiB below checkpoint's"
            )
        lines.append(f"Goal {key}: {detail} (goal {goal['goal']}): {verdict}")
    return "\n".join(lines)

