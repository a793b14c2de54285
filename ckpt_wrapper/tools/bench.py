"""``ckpt-wrapper bench``: step time against activation memory, for every way to checkpoint one model.

    ckpt-wrapper bench                                   # CPU: a small GPT, a few minutes on 2 cores
    ckpt-wrapper bench --reference --rounds 12           # the CPU reference workload (DESIGN.md)
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
- ``plan_B``: ``ckpt_wrapper.plan`` at each budget ``B``, with its predictions beside the measurement.

Memory: CPU, ``held_after_forward`` of the forward (glibc ``mallinfo2``); CUDA, the peak allocated
during a step above what was allocated before it, and held after forward. On CPU the command
re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` and uses 2 threads
(DESIGN.md, "Measuring"). Writes ``bench.md``, ``bench.json``, ``pareto.png`` (with matplotlib) and
each plan's JSON to ``--out-dir``; the table also goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import fnmatch
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_ac
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import ckpt_wrapper
from ckpt_wrapper.testing import models
from ckpt_wrapper.tools.bench_report import goals as _goals, markdown as _markdown, plot as _plot
from ckpt_wrapper.measure import held_after_forward, step_flops

__all__ = ["BenchOptions", "MALLOC_ENV", "add_arguments", "malloc_env_set", "options_from_args", "run", "train_step"]

# glibc reads these when the process starts, so they are set by re-executing, not in os.environ.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SMALL = models.GPTConfig(n_layer=8, d_model=256, n_head=4, seq_len=128, vocab_size=2000)
_MODEL_FIELDS = ("n_layer", "d_model", "n_head", "seq_len", "vocab_size")
# DESIGN.md, "The bar for the planner" (CPU) and the GPU goals: budget -> largest step-time ratio.
"""A plan's predicted step time should be within this fraction of the measured one."""


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
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        device = self.resolve_device()
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: bench runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asks for CUDA but none is available; use cpu")
        config = self.model_config()[1]  # GPTConfig checks the shape and says what is wrong
        if self.hand_k is not None and any(not 0 < k < config.n_layer for k in self.hand_k):
            raise ValueError(f"hand_k values must be in 1..{config.n_layer - 1} (n_layer {config.n_layer}); got {self.hand_k}")
        self.configurations()  # an unknown --configs pattern is a usage error, before anything runs

    def hand_recipe_k(self) -> tuple[int, ...]:
        """K of the hand recipes: as given, or a quarter, half and three quarters of the blocks."""
        n = self.model_config()[1].n_layer
        return self.hand_k if self.hand_k is not None else tuple(sorted({k for k in (round(n / 4), round(n / 2), round(3 * n / 4)) if 0 < k < n}))

    def configurations(self) -> list[_Config]:
        """The configurations to run, ``--configs`` applied (plans wrap nothing here: they are planned at run time)."""
        cuda = self.resolve_device().type == "cuda"
        configs = _configurations(self.model_config()[1].n_layer, self.hand_recipe_k(), cuda)
        configs += [_Config(f"plan_{b:g}", "plan", f"ckpt_wrapper.plan at budget {b:g}", lambda m: None) for b in self.budgets]
        return _select(configs, self.configs)

    def resolve_device(self) -> torch.device:
        """The device to run on."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"device {self.device!r} is not a device ({error}); use cpu, cuda or cuda:N") from None

    def model_config(self) -> tuple[str, models.GPTConfig]:
        """The workload's name and shape, overrides applied."""
        cuda = self.resolve_device().type == "cuda"
        name, base = ("gpu-reference", models.GPU_REFERENCE) if cuda else (
            ("cpu-reference", models.CPU_REFERENCE) if self.reference else ("small", _SMALL))
        overrides = {f: getattr(self, f) for f in _MODEL_FIELDS if getattr(self, f) is not None}
        return name, dataclasses.replace(base, **overrides)


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str
    family: str  # "baseline", "ckpt_wrapper", "pytorch" or "plan"
    description: str
    wrap: Callable[[nn.Module], Any]  # modifies a copy of the model in place


# --- PyTorch's own tools, called directly (not through ckpt_wrapper.selective) ---------------------

