"""``report(model, batch)``: what forward saves, what backward recomputes, what is offloaded, and the peak.

One recorded training step of a copy of the model (``ckpt_wrapper.timeline.StepRecorder``), unwrapped
and, given a plan or a bound to plan for, with the plan applied. Per block and per sub-module it lists
every storage forward leaves alive for backward (shape, dtype, bytes, the op that made it), the ops
rerun in backward (recompute), and the bytes kept on the host (offload); then the predicted peak of the
step against the peak measured independently (``ckpt_wrapper.measure.measured_step_peak``). The model's
code is not changed and the model itself is not touched: everything runs on deep copies.

During the report's recorded step PyTorch's checkpoint early stop is off, so a recompute is the whole
block's forward; in training it stops at the last tensor backward needs, so counts of recomputed ops
are an upper bound. Memory figures do not depend on it (the measured peak uses the normal step).

Example:
    >>> import torch
    >>> import ckpt_wrapper
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> result = ckpt_wrapper.report(model, torch.randint(0, 32, (2, 8)), memory_budget=0.3)
    >>> result.before.saved_bytes > result.after.saved_bytes
    True
    >>> "layers.0" in str(result)
    True
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from ckpt_wrapper.measure import measured_step_peak
from ckpt_wrapper.planner import Plan, plan as make_plan
from ckpt_wrapper.planner.profile import call_model, find_blocks, model_kept, scalar_of
from ckpt_wrapper.planner.trace import model_step
from ckpt_wrapper.table import format_table

__all__ = ["MemoryReport", "StepView", "report"]


@dataclasses.dataclass
class StepView:
    """One recorded step of one version of the model (unwrapped, or with the plan)."""

    saved: list[dict[str, Any]]
    """Every storage forward left alive, its output aside: ``block``, ``module``, ``op``, ``shape``, ``dtype``,
    ``bytes``."""
    saved_bytes: int
    """Their total bytes on the model's device."""
    recomputed: dict[str, int]
    """Per module, ops rerun in backward (a recompute)."""
    offloaded_bytes: dict[str, int]
    """Per block, bytes forward kept on another device than the model's (offload's host copies)."""
    timeline: list[int]
    """Bytes alive on the model's device after each op: activations, gradients and the parameters."""
    measured_peak: int
    """The peak of a whole step, measured (``measured_step_peak``), the optimizer's step included."""

    def by_block(self) -> dict[str, int]:
        """Saved bytes per block (``""``: outside the blocks)."""
        totals: dict[str, int] = collections.Counter()
        for row in self.saved:
            totals[row["block"]] += row["bytes"]
        return dict(totals)


@dataclasses.dataclass
class MemoryReport:
    """What ``report`` found; ``str()`` gives the tables, ``save_timeline`` the PNG."""

    before: StepView
    """The unwrapped model."""
    after: StepView | None
    """The model with ``plan`` applied; None without a plan."""
    plan: Plan | None
    """The plan reported on."""

    def __str__(self) -> str:
        mib = 2**20
        lines = []
        views = [("unwrapped", self.before)] + ([("planned", self.after)] if self.after else [])
        blocks = sorted({row["block"] for _, view in views for row in view.saved}, key=_natural)
        strategies = {e.name: str(e.strategy) for e in self.plan.entries} if self.plan else {}
        rows = [[b or "(outside blocks)", strategies.get(b, "")] + [f"{v.by_block().get(b, 0) / mib:.3f}" for _, v in views]
                + ([f"{sum(n for m, n in self.after.recomputed.items() if _inside(m, b)):d}",
                    f"{self.after.offloaded_bytes.get(b, 0) / mib:.3f}"] if self.after else []) for b in blocks]
        headers = ["block", "strategy"] + [f"MiB saved, {name}" for name, _ in views] + (
            ["ops recomputed", "MiB offloaded"] if self.after else [])
        lines.append(format_table(rows, headers=headers, align="ll" + "r" * (len(headers) - 2)))
        for name, view in views:
            lines.append(f"\nlargest tensors forward saves, {name} (of {len(view.saved)}):")
            top = sorted(view.saved, key=lambda r: (-r["bytes"], r["module"]))[:8]
            lines.append(format_table([[r["module"] or "(root)", r["op"], "x".join(map(str, r["shape"])), r["dtype"],
                                        f"{r['bytes'] / 1024:.1f}"] for r in top],
                                      headers=["module", "op", "shape", "dtype", "KiB"], align="lllrr"))
        for name, view in views:
            predicted = ""
            if name == "planned" and self.plan is not None and self.plan.peak is not None:
                p = self.plan.peak["peak_bytes"]
                predicted = f", predicted {p / mib:.3f} MiB ({p / max(view.measured_peak, 1) - 1:+.2%})"
            lines.append(f"step peak, {name}: measured {view.measured_peak / mib:.3f} MiB{predicted}")
        return "\n".join(lines)

    def save_timeline(self, path: str) -> None:
        """Write a PNG of memory through one step, unwrapped and planned.

        Raises:
            RuntimeError: if matplotlib is not installed (the figures are in ``before.timeline``).
        """
        try:
            from matplotlib.figure import Figure  # no pyplot: no global state, no display
        except ImportError:
            raise RuntimeError("the memory timeline PNG needs matplotlib, which is not installed: pip install "
                               "matplotlib (the figures are in report.before.timeline and report.after.timeline)") from None
        figure = Figure(figsize=(9, 4))
        axes = figure.subplots()
        for name, view in (("unwrapped", self.before), ("planned", self.after)):
            if view is not None:
                axes.plot([b / 2**20 for b in view.timeline], label=f"{name} (peak {view.measured_peak / 2**20:.1f} MiB)")
        axes.set_xlabel("op")
        axes.set_ylabel("MiB alive (parameters, gradients, activations)")
        axes.set_title("memory through one training step")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=100)


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _inside(module: str, block: str) -> bool:
    return bool(block) and (module == block or module.startswith(block + "."))


