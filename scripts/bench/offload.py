"""Offload: ckpt_wrapper's offload against PyTorch's ``offload_wrapper``, checkpointing, and nothing.

One GPT-style decoder (fixed-seed weights, one copy per configuration) runs forward + cross-entropy +
backward in every configuration, interleaved round by round in one process (the order rotates each
round), after warm-up rounds; step time is the median over rounds. Configurations:

- ``none``: no checkpointing, no offload.
- ``torch_offload``: PyTorch's private ``offload_wrapper`` (``save_on_cpu(pin_memory=True)``) on every
  block, through PyTorch's ``apply_activation_checkpointing``.
- ``offload``: ``ckpt_wrapper.offload_wrapper`` on every block, through one
  ``apply_activation_checkpointing`` call (so every block shares one engine).
- ``offload_first_N``: ``offload_wrapper`` on ``first_n(N, by_class(Block))``, for N in ``--first-n``.
- ``offload_all_but_last_K``: ``offload_wrapper`` on ``all_but_last(K, by_class(Block))``, for K in
  ``--all-but-last``.
- ``checkpoint``: ``ckpt_wrapper.checkpoint_wrapper`` on every block.
- ``checkpoint_offload``: ``checkpoint_wrapper(block, offload=True)`` on every block: checkpointing, and
  what the checkpoint still saves (each block's input) kept in host memory.

Reported per configuration: median step time (CUDA events on a GPU, ``time.perf_counter`` on CPU),
its forward / backward split and the ratio to ``none``; peak memory on CUDA, memory held after forward
on CPU; for ckpt_wrapper's configurations the engine's counters per step. On CUDA also the host link
and the transfer bound of every-block offload, and the goals (``offload_report``). How each figure is
taken: ``offload_measure``.

On CPU the script runs ckpt_wrapper's offload with ``cpu_copy=True`` (copies into separate host buffers)
so the copy path is exercised: its figures measure bookkeeping plus memcpy, not GPU overlap, and judge
none of the goals. It re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``
when they are not set, and uses 2 threads (docs/benchmarks.md, "How figures are measured").
Usage:
    # GPU reference workload (models.GPU_REFERENCE, batch 4, bf16), the default on a CUDA machine:
    python scripts/bench/offload.py --rounds 20 --warmup 3 --out bench-results/offload-gpu.json
    # CPU, small block stack (8 blocks, width 256, sequence 128, batch 4), copies with cpu_copy=True:
    python scripts/bench/offload.py --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as torch_apply_activation_checkpointing,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import offload_wrapper as torch_offload_wrapper

import ckpt_wrapper
from ckpt_wrapper.testing import models
from ckpt_wrapper.tools import bench_flags, benchkit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside it, also when loaded by path
import offload_measure  # noqa: E402
import offload_report  # noqa: E402
from offload_measure import Config, H2DCounter, Subject  # noqa: E402

GROUPS = ("torch_offload", "offload", "first_n", "all_but_last", "checkpoint", "checkpoint_offload")
_MiB = 2**20

_log = benchkit.make_logger("offload")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_flags.script_parser(
        "Step time, peak memory and bytes moved of ckpt_wrapper's offload against PyTorch's "
        "offload_wrapper, checkpointing and no checkpointing, interleaved in one process.",
    )
    parser.add_argument(
        "--configs", default=",".join(GROUPS),
        help=f"comma-separated configuration groups to run besides 'none' (always run): {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--first-n", type=bench_flags.comma_separated(int), default=None,
        help="comma-separated N for offload_first_N ('' for none); default n_layer//8, n_layer//4, n_layer//2, "
        "3*n_layer//4 (at least 1, duplicates dropped)",
    )
    parser.add_argument(
        "--all-but-last", type=bench_flags.comma_separated(int), default="1,2",
        help="comma-separated K for offload_all_but_last_K ('' for none)",
    )
    parser.add_argument(
        "--min-bytes", type=int, default=None,
        help="OffloadOptions.min_bytes for ckpt_wrapper's configurations; default the library's (64 KiB)",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=None,
        help="OffloadOptions.max_in_flight for ckpt_wrapper's configurations; default the library's",
    )
    parser.add_argument("--no-prefetch", action="store_true", help="OffloadOptions(prefetch=False)")
    parser.add_argument(
        "--no-cpu-copy", action="store_true",
        help="on CPU, run ckpt_wrapper's offload without cpu_copy=True (then it copies nothing: a no-op that warns)",
    )
    parser.add_argument(
        "--link-mib", type=int, default=256, help="CUDA: size of the pinned-buffer copy that measures the host link"
    )
    parser.add_argument("--link-repeats", type=int, default=10, help="CUDA: timed copies each way (median)")
    parser.add_argument(
        "--empty-cache", action="store_true",
        help="CUDA: torch.cuda.empty_cache() before each configuration's step (outside the timing). Off by default: "
        "the next step then pays cudaMalloc inside the timing, more for configurations with a higher peak",
    )
    parser.add_argument(
        "--no-memory", action="store_true",
        help="CPU: skip held_after_forward (four extra forwards per configuration)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/offload.json"), help="JSON results file")
    args = parser.parse_args(argv)
    bench_flags.check_run_arguments(parser, args)
    groups = [g.strip() for g in args.configs.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--configs: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    args.groups = [g for g in GROUPS if g in groups]
    for flag in ("link_mib", "link_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args



def _plan(args: argparse.Namespace, n_layer: int) -> list[Config]:
    """The configurations to run, in table order."""
    plan = [Config(name="none", kind="none", offloaded=0, checkpointed=0)]
    if "torch_offload" in args.groups:
        plan.append(Config(name="torch_offload", kind="torch_offload", offloaded=n_layer, checkpointed=0))
    if "offload" in args.groups:
        plan.append(Config(name="offload", kind="offload", offloaded=n_layer, checkpointed=0))
    if "first_n" in args.groups:
        wanted = args.first_n
        if wanted is None:
            wanted = [max(1, n_layer // 8), max(1, n_layer // 4), max(1, n_layer // 2), max(1, 3 * n_layer // 4)]
        for n in sorted(set(wanted)):
            if not 1 <= n <= n_layer:
                raise ValueError(f"--first-n: N must be in 1..{n_layer} (the model's blocks), got {n}")
            plan.append(Config(name=f"offload_first_{n}", kind="first_n", offloaded=n, checkpointed=0))
    if "all_but_last" in args.groups:
        for k in sorted(set(args.all_but_last)):
            if not 0 <= k < n_layer:
                raise ValueError(f"--all-but-last: K must be in 0..{n_layer - 1}, got {k}")
            name = f"offload_all_but_last_{k}"
            plan.append(Config(name=name, kind="all_but_last", offloaded=n_layer - k, checkpointed=0))
    if "checkpoint" in args.groups:
        plan.append(Config(name="checkpoint", kind="checkpoint", offloaded=0, checkpointed=n_layer))
    if "checkpoint_offload" in args.groups:
        plan.append(
            Config(name="checkpoint_offload", kind="checkpoint_offload", offloaded=n_layer, checkpointed=n_layer)
        )
    return plan



def _offload_options(args: argparse.Namespace, run: benchkit.Run) -> ckpt_wrapper.OffloadOptions:
    """Options for ckpt_wrapper's configurations: the library's defaults but for the flags given."""
    given: dict[str, Any] = {}
    if not run.cuda and not args.no_cpu_copy:
        given["cpu_copy"] = True  # on CPU, copy anyway: exercises the copy path (and frees nothing)
    if args.min_bytes is not None:
        given["min_bytes"] = args.min_bytes
    if args.max_in_flight is not None:
        given["max_in_flight"] = args.max_in_flight
    if args.no_prefetch:
        given["prefetch"] = False
    return ckpt_wrapper.OffloadOptions(**given)



def _build(config: Config, base: nn.Module, options: ckpt_wrapper.OffloadOptions) -> nn.Module:
    """A copy of ``base`` wrapped as ``config`` says (``none`` is ``base`` itself)."""
    if config.kind == "none":
        return base
    model = copy.deepcopy(base)
    blocks = ckpt_wrapper.by_class(models.Block)
    if config.kind == "torch_offload":
        torch_apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=torch_offload_wrapper, check_fn=lambda m: isinstance(m, models.Block)
        )
        return model
    offload = functools.partial(ckpt_wrapper.offload_wrapper, **dataclasses.asdict(options))
    fn, select = {
        "offload": (offload, blocks),
        "first_n": (offload, ckpt_wrapper.first_n(config.offloaded, blocks)),
        "all_but_last": (offload, ckpt_wrapper.all_but_last(model.config.n_layer - config.offloaded, blocks)),
        "checkpoint": (ckpt_wrapper.checkpoint_wrapper, blocks),
        "checkpoint_offload": (functools.partial(ckpt_wrapper.checkpoint_wrapper, offload=options), blocks),
    }[config.kind]
    wrapped = ckpt_wrapper.apply_activation_checkpointing(model, checkpoint_wrapper_fn=fn, check_fn=select)
    expected = max(config.offloaded, config.checkpointed)
    if len(wrapped) != expected:
        raise RuntimeError(f"{config.name}: wrapped {wrapped}, expected {expected} blocks")
    return model



def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # On CPU without the malloc settings this re-executes the script and does not return.
    run = benchkit.prepare_run(args.device, dtype=args.dtype, threads=args.threads, reexec=not args.no_reexec, log=_log)
    preset, config = benchkit.model_config(args.preset, reference=args.reference, cuda=run.cuda,
                                           overrides={field: getattr(args, field) for field in benchkit.MODEL_FIELDS})
    environment = benchkit.environment(run.device)
    _log(
        f"{run.device} ({environment['device_name']}), torch {torch.__version__}, "
        f"{environment['threads']} threads, {run.dtype}"
    )
    _log(f"model {preset}: {config}, batch {args.batch}")
    if not run.cuda:
        _log("CPU: ckpt_wrapper offload runs with cpu_copy=True; figures are bookkeeping + memcpy, not GPU overlap")

    try:
        plan = _plan(args, config.n_layer)
    except ValueError as error:
        print(f"offload.py: error: {error}", file=sys.stderr)
        return 2
    options = _offload_options(args, run)

    link = None
    if run.cuda:
        link = offload_measure.host_link(run.device, args.link_mib * _MiB, args.link_repeats)
        _log(
            f"host link: D2H {link['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, "
            f"H2D {link['h2d']['bytes_per_s'] / 1e9:.1f} GB/s"
        )
    torch.manual_seed(args.seed)
    with torch.device(run.device):
        base = models.GPT(config).to(run.dtype)
    subjects = []
    for item in plan:
        model = _build(item, base, options)
        engines = offload_measure.engines(model)
        subjects.append(Subject(item, model, engines, [H2DCounter(e) for e in engines]))
    _log(f"configurations: {', '.join(s.config.name for s in subjects)}")
    inputs, targets = benchkit.make_batch(config, args.batch, args.seed, run.device)

    # Identical weights and inputs give the same loss in every configuration; a broken harness shows here.
    losses = {subject.config.name: benchkit.train_step(subject.model, inputs, targets).item() for subject in subjects}
    _log("first-step losses: " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    if max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(losses["none"])):
        raise RuntimeError(f"configurations disagree on the loss ({losses}); the comparison would be meaningless")

    by_name = {subject.config.name: subject for subject in subjects}
    figures: dict[str, dict[str, Any] | None] = {}

    def measure(name: str) -> offload_measure.Sample:
        if run.cuda and args.empty_cache:
            torch.cuda.empty_cache()
        sample = offload_measure.timed(by_name[name], inputs, targets, args.steps, run.device)
        figures[name] = by_name[name].engine_figures(args.steps)  # the last call's, a timed one, is kept
        return sample

    samples = benchkit.run_rounds(list(by_name), measure, warmup=args.warmup, rounds=args.rounds, log=_log)

    held: dict[str, dict[str, int] | None] = {s.config.name: None for s in subjects}
    if not run.cuda and not args.no_memory:
        for subject in subjects:
            held[subject.config.name] = offload_measure.held_cpu(subject, inputs)
            total = held[subject.config.name]["total_bytes"]
            _log(f"held after forward + host buffers, {subject.config.name}: {total / _MiB:.1f} MiB")

    results = offload_report.summarize(subjects, samples, figures, held, link)
    bound = offload_report.bound(results, link)
    report = {
        "benchmark": "offload",
        "command": benchkit.command_line(),
        "environment": environment,
        "model": {"preset": preset, **dataclasses.asdict(config), "batch": args.batch, "dtype": str(run.dtype)},
        "offload_options": dataclasses.asdict(options),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "empty_cache": bool(run.cuda and args.empty_cache),
        "first_step_losses": losses,
        "host_link": link,
        "results": results,
        "transfer_bound": bound,
        "goals": offload_report.goals(results, bound, run.cuda),
        "note": None if run.cuda else "CPU: cpu_copy=True; figures measure bookkeeping + memcpy, not GPU overlap",
    }
    print(offload_report.markdown(report, run.cuda))
    benchkit.write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