_aten = torch.ops.aten
_TORCH_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}
_TORCH_ATTENTION = {
    getattr(_aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(_aten, name)
}


def _torch_sac_context(preset: str) -> Callable[[], Any]:
    """A ``context_fn`` as torchtitan writes one: fresh per-checkpoint state, counted per pass.

    ``matmuls`` saves every matmul and attention output. ``titan`` is torchtitan's op list (attention
    saved, every second matmul recomputed); ``addmm`` counts as a matmul because the GPT's linears
    have biases (torchtitan's models have none, so its list names only ``mm``).
    """

    def context_fn() -> Any:
        counts: collections.Counter[str] = collections.Counter()

        def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            if op in _TORCH_ATTENTION:
                return CheckpointPolicy.MUST_SAVE
            if op in _TORCH_MATMULS:
                key = "recompute" if ctx.is_recompute else "forward"
                counts[key] += 1
                if preset == "titan" and counts[key] % 2 == 0:
                    return CheckpointPolicy.PREFER_RECOMPUTE
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context_fn


def _torch_wrap_blocks(model: nn.Module, indices: range, preset: str | None) -> None:
    """PyTorch's ``checkpoint_wrapper`` on ``model.layers[i]``: full, or selective with ``preset``."""
    extra = {} if preset is None else {"context_fn": _torch_sac_context(preset)}
    for i in indices:
        model.layers[i] = torch_ac.checkpoint_wrapper(
            model.layers[i], checkpoint_impl=torch_ac.CheckpointImpl.NO_REENTRANT, **extra)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, models.Block)


def _configurations(n_layer: int, hand_k: tuple[int, ...], cuda: bool) -> list[_Config]:
    every = range(n_layer)
    configs = [
        _Config("none", "baseline", "no checkpointing", lambda m: None),
        _Config("ckpt_full", "ckpt_wrapper", "apply_activation_checkpointing on every block",
                lambda m: ckpt_wrapper.apply_activation_checkpointing(m, check_fn=_is_block)),
        _Config("torch_full", "pytorch", "PyTorch checkpoint_wrapper on every block",
                lambda m: torch_ac.apply_activation_checkpointing(
                    m, checkpoint_wrapper_fn=torch_ac.checkpoint_wrapper, check_fn=_is_block)),
    ]
    for preset, saves in (("matmuls", "matmuls and attention"), ("titan", "attention, every second matmul")):
        configs += [
            _Config(f"ckpt_sac_{preset}", "ckpt_wrapper", f"selective_context_fn({preset!r}) on every block ({saves})",
                    functools.partial(_ckpt_sac, preset=preset)),
            _Config(f"torch_sac_{preset}", "pytorch", f"PyTorch selective checkpointing saving {saves}",
                    functools.partial(_torch_wrap_blocks, indices=every, preset=preset)),
        ]
    configs.append(_Config("ckpt_cheap", "ckpt_wrapper", "cheap_recompute_wrapper on every block",
                           lambda m: [ckpt_wrapper.cheap_recompute_wrapper(b) for b in m.layers]))
    for k in hand_k:
        for rest in (None, "matmuls", "titan"):
            name = f"torch_first{k}" + (f"+sac_{rest}" if rest else "")
            configs.append(_Config(
                name, "pytorch",
                f"PyTorch checkpoint_wrapper on the first {k} blocks, the rest " + (f"selective ({rest})" if rest else "unwrapped"),
                functools.partial(_hand_recipe, k=k, rest=rest)))
    if cuda:
        configs += [
            _Config("ckpt_offload", "ckpt_wrapper", "offload_wrapper on every block",
                    lambda m: ckpt_wrapper.apply_activation_checkpointing(
                        m, checkpoint_wrapper_fn=ckpt_wrapper.offload_wrapper, check_fn=_is_block)),
            _Config("torch_offload", "pytorch", "PyTorch offload_wrapper (save_on_cpu, pinned) on every block",
                    lambda m: torch_ac.apply_activation_checkpointing(
                        m, checkpoint_wrapper_fn=torch_ac.offload_wrapper, check_fn=_is_block)),
        ]
    return configs


def _ckpt_sac(model: nn.Module, *, preset: str) -> None:
    for block in model.layers:
        ckpt_wrapper.checkpoint_wrapper(block, context_fn=ckpt_wrapper.selective_context_fn(preset))


def _hand_recipe(model: nn.Module, *, k: int, rest: str | None) -> None:
    _torch_wrap_blocks(model, range(k), None)
    if rest is not None:
        _torch_wrap_blocks(model, range(k, len(model.layers)), rest)


