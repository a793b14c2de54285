"""Wrapper overhead: ckpt_wrapper's checkpointing against PyTorch's, on the same blocks in one process.

Four configurations of one GPT-style decoder (identical weights) run interleaved round by round:

- ``none``: no checkpointing.
- ``functional``: the model's forward calls ``torch.utils.checkpoint.checkpoint(block, x,
  use_reentrant=False)`` on each block (the cost floor for checkpointing a block).
- ``torch_wrapper``: PyTorch's private ``checkpoint_wrapper`` on every block, through its
  ``apply_activation_checkpointing``.
- ``ckpt_wrapper``: ``ckpt_wrapper.apply_activation_checkpointing`` on every block.

A step is forward + cross-entropy + backward, with ``zero_grad`` between steps. Reported per
configuration: the median step time over rounds and its ratio to each of the others; memory held
after forward (``ckpt_wrapper.measure.held_after_forward``); on CUDA also the peak allocated during a
step (``torch.cuda.max_memory_allocated`` after a reset, above what was allocated before the step).
Also reported: per-round paired ratios, and ratios over "quiet" rounds only (every configuration
within ``--quiet-factor`` of its fastest), because on a shared machine other processes' load lands
on whichever configuration happens to be running.
Goals (docs/benchmarks.md, "How figures are measured"): CPU, ckpt_wrapper / functional <= 1.02; GPU, on the reference
workload, ckpt_wrapper / torch_wrapper <= 1.01 in step time and peak memory equal within 1%.

On CPU the script re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``
when they are not set (glibc reads them at start-up; without them freed activations go back to the OS
and fault in again, which skews the unwrapped step), and uses 2 threads.

Usage:
    # CPU, small block stack (8 blocks, width 256, sequence 128, batch 4), about a minute when idle:
    python scripts/bench/overhead.py --rounds 60 --warmup 5
    # CPU reference workload (models.CPU_REFERENCE, batch 4):
    python scripts/bench/overhead.py --reference --rounds 12 --warmup 2 --out bench-results/overhead-cpu-reference.json
    # GPU reference workload (models.GPU_REFERENCE, batch 4, bf16), the default on a CUDA machine:
    python scripts/bench/overhead.py --rounds 20 --warmup 3 --out bench-results/overhead-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as torch_apply_activation_checkpointing,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper as torch_checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

import ckpt_wrapper
from ckpt_wrapper.measure import held_after_forward
from ckpt_wrapper.testing import models
from ckpt_wrapper.tools import bench_flags, benchkit

CONFIGS = ("none", "functional", "torch_wrapper", "ckpt_wrapper")
_REFERENCES = ("none", "functional", "torch_wrapper")  # the configurations ratios are taken against


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_flags.script_parser(
        "Step time and memory of ckpt_wrapper against functional checkpoint and "
        "PyTorch's checkpoint_wrapper, interleaved in one process.",
    )
    parser.add_argument(
        "--quiet-factor", type=float, default=1.25,
        help="a round is 'quiet' when every configuration ran within this factor of its own fastest round; "
        "ratios are also reported over quiet rounds, since load from other processes hits configurations unevenly",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip held_after_forward (saves four extra forwards per config)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/overhead.json"), help="JSON results file")
    args = parser.parse_args(argv)
    bench_flags.check_run_arguments(parser, args)
    return args


_log = benchkit.make_logger("overhead")


class FunctionalCheckpointGPT(models.GPT):
    """``GPT`` whose forward checkpoints each block with the functional API; otherwise ``GPT.forward``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return self.head(self.ln_f(x))


