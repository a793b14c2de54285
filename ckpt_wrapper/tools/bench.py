"""``ckpt-wrapper bench``: step time against activation memory, for every way to checkpoint one model.

    ckpt-wrapper bench                                   # CPU: a small GPT, a few minutes on 2 cores
    ckpt-wrapper bench --reference --rounds 12           # the CPU reference workload (docs/benchmarks.md)
    ckpt-wrapper bench --device cuda                     # the GPU reference workload, bf16
    ckpt-wrapper bench --configs 'none,torch_*,plan_*' --budgets 0.5,0.3

One seeded ``ckpt_wrapper.testing.models.GPT`` is copied once per configuration (the copies share its
parameters: identical weights by construction, one model's worth of memory). Configurations run
interleaved round by round in a rotating order, after warm-up; each reports the median step time
(forward, cross-entropy, backward, ``zero_grad``) and its activation memory, both as ratios to no
checkpointing in the same run:

- ``none``; ckpt_wrapper: ``ckpt_full`` (every block), ``ckpt_sac_matmuls`` / ``ckpt_sac_titan``
  (op-level presets), ``ckpt_cheap`` (cheap-output recompute), on CUDA ``ckpt_offload``;
- PyTorch's own tools, called directly: ``torch_full`` (its ``checkpoint_wrapper`` on every block),
  ``torch_sac_matmuls`` / ``torch_sac_titan`` (``create_selective_checkpoint_contexts`` with its own
  policy), hand recipes ``torch_firstK[+sac_*]`` (full checkpointing of the first K blocks, the rest
  unwrapped or selective), on CUDA ``torch_offload``;
- anchors beyond PyTorch's checkpoint tools: ``remat_full`` / ``remat_save_attn`` (torch_remat, when installed:
  its checkpoint on every block, nothing or the attention annotated as a save region) and, with
  ``--compile``, ``compile_B`` (``torch.compile`` under ``activation_memory_budget`` 1.0 and each budget);
- ``plan_B``: ``ckpt_wrapper.plan`` at each budget ``B``, with its predictions beside the measurement
  (its cost model calibrated on the machine and model once per run, ``Calibration.fit``).

Memory: CPU, ``held_after_forward`` of the forward (glibc ``mallinfo2``); CUDA, the peak allocated
during a step above what was allocated before it, and held after forward. On CPU the command
re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` and uses 2 threads
(docs/benchmarks.md, "How figures are measured"). Writes ``bench.md``, ``bench.json``, ``pareto.png`` (with matplotlib) and
each plan's JSON to ``--out-dir``; the table also goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckpt_wrapper
from ckpt_wrapper.distributed import resolve_dtype
from ckpt_wrapper.measure import held_after_forward, step_flops
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.testing import models
from ckpt_wrapper.tools import bench_flags, benchkit
from ckpt_wrapper.tools.bench_configs import BenchConfig, compile_configs, configurations, plan_config, select
from ckpt_wrapper.tools.bench_report import Measurements, markdown, plot, summarize

__all__ = ["BenchOptions", "add_arguments", "options_from_args", "run"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What ``ckpt-wrapper bench`` measures and where it writes."""

    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; ``None``: CUDA when available, else CPU."""
    reference: bool = False
    """Use the device's reference workload (``CPU_REFERENCE`` or ``GPU_REFERENCE``) instead of the small GPT on CPU."""
    n_layer: int | None = None
    """Override the workload's blocks."""
    d_model: int | None = None
    """Override the workload's width."""
    n_head: int | None = None
    """Override the workload's heads."""
    seq_len: int | None = None
    """Override the workload's sequence length."""
    vocab_size: int | None = None
    """Override the workload's vocabulary."""
    batch: int = 4
    """Sequences per step."""
    dtype: str | None = None
    """``fp32``, ``bf16`` or ``fp16``; ``None``: bf16 on CUDA, fp32 on CPU."""
    rounds: int = 15
    """Timed rounds; each runs every configuration once."""
    warmup: int = 2
    """Untimed rounds first."""
    budgets: tuple[float, ...] = (0.5, 0.35, 0.3, 0.1)
    """Planner budgets, as fractions of the unwrapped activation memory."""
    hand_k: tuple[int, ...] | None = None
    """K for the hand recipes "full checkpointing of the first K blocks"; ``None``: a quarter, half, three quarters."""
    compile: bool = False
    """Add ``torch.compile`` under its memory budget (1.0 and each of ``budgets``) as anchors; each compiles for a minute or more on CPU."""
    configs: tuple[str, ...] | None = None
    """Names or shell patterns of the configurations to run (``none`` always runs); ``None``: all."""
    threads: int | None = None
    """``torch.set_num_threads``; ``None``: 2 on CPU, unchanged on CUDA."""
    seed: int = 0
    """Seed for weights and tokens."""
    out_dir: str = "bench-results"
    """Where bench.md, bench.json, pareto.png and the plans go."""
    reexec: bool = False
    """On CPU without the malloc settings, re-execute this command with them (the CLI sets it unless --no-reexec)."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.warmup < 0 or self.batch < 1:
            raise ValueError(f"need rounds >= 1, warmup >= 0, batch >= 1; got {self.rounds}, {self.warmup}, {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets must differ from each other, got {self.budgets}")
        bad = [b for b in self.budgets if not 0 < b <= 1]
        if bad:
            raise ValueError(f"budgets are fractions of the unwrapped activation memory in (0, 1]; got {bad}")
        resolve_dtype(self.dtype)  # an unknown name raises, naming the choices
        self.resolve_device()  # neither CPU nor CUDA, or CUDA without one, raises
        config = self.model_config()[1]  # GPTConfig checks the shape and says what is wrong
        if self.hand_k is not None and any(not 0 < k < config.n_layer for k in self.hand_k):
            raise ValueError(f"hand_k values must be in 1..{config.n_layer - 1} (n_layer {config.n_layer}); got {self.hand_k}")
        self.configurations()  # an unknown --configs pattern is a usage error, before anything runs

    def hand_recipe_k(self) -> tuple[int, ...]:
        """K of the hand recipes: as given, or a quarter, half and three quarters of the blocks."""
        n = self.model_config()[1].n_layer
        return self.hand_k if self.hand_k is not None else tuple(sorted({k for k in (round(n / 4), round(n / 2), round(3 * n / 4)) if 0 < k < n}))

    def configurations(self) -> list[BenchConfig]:
        """The configurations to run, ``--configs`` applied (plans wrap nothing here: they are planned at run time)."""
        cuda = self.resolve_device().type == "cuda"
        configs = configurations(self.model_config()[1].n_layer, self.hand_recipe_k(), cuda=cuda)
        if self.compile:
            configs += compile_configs(self.budgets)
        try:
            return select(configs + [plan_config(b) for b in self.budgets], self.configs)
        except ValueError as error:
            hints = []
            if not self.compile and any(p.startswith("compile") for p in self.configs or ()):
                hints.append("compile_* configurations run only with --compile")
            if not any(c.name.startswith("remat") for c in configs) and any(p.startswith("remat") for p in self.configs or ()):
                hints.append("remat_* configurations need torch_remat (pip install 'ckpt_wrapper[anchors]')")
            if not hints:
                raise
            raise ValueError(f"{error}; " + "; ".join(hints)) from None

    def resolve_device(self) -> torch.device:
        """The device to run on: ``device``, or CUDA (this rank's) when available, else CPU.

        Raises:
            ValueError: if ``device`` is no device, neither CPU nor CUDA, or CUDA where none is available.
        """
        return benchkit.check_device(self.device, command="bench")

    def model_config(self) -> tuple[str, models.GPTConfig]:
        """The workload's name and shape, overrides applied (CUDA always runs the GPU reference workload)."""
        overrides = {field: getattr(self, field) for field in benchkit.MODEL_FIELDS}
        return benchkit.model_config(None, reference=self.reference, cuda=self.resolve_device().type == "cuda",
                                     overrides=overrides)


def run(options: BenchOptions) -> int:
    """Run the benchmark; print the table, write the files, return 0.

    On CPU, with ``options.reexec`` and without the malloc settings, the process is replaced by the
    same command with them set (so this does not return). Progress goes to stderr.

    Args:
        options: the workload, the configurations and where to write.

    Returns:
        ``0``.

    Example:
        >>> import contextlib, io, tempfile
        >>> from ckpt_wrapper.tools.bench import BenchOptions, run
        >>> with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \\
        ...         contextlib.redirect_stderr(io.StringIO()):
        ...     status = run(BenchOptions(device="cpu", n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64,
        ...                               threads=1, rounds=1, warmup=0, configs=("ckpt_full",), out_dir=out))
        >>> status
        0
    """
    log = benchkit.make_logger("bench", enabled=int(os.environ.get("RANK", "0")) == 0)  # rank 0 reports
    prepared = benchkit.prepare_run(options.resolve_device(), dtype=options.dtype, threads=options.threads,
                                    reexec=options.reexec, log=log)
    try:
        report = summarize(_measure(options, prepared, log))
    finally:
        torch.set_num_threads(prepared.threads_before)
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    print(text)
    (out / "bench.md").write_text(text + "\n")
    benchkit.write_json(out / "bench.json", report)
    written = ["bench.md", "bench.json"]
    if plot(report, out / "pareto.png", log):
        written.append("pareto.png")
    log(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def _plan(model: nn.Module, tokens: torch.Tensor, budget: float, name: str, out_dir: Path,
          calibration: Calibration, log: Callable[[str], None]) -> dict[str, Any]:
    """Plan ``model`` at ``budget`` and apply the plan (saved as ``out_dir/plans/NAME.json``); what the report needs."""
    log(f"planning at budget {budget:g} ...")
    try:
        plan = ckpt_wrapper.plan(model, tokens, memory_budget=float(budget), calibration=calibration)
    except ValueError as error:
        log(f"  no plan at budget {budget:g}: {error}")
        return {"budget": budget, "feasible": False, "error": str(error)}
    plan.apply(model)
    (out_dir / "plans").mkdir(parents=True, exist_ok=True)
    plan.save(str(out_dir / "plans" / f"{name}.json"))
    for line in str(plan).splitlines():
        log(f"  {line}")
    return {"budget": budget, "feasible": True, "plan": plan}


def _calibration(model: nn.Module, tokens: torch.Tensor, device: torch.device, log: Callable[[str], None]) -> Calibration:
    """The plans' cost model, calibrated on this machine and model once (``Calibration.fit``).

    The plans' predicted seconds are judged against the measured ones; given the calibration the plans
    stay deterministic, and it is stored in each plan's JSON. Where a step is too small to fit (its bytes
    and ops alone model above it, a tiny model on a fast GPU) the measured constants are kept.
    """
    try:
        calibration = Calibration.fit(model, tokens, device=device)
    except ValueError as error:
        log(f"cost model not fitted ({error}); using the measured constants")
        calibration = Calibration.measure(device)
    log(f"cost model calibrated: {calibration}")
    return calibration


def _measure(options: BenchOptions, prepared: benchkit.Run, log: Callable[[str], None]) -> Measurements:
    device, dtype, cuda = prepared.device, prepared.dtype, prepared.cuda
    preset, config = options.model_config()
    environment = benchkit.environment(device)
    log(f"{device} ({environment['device_name']}), torch {torch.__version__}, {environment['threads']} threads, "
        f"{str(dtype).removeprefix('torch.')}" + ("" if cuda else f", malloc env {'set' if environment['malloc_env_set'] else 'NOT set'}"))
    log(f"model {preset}: {config}, batch {options.batch}")

    torch.manual_seed(options.seed)
    base = models.GPT(config).to(device=device, dtype=dtype)
    tokens, targets = benchkit.make_batch(config, options.batch, options.seed, device)
    budgets = {plan_config(b).name: b for b in options.budgets}
    if any(cfg.family == "plan" for cfg in options.configurations()):
        calibration = _calibration(base, tokens, device, log)

    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}  # copies share weights, not modules
    built: dict[str, nn.Module] = {}
    plans: dict[str, dict[str, Any]] = {}
    for cfg in options.configurations():
        model = copy.deepcopy(base, memo=dict(shared))
        if cfg.family == "plan":
            plans[cfg.name] = _plan(model, tokens, budgets[cfg.name], cfg.name, Path(options.out_dir), calibration, log)
            if not plans[cfg.name]["feasible"]:
                continue
        else:
            cfg.wrap(model)
        built[cfg.name] = model
    steps = {name: functools.partial(benchkit.train_step, model, tokens, targets) for name, model in built.items()}

    # Identical weights and inputs give the same loss under every configuration; a broken harness shows here.
    losses = {name: step().item() for name, step in steps.items()}
    tolerance = (1e-3 if dtype == torch.float32 else 2e-2) * max(1.0, abs(losses["none"]))
    wrong = {name: loss for name, loss in losses.items() if abs(loss - losses["none"]) > tolerance}
    if wrong:
        raise RuntimeError(f"configurations disagree with 'none' ({losses['none']:.6f}) on the loss: {wrong}; "
                           "expected equal losses from identical weights and tokens: a configuration changed the math")

    samples = benchkit.run_rounds(list(built), lambda name: benchkit.timed(steps[name], device),
                                  warmup=options.warmup, rounds=options.rounds, log=log)
    log("activation memory held after forward and step FLOPs ...")
    return Measurements(
        environment=environment, preset=preset, config=config, dtype=dtype, batch=options.batch,
        rounds=options.rounds, warmup=options.warmup, budgets=options.budgets, hand_k=options.hand_recipe_k(),
        configs=[c for c in options.configurations() if c.name in built], losses=losses,
        times={name: [s.seconds for s in rows] for name, rows in samples.items()},
        peaks={name: [s.peak_bytes for s in rows if s.peak_bytes is not None] for name, rows in samples.items()},
        held={name: held_after_forward(functools.partial(model, tokens), device=device) for name, model in built.items()},
        flops={c.name: step_flops(steps[c.name]) if c.counts_flops else None
               for c in options.configurations() if c.name in built}, plans=plans,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser``, in place.

    Example:
        >>> import argparse
        >>> from ckpt_wrapper.tools.bench import add_arguments, options_from_args
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> options_from_args(parser.parse_args(["--device", "cpu", "--budgets", "0.5,0.25"])).budgets
        (0.5, 0.25)
    """
    d = BenchOptions.__dataclass_fields__
    bench_flags.add_run_arguments(parser, rounds=d["rounds"].default, warmup=d["warmup"].default, steps=False)
    bench_flags.add_model_arguments(parser, preset=False)
    parser.add_argument("--budgets", type=bench_flags.comma_separated(float), default=d["budgets"].default,
                        help="planner budgets, comma-separated fractions of the unwrapped activation memory (default: 0.5,0.35,0.3,0.1)")
    parser.add_argument("--hand-k", type=bench_flags.comma_separated(int), default=None,
                        help="K values of the hand recipes 'PyTorch full checkpointing of the first K blocks' (default: n/4, n/2, 3n/4)")
    parser.add_argument("--configs", type=_config_patterns, default=None,
                        help="comma-separated names or shell patterns of configurations to run, e.g. 'torch_*,plan_*' (none always runs; default: all)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile under activation_memory_budget 1.0 and each --budgets value as anchors (a minute or more of compiling each on CPU)")
    parser.add_argument("--out-dir", default=d["out_dir"].default, help="folder for bench.md, bench.json, pareto.png, plans/ (default: %(default)s)")
    bench_flags.add_reexec_argument(parser)


def _config_patterns(text: str) -> tuple[str, ...]:
    """``--configs``: comma-separated names or shell patterns; at least one (an empty list would run only ``none``)."""
    patterns = tuple(part.strip() for part in text.split(",") if part.strip())
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected comma-separated configuration names or patterns, got {text!r}")
    return patterns


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Build ``BenchOptions`` from parsed flags.

    Raises:
        ValueError: if the flags describe no valid run.
    """
    fields = {field.name for field in dataclasses.fields(BenchOptions)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    return BenchOptions(**values, reexec=not args.no_reexec)