def _select(configs: list[_Config], patterns: tuple[str, ...] | None) -> list[_Config]:
    if patterns is None:
        return configs
    names = [c.name for c in configs]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"--configs {unmatched} match no configuration; there are {names}")
    return [c for c in configs if c.name == "none" or any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


# --- measuring -------------------------------------------------------------------------------------

def train_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward, cross-entropy, backward, ``zero_grad``: the step every benchmark times; returns the loss."""
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def _timed(step: Callable[[], Any], device: torch.device) -> tuple[float, int | None]:
    """Seconds for one step and, on CUDA, the peak bytes allocated during it above what was allocated before."""
    gc.collect()
    if device.type != "cuda":
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin, None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(device) - before


def malloc_env_set() -> bool:
    """Whether glibc's malloc settings from DESIGN.md ("Measuring") are in this process's environment."""
    return all(os.environ.get(key) == value for key, value in MALLOC_ENV.items())


def _environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    try:
        if device.type == "cpu":
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": name, "threads": torch.get_num_threads(), "malloc_env_set": malloc_env_set()}


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
    rank0 = int(os.environ.get("RANK", "0")) == 0
    log: Callable[[str], None] = (lambda line: print(f"[bench] {line}", file=sys.stderr, flush=True)) if rank0 else (lambda line: None)
    device = options.resolve_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and options.reexec and not malloc_env_set():
        log("re-executing with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **MALLOC_ENV})
    threads_before = torch.get_num_threads()
    threads = options.threads if options.threads is not None else (None if device.type == "cuda" else 2)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        report = _measure(options, device, log)
    finally:
        torch.set_num_threads(threads_before)
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(report)
    print(markdown)
    (out / "bench.md").write_text(markdown + "\n")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    written = ["bench.md", "bench.json"]
    if _plot(report, out / "pareto.png", log):
        written.append("pareto.png")
    log(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def _measure(options: BenchOptions, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    cuda = device.type == "cuda"
    dtype = _DTYPES[options.dtype or ("bf16" if cuda else "fp32")]
    preset, config = options.model_config()
    if cuda:
        torch.cuda.set_device(device)
    environment = _environment(device)
    log(f"{device} ({environment['device_name']}), torch {torch.__version__}, {environment['threads']} threads, "
        f"{str(dtype).removeprefix('torch.')}" + ("" if cuda else f", malloc env {'set' if environment['malloc_env_set'] else 'NOT set'}"))
    log(f"model {preset}: {config}, batch {options.batch}")

    torch.manual_seed(options.seed)
    base = models.GPT(config).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(options.seed + 1)
    sequences = torch.randint(0, config.vocab_size, (options.batch, config.seq_len + 1), generator=generator).to(device)
    tokens, targets = sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()

    hand_k, configs = options.hand_recipe_k(), options.configurations()
    budget_names = {f"plan_{b:g}": b for b in options.budgets}

    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}  # copies share weights, not modules
    built: dict[str, nn.Module] = {}
    plans: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        model = copy.deepcopy(base, memo=dict(shared))
        if cfg.family == "plan":
            budget = budget_names[cfg.name]
            log(f"planning at budget {budget:g} ...")
            try:
                plan = ckpt_wrapper.plan(model, tokens, memory_budget=float(budget))
            except ValueError as error:
                log(f"  no plan at budget {budget:g}: {error}")
                plans[cfg.name] = {"budget": budget, "feasible": False, "error": str(error)}
                continue
            plan.apply(model)
            (Path(options.out_dir) / "plans").mkdir(parents=True, exist_ok=True)
            plan.save(str(Path(options.out_dir) / "plans" / f"{cfg.name}.json"))
            for line in str(plan).splitlines():
                log(f"  {line}")
            plans[cfg.name] = {"budget": budget, "feasible": True, "plan": plan}
        else:
            cfg.wrap(model)
        built[cfg.name] = model
    configs = [c for c in configs if c.name in built]
    steps = {name: functools.partial(train_step, model, tokens, targets) for name, model in built.items()}

    # Identical weights and inputs give the same loss under every configuration; a broken harness shows here.
    losses = {name: step().item() for name, step in steps.items()}
    tolerance = (1e-3 if dtype == torch.float32 else 2e-2) * max(1.0, abs(losses["none"]))
    wrong = {name: loss for name, loss in losses.items() if abs(loss - losses["none"]) > tolerance}
    if wrong:
        raise RuntimeError(f"configurations disagree with 'none' ({losses['none']:.6f}) on the loss: {wrong}")

    names = list(built)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int]] = {name: [] for name in names}
    began = time.perf_counter()
    for index in range(options.warmup + options.rounds):
        order = names[index % len(names):] + names[: index % len(names)]  # no configuration always follows the same one
        round_began = time.perf_counter()
        for name in order:
            seconds, peak = _timed(steps[name], device)
            if index >= options.warmup:
                times[name].append(seconds)
                if peak is not None:
                    peaks[name].append(peak)
        elapsed, this = time.perf_counter() - began, time.perf_counter() - round_began
        label = f"warm-up {index + 1}/{options.warmup}" if index < options.warmup else f"round {index - options.warmup + 1}/{options.rounds}"
        left = options.warmup + options.rounds - index - 1
        log(f"{label}: {this:.1f} s for {len(names)} configurations (elapsed {elapsed:.0f} s, about {left * this:.0f} s left)")

    log("activation memory held after forward and step FLOPs ...")
    held = {name: held_after_forward(functools.partial(model, tokens), device=device) for name, model in built.items()}
    flops = {name: step_flops(steps[name]) for name in names}
    return _summarize(options, environment, preset, config, dtype, configs, losses, times, peaks, held, flops, plans, hand_k)


# --- summary, goals, output ------------------------------------------------------------------------

def _summarize(options: BenchOptions, environment: dict, preset: str, config: models.GPTConfig, dtype: torch.dtype,
               configs: list[_Config], losses: dict, times: dict, peaks: dict, held: dict, flops: dict,
               plans: dict, hand_k: tuple[int, ...]) -> dict[str, Any]:
    cuda = environment["device"].startswith("cuda")
    median = {name: statistics.median(values) for name, values in times.items()}
    results: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        name = cfg.name
        entry: dict[str, Any] = {
            "family": cfg.family, "description": cfg.description, "median_s": median[name],
            "min_s": min(times[name]), "times_s": times[name], "time_ratio": median[name] / median["none"],
            "held_after_forward_bytes": held[name], "held_ratio": held[name] / max(held["none"], 1),
            "step_flops": flops[name], "extra_flops": flops[name] - flops["none"], "first_loss": losses[name],
        }
        if cuda:
            entry["peak_bytes"] = max(peaks[name])
            entry["peak_ratio"] = max(peaks[name]) / max(max(peaks["none"]), 1)
        entry["memory_ratio"] = entry["peak_ratio"] if cuda else entry["held_ratio"]
        results[name] = entry

    plan_rows: dict[str, dict[str, Any]] = {}
    anchors = [n for n, r in results.items() if r["family"] == "pytorch" and "offload" not in n]
    for name, info in plans.items():
        row: dict[str, Any] = {"budget": info["budget"], "feasible": info["feasible"]}
        if not info["feasible"]:
            row["error"] = info["error"]
            plan_rows[name] = row
            continue
        plan, measured = info["plan"], results[name]
        strategies = collections.Counter(str(e.strategy) for e in plan.entries)
        best = min((n for n in anchors if results[n]["memory_ratio"] <= info["budget"]), key=lambda n: results[n]["median_s"], default=None)
        best_flops = min((n for n in anchors if results[n]["memory_ratio"] <= info["budget"]), key=lambda n: results[n]["extra_flops"], default=None)
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
        "benchmark": "ckpt-wrapper bench", "command": " ".join([Path(sys.executable).name, *sys.orig_argv[1:]]),
        "environment": environment,
        "model": {"preset": preset, **dataclasses.asdict(config), "batch": options.batch, "dtype": str(dtype).removeprefix("torch.")},
        "rounds": options.rounds, "warmup": options.warmup, "budgets": list(options.budgets), "hand_k": list(hand_k),
        "memory_measure": "peak allocated during a step above the start (CUDA)" if cuda else "held after forward (glibc mallinfo2)",
        "goals_workload": "gpu-reference" if cuda else "cpu-reference",
        "configs": results, "plans": plan_rows, "goals": _goals(plan_rows, cuda),
    }


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--reference", action="store_true",
                        help="on CPU, the CPU reference workload (models.CPU_REFERENCE, batch 4) instead of the small GPT "
                             "(8 blocks, width 256, 4 heads, sequence 128, vocabulary 2000); CUDA always uses GPU_REFERENCE")
    for name, help_text in (("n_layer", "blocks"), ("d_model", "hidden width"), ("n_head", "attention heads"),
                            ("seq_len", "sequence length"), ("vocab_size", "vocabulary size")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the workload's {help_text}")
    parser.add_argument("--batch", type=int, default=d["batch"].default, help="sequences per step (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--rounds", type=int, default=d["rounds"].default, help="timed rounds, each running every configuration once (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=d["warmup"].default, help="untimed rounds before them (default: %(default)s)")
    parser.add_argument("--budgets", type=_floats, default=d["budgets"].default,
                        help="planner budgets, comma-separated fractions of the unwrapped activation memory (default: 0.5,0.35,0.3,0.1)")
    parser.add_argument("--hand-k", type=_ints, default=None,
                        help="K values of the hand recipes 'PyTorch full checkpointing of the first K blocks' (default: n/4, n/2, 3n/4)")
    parser.add_argument("--configs", type=lambda text: tuple(p.strip() for p in text.split(",") if p.strip()), default=None,
                        help="comma-separated names or shell patterns of configurations to run, e.g. 'torch_*,plan_*' (none always runs; default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on CPU, unchanged on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: %(default)s)")
    parser.add_argument("--out-dir", default=d["out_dir"].default, help="folder for bench.md, bench.json, pareto.png, plans/ (default: %(default)s)")
    parser.add_argument("--no-reexec", action="store_true",
                        help="on CPU, do not re-execute with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " when they are missing")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Build ``BenchOptions`` from parsed flags.

    Raises:
        ValueError: if the flags describe no valid run.
    """
    fields = {field.name for field in dataclasses.fields(BenchOptions)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    return BenchOptions(**values, reexec=not args.no_reexec)