def _build_models(
    config: models.GPTConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, nn.Module]:
    """The four configurations, all with the weights of one seeded model."""
    torch.manual_seed(seed)
    with torch.device(device):
        base = models.GPT(config).to(dtype)
        functional = FunctionalCheckpointGPT(config).to(dtype)
    functional.load_state_dict(base.state_dict())
    is_block = lambda module: isinstance(module, models.Block)  # noqa: E731
    torch_wrapped = copy.deepcopy(base)
    torch_apply_activation_checkpointing(
        torch_wrapped, checkpoint_wrapper_fn=torch_checkpoint_wrapper, check_fn=is_block
    )
    ours = copy.deepcopy(base)
    wrapped = ckpt_wrapper.apply_activation_checkpointing(ours, check_fn=is_block)
    if len(wrapped) != config.n_layer:
        raise RuntimeError(f"ckpt_wrapper wrapped {wrapped}, expected all {config.n_layer} blocks")
    return {"none": base, "functional": functional, "torch_wrapper": torch_wrapped, "ckpt_wrapper": ours}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # On CPU without the malloc settings this re-executes the script and does not return.
    run = benchkit.prepare_run(args.device, dtype=args.dtype, threads=args.threads, reexec=not args.no_reexec, log=_log)
    device, cuda, dtype = run.device, run.cuda, run.dtype
    preset, config = benchkit.model_config(args.preset, reference=args.reference, cuda=cuda,
                                           overrides={field: getattr(args, field) for field in benchkit.MODEL_FIELDS})

    environment = benchkit.environment(device)
    device_name = environment["device_name"]
    _log(f"{device} ({device_name}), torch {torch.__version__}, {environment['threads']} threads, {dtype}")
    _log(f"model {preset}: {config}, batch {args.batch}")

    built = _build_models(config, device, dtype, args.seed)
    inputs, targets = benchkit.make_batch(config, args.batch, args.seed, device)
    steps = {name: functools.partial(benchkit.train_step, model, inputs, targets) for name, model in built.items()}

    # Identical weights and inputs must give identical losses; a broken harness shows here.
    losses = {name: step().item() for name, step in steps.items()}
    _log("first-step losses: " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    if max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(losses["none"])):
        raise RuntimeError(f"configurations disagree on the loss ({losses}); the comparison would be meaningless")

    samples = benchkit.run_rounds(CONFIGS, lambda name: benchkit.timed(steps[name], device, args.steps),
                                  warmup=args.warmup, rounds=args.rounds, log=_log)
    times = {name: [s.seconds for s in rows] for name, rows in samples.items()}
    peaks = {name: [s.peak_bytes for s in rows if s.peak_bytes is not None] for name, rows in samples.items()}

    held: dict[str, int | None] = {name: None for name in CONFIGS}
    if not args.no_memory:
        for name, model in built.items():
            held[name] = held_after_forward(functools.partial(model, inputs), device=device)
            _log(f"held after forward, {name}: {held[name] / 2**20:.1f} MiB")

    results = _summarize(times, peaks, held, args.quiet_factor)
    report = {
        "benchmark": "wrapper overhead",
        "command": benchkit.command_line(),
        "environment": environment,
        "model": {"preset": preset, **dataclasses.asdict(config), "batch": args.batch, "dtype": str(dtype)},
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "first_step_losses": losses,
        "results": results["configs"],
        "paired_ratios": results["paired"],
        "quiet_rounds": results["quiet"],
        "goals": _goals(results, cuda),
    }
    print(_markdown(report, cuda))
    benchkit.write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


def _summarize(
    times: dict[str, list[float]], peaks: dict[str, list[int]], held: dict[str, int | None], quiet_factor: float
) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    configs: dict[str, dict[str, Any]] = {}
    for name in CONFIGS:
        q1, q3 = benchkit.quartiles(times[name])
        entry: dict[str, Any] = {
            "median_s": medians[name],
            "q1_s": q1,
            "q3_s": q3,
            "min_s": min(times[name]),
            "times_s": times[name],
            "ratio": {other: medians[name] / medians[other] for other in _REFERENCES},
            "held_after_forward_bytes": held[name],
        }
        if held[name] is not None and held["none"]:
            entry["held_ratio_to_none"] = held[name] / held["none"]
        if peaks[name]:
            entry["peak_above_start_bytes"] = max(peaks[name])
            entry["peak_ratio"] = {other: max(peaks[name]) / max(peaks[other]) for other in _REFERENCES}
        configs[name] = entry
    # Per-round ratios pair each measurement with its neighbour in time, which cancels slow drifts.
    paired: dict[str, dict[str, float]] = {}
    pairs = (("ckpt_wrapper", "functional"), ("ckpt_wrapper", "torch_wrapper"), ("torch_wrapper", "functional"))
    for name, other in pairs:
        ratios = [a / b for a, b in zip(times[name], times[other])]
        q1, q3 = benchkit.quartiles(ratios)
        paired[f"{name}/{other}"] = {"median": statistics.median(ratios), "q1": q1, "q3": q3}
    # Other processes on a shared machine slow whichever configuration happens to run then; rounds where
    # every configuration ran near its own best are the ones that compare wrappers rather than load.
    fastest = {name: min(values) for name, values in times.items()}
    quiet = [
        r for r in range(len(times["none"])) if all(times[name][r] <= quiet_factor * fastest[name] for name in CONFIGS)
    ]
    quiet_summary: dict[str, Any] = {"factor": quiet_factor, "count": len(quiet), "of": len(times["none"])}
    if quiet:
        quiet_medians = {name: statistics.median(times[name][r] for r in quiet) for name in CONFIGS}
        quiet_summary["median_s"] = quiet_medians
        quiet_summary["ratio"] = {
            name: {other: quiet_medians[name] / quiet_medians[other] for other in _REFERENCES}
            for name in CONFIGS
        }
    return {"configs": configs, "paired": paired, "quiet": quiet_summary}