def _view(model: nn.Module, batch: Any, blocks: list[tuple[str, nn.Module]], optimizer: Any) -> StepView:
    names = {m: n for n, m in model.named_modules()}
    device = next(model.parameters()).device
    block_names = [n for n, _ in blocks]
    with model_kept(model), torch_checkpoint.set_checkpoint_early_stop(False):
        for p in model.parameters():
            p.grad = None
        step = model_step(model, lambda: call_model(model, batch), blocks, device=None, loss=scalar_of,
                          on_module=names)
    recorder = step.recorder
    owner = lambda module: next((b for b in block_names if _inside(module, b)), "")
    saved, offloaded = [], collections.Counter()
    for serial, a in recorder.allocations.items():
        if serial in step.outputs:  # the output is the loss's input, not something forward saved
            continue
        if a.phase == "forward" and (a.freed is None or a.freed > step.forward_ops) and a.made < step.forward_ops:
            if a.device != device.type:
                offloaded[owner(a.module)] += a.nbytes
                continue
            saved.append({"block": owner(a.module), "module": a.module, "op": a.op, "shape": list(a.shape),
                          "dtype": a.dtype, "bytes": a.nbytes})
    recomputed = collections.Counter(module for phase, module in recorder.op_context[step.forward_ops:]
                                     if phase == "backward" and module)
    on_device = {s for s, a in recorder.allocations.items() if a.device == device.type}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    timeline = [params + b for b in recorder.series(only=on_device)]
    opt = optimizer(model.parameters()) if optimizer is not None else None

    def train_step() -> None:
        out = call_model(model, batch)  # referenced until the step ends, as a training loop holds it
        scalar_of(out).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            model.zero_grad()

    with model_kept(model):
        train_step()
        peak = measured_step_peak(train_step, model, opt, device=device)
    return StepView(saved=saved, saved_bytes=sum(r["bytes"] for r in saved), recomputed=dict(recomputed),
                    offloaded_bytes=dict(offloaded), timeline=timeline, measured_peak=peak)


def report(model: nn.Module, batch: Any, *, plan: Plan | None = None, optimizer: Any = None,
           **plan_options: Any) -> MemoryReport:
    """Report what one training step of ``model`` saves, recomputes and offloads, before and after a plan.

    ``model`` is not modified: the unwrapped and the planned steps run on deep copies.

    Args:
        model: the unwrapped model, on its device.
        batch: what the model is called with (a tensor, a tuple, or a dict of keywords).
        plan: the plan to report on; default: one made with ``plan_options`` if any are given, else none.
        optimizer: a class or callable ``params -> Optimizer`` for the measured step (and the plan's peak).
        **plan_options: keywords of ``ckpt_wrapper.plan`` (``memory_budget=``, ``memory_limit=``, ...).

    Returns:
        The ``MemoryReport``; ``print()`` it, or ``save_timeline("step.png")``.

    Raises:
        ValueError: as ``ckpt_wrapper.plan`` does, for the plan it makes.
        TypeError: for an ``optimizer`` instance (it is bound to the model's own parameters: pass its class).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("report steps copies of the model, so it needs the optimizer's class or a callable params -> "
                        f"Optimizer, got an instance of {type(optimizer).__name__}; pass e.g. optimizer=torch.optim.AdamW")
    blocks = find_blocks(model, plan_options.get("check_fn"))
    if plan is None and plan_options:
        plan = make_plan(model, batch, optimizer=optimizer, **plan_options)
    unwrapped = copy.deepcopy(model)
    before = _view(unwrapped, batch, find_blocks(unwrapped, plan_options.get("check_fn")), optimizer)
    after = None
    if plan is not None:
        planned = copy.deepcopy(model)
        plan.apply(planned)
        names = [n for n, _ in blocks]
        after = _view(planned, batch, [(n, planned.get_submodule(n)) for n in names], optimizer)
    return MemoryReport(before=before, after=after, plan=plan)