def _goals(results: dict, cuda: bool) -> dict[str, Any]:
    ours = results["configs"]["ckpt_wrapper"]
    quiet = results["quiet"].get("ratio", {}).get("ckpt_wrapper", {})
    other, goal = ("torch_wrapper", 1.01) if cuda else ("functional", 1.02)
    ratio = ours["ratio"][other]
    goals: dict[str, Any] = {
        f"{'gpu' if cuda else 'cpu'}_time_vs_{other}": {
            "ratio": ratio,
            "quiet_rounds_ratio": quiet.get(other),
            "paired_ratio": results["paired"][f"ckpt_wrapper/{other}"]["median"],
            "goal": goal,
            "met": ratio <= goal,
        }
    }
    if not cuda:
        return goals
    peak = ours["peak_ratio"]["torch_wrapper"]
    goals["gpu_peak_vs_torch_wrapper"] = {"ratio": peak, "goal": "within 1%", "met": abs(peak - 1) <= 0.01}
    return goals


def _markdown(report: dict, cuda: bool) -> str:
    results = report["results"]
    lines = [
        benchkit.heading("Wrapper overhead", report), "",
        f"{benchkit.model_line(report)} {benchkit.rounds_sentence(report)}" + benchkit.malloc_note(report), "",
    ]
    headers = ["configuration", "step ms (median)", "IQR ms", "min ms", "/ none", "/ functional", "/ torch_wrapper",
               "held after fwd MiB", *(["peak above start MiB", "peak / torch_wrapper"] if cuda else [])]
    rows = []
    for name in CONFIGS:
        entry = results[name]
        held = entry["held_after_forward_bytes"]
        rows.append([
            name, f"{entry['median_s'] * 1e3:.2f}", f"{entry['q1_s'] * 1e3:.2f}-{entry['q3_s'] * 1e3:.2f}",
            f"{entry['min_s'] * 1e3:.2f}", *(f"{entry['ratio'][other]:.3f}" for other in _REFERENCES),
            "-" if held is None else f"{held / 2**20:.1f}",
            *([f"{entry['peak_above_start_bytes'] / 2**20:.1f}", f"{entry['peak_ratio']['torch_wrapper']:.4f}"]
              if cuda else []),
        ])
    lines += benchkit.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))
    lines.append("")
    lines.append(
        "Per-round paired ratios (median, IQR): "
        + "; ".join(
            f"{key} {v['median']:.3f} ({v['q1']:.3f}-{v['q3']:.3f})" for key, v in report["paired_ratios"].items()
        )
    )
    quiet = report["quiet_rounds"]
    if "ratio" in quiet:
        lines.append(
            f"Quiet rounds ({quiet['count']} of {quiet['of']}, every configuration within {quiet['factor']}x of its "
            "fastest), ratio of medians: "
            + "; ".join(
                f"{name}/{other} {quiet['ratio'][name][other]:.3f}"
                for name, other in (
                    ("functional", "none"), ("ckpt_wrapper", "functional"),
                    ("ckpt_wrapper", "torch_wrapper"), ("torch_wrapper", "functional"),
                )
            )
        )
    else:
        lines.append(f"Quiet rounds: none of {quiet['of']} (none had every configuration within {quiet['factor']}x)")
    for key, goal in report["goals"].items():
        extra = "".join(
            f", {label} {goal[field]:.4f}"
            for label, field in (("quiet rounds", "quiet_rounds_ratio"), ("paired", "paired_ratio"))
            if goal.get(field) is not None
        )
        judged = ", judged on all rounds" if "paired_ratio" in goal else ""
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(f"Goal {key}: {goal['ratio']:.4f}{extra} (goal {goal['goal']}{judged}): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
