"""The predicted peak of a training step on one rank, and what it is made of.

The unwrapped model's recorded step (``trace.model_step``) gives the activation and gradient timeline,
op by op, and where each block's forward and backward ran. A plan changes that timeline block by
block: while block ``j``'s activations are alive (from the end of its forward to the start of its
backward) the plan holds ``saving_j`` fewer bytes; inside block ``i``'s forward or backward the
unwrapped block's working set is replaced by the strategy's own, as its recorded step measured it
(recompute included). Parameters, optimizer state, DDP buckets and FSDP's sharded, unsharded and
reduce-scatter buffers come from ``StaticMemory``. The optimizer step after backward is the last phase.

Every instant then reads ``base - (savings of the alive blocks)``, with the alive blocks always the
first ``k`` (blocks run in order forward and in reverse backward), so ``solve`` can bound the peak
block by block. ``PeakModel.evaluate`` gives a plan's peak and its components.

Example:
    >>> from ckpt_wrapper.planner.peak import PeakReport
    >>> report = PeakReport(peak_bytes=10, at="backward of layers.1", components={"parameters": 4, "activations": 6})
    >>> report.to_dict()["components"]["activations"]
    6
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ckpt_wrapper.planner.memory import StaticMemory
from ckpt_wrapper.planner.trace import ModelStep

__all__ = ["BlockFigures", "PeakModel", "PeakReport"]


@dataclasses.dataclass(frozen=True)
class BlockFigures:
    """One block under one strategy, as the peak model uses it."""

    held: int
    """Activation bytes held after forward (the block's output left out)."""
    saving: int
    """Bytes fewer than unwrapped while its activations are alive."""
    peak_forward: int
    """Working set at the peak of its forward."""
    peak_backward: int
    """Working set at the peak of its backward: held bytes, recompute, temporaries, its gradients."""
    end_backward: int = 0
    """Working set once its backward is done (its gradients, its input's), when FSDP reduce-scatters."""


@dataclasses.dataclass(frozen=True)
class PeakReport:
    """A plan's predicted peak on one rank."""

    peak_bytes: int
    """The predicted peak of the step, in bytes."""
    at: str
    """When it happens (``backward of layers.3``, ``forward, after layers.7``, ``optimizer step``)."""
    components: dict[str, int]
    """What is alive at the peak, by component; the values add up to ``peak_bytes``."""
    blocks: dict[str, int] = dataclasses.field(default_factory=dict)
    """Activation bytes each block holds at the peak (0 for blocks whose activations are gone)."""

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return dataclasses.asdict(self)


class PeakModel:
    """The step's timeline without any plan, ready to be bounded or evaluated under one.

    Args:
        step: the unwrapped model's recorded step.
        names: the blocks, in module order.
        unwrapped: per block, its unwrapped figures (``held`` is what the block holds in ``step``).
        static: parameters, gradients, optimizer state and sharding on this rank.
        prefetch_forward: whether FSDP unshards the next block during a block's forward (CUDA streams).
    """

    def __init__(self, step: ModelStep, names: Sequence[str], unwrapped: Sequence[BlockFigures],
                 static: StaticMemory, *, prefetch_forward: bool = False) -> None:
        self.names, self.unwrapped, self.static = list(names), list(unwrapped), static
        n, ops = len(self.names), len(step.activations)
        marks = [dict(step.marks.get(name, {})) for name in self.names]
        for i, m in enumerate(marks):  # an input that needs no grad: its backward ends where the one before starts
            if "backward_end" not in m and "backward_start" in m:
                m["backward_end"] = marks[i - 1].get("backward_start", ops) if i else ops
        if any(set(m) != {"forward_start", "forward_end", "backward_start", "backward_end"} for m in marks):
            raise ValueError("the step's peak needs every block called once, with an output that requires grad; a "
                             "block was never called or no gradient flowed through it. Plan with memory_budget= only")
        self.marks, self.forward_ops = marks, step.forward_ops
        fsdp = static.sharded
        p = [static.block_parameters[name] for name in self.names]
        g = [static.block_gradients[name] for name in self.names]
        # The step's resident part: parameters (the root's unsharded under FSDP), optimizer state, buckets.
        root_extra = static.block_parameters[""] if fsdp else 0  # unsharded beside its shard, forward to backward
        self.fixed = {"parameters": static.parameters, "optimizer state": static.optimizer_state,
                      "DDP gradient buckets": static.ddp_buckets, "unsharded parameters (FSDP)": root_extra}

        def grads_at(t: int) -> int:
            if t < 0:
                return 0
            if not fsdp:
                return sum(series[t] for series in step.gradients.values())
            done = sum(static.sharded_gradients[name] for name, m in zip(self.names, marks) if m["backward_end"] <= t)
            return step.gradients.get("", [0] * ops)[t] + done

        act = lambda t: step.activations[t] if t >= 0 else 0
        self._act, self._grads = act, grads_at
        inside = [False] * ops
        for m in marks:
            for a, b in ((m["forward_start"], m["forward_end"]), (m["backward_start"], m["backward_end"])):
                for t in range(a, min(b, ops)):
                    inside[t] = True
        # M_k: the most any instant outside the blocks reaches while exactly blocks 0..k-1 are alive.
        self.outside: list[tuple[int, int]] = [(0, -1)] * (n + 1)  # (bytes before savings, op index)
        for t in range(ops):
            if inside[t]:
                continue
            k = 0
            while k < n and marks[k]["forward_end"] <= t < marks[k]["backward_start"]:
                k += 1
            value = act(t) + grads_at(t)
            if value > self.outside[k][0]:
                self.outside[k] = (value, t)
        # Per block: what exists as its forward and backward start, its own unwrapped activations removed.
        self.before_forward, self.before_backward, self.unsharded_f, self.unsharded_b = [], [], [], []
        self.scatter: list[int] = []  # FSDP's reduce-scatter buffers as block i's backward ends
        for i, m in enumerate(marks):
            fs, bs = m["forward_start"] - 1, m["backward_start"] - 1
            self.before_forward.append(act(fs) + grads_at(fs))
            self.before_backward.append(act(bs) - self.unwrapped[i].held + grads_at(bs))
            if fsdp:  # this block unsharded (and the next prefetched); in backward, reduce-scatter buffers too
                nxt = p[i + 1] if prefetch_forward and i + 1 < n else 0
                # Backward prefetches block i-1: FSDP2 holds its all-gather buffers (input and output) until
                # i-1 starts; the reduce-scatter of block i copies its gradients after resharding it.
                ahead = p[i - 1] if i > 0 else 0
                if static.sharding == "fsdp2":
                    ahead += ahead // static.world_size
                self.scatter.append(g[i] // static.world_size + (g[i] if static.sharding == "fsdp2" else 0) - p[i])
                self.unsharded_f.append(p[i] + nxt)
                self.unsharded_b.append(p[i] + ahead)
            else:
                self.scatter.append(0)
                self.unsharded_f.append(0)
                self.unsharded_b.append(0)
        self.fixed_total = sum(self.fixed.values())
        # The loop still holds the step's output (``out = model(x)``) while the optimizer steps.
        self.output_bytes = step.output_bytes
        self.optimizer_phase = (static.parameters + static.gradients() + static.optimizer_state
                                + static.ddp_buckets + static.optimizer_step + self.output_bytes)

    def block_bound(self, i: int, figures: BlockFigures) -> int:
        """The most block ``i`` reaches under ``figures``, before the savings of blocks ``0..i-1``."""
        forward = self.before_forward[i] + self.unsharded_f[i] + figures.peak_forward
        return self.fixed_total + max(forward, self._backward(i, figures))

    def _backward(self, i: int, figures: BlockFigures) -> int:
        """Block ``i``'s backward: its peak, or its end (block ``i`` resharded, its reduce-scatter buffers
        made), whichever is more."""
        work = max(figures.peak_backward, figures.end_backward + self.scatter[i])
        return self.before_backward[i] + self.unsharded_b[i] + work

    def outside_bound(self, k: int) -> int:
        """The most an instant outside the blocks reaches with blocks ``0..k-1`` alive, before their savings."""
        return self.fixed_total + self.outside[k][0]

    def evaluate(self, chosen: Sequence[BlockFigures]) -> PeakReport:
        """The peak of the step with block ``i`` under ``chosen[i]``, and its components."""
        n = len(self.names)
        prefix = [0]
        for figures in chosen:
            prefix.append(prefix[-1] + figures.saving)
        candidates: list[tuple[int, str, int, str]] = []  # (bytes, label, alive blocks, where)
        for k in range(n + 1):
            value, t = self.outside[k]
            if t < 0:
                continue
            after = f"after {self.names[k - 1]}" if k else "outside the blocks"
            phase = "forward" if t < self.forward_ops else "backward"
            candidates.append((self.outside_bound(k) - prefix[k], f"{phase}, {after}", k, "outside"))
        for i, figures in enumerate(chosen):
            forward = self.fixed_total + self.before_forward[i] + self.unsharded_f[i] + figures.peak_forward - prefix[i]
            backward = self.fixed_total + self._backward(i, figures) - prefix[i]
            candidates.append((forward, f"forward of {self.names[i]}", i, "forward"))
            candidates.append((backward, f"backward of {self.names[i]}", i, "backward"))
        candidates.append((self.optimizer_phase, "optimizer step", 0, "optimizer"))
        peak, at, k, where = max(candidates, key=lambda c: c[0])
        return PeakReport(peak_bytes=peak, at=at, components=self._components(chosen, peak, k, where),
                          blocks={name: (chosen[j].held if j < k else 0) for j, name in enumerate(self.names)})

    def _components(self, chosen: Sequence[BlockFigures], peak: int, k: int, where: str) -> dict[str, int]:
        s = self.static
        if where == "optimizer":
            parts = {"parameters": s.parameters, "gradients": s.gradients(), "optimizer state": s.optimizer_state,
                     "DDP gradient buckets": s.ddp_buckets, "optimizer step temporaries": s.optimizer_step,
                     "the step's output": self.output_bytes}
        else:
            parts = dict(self.fixed)
            held = sum(chosen[j].held for j in range(k))
            if where == "outside":
                t = self.outside[k][1]
                parts["gradients"] = self._grads(t)
            else:
                m = self.marks[k]
                t = (m["forward_start"] if where == "forward" else m["backward_start"]) - 1
                parts["gradients"] = self._grads(t)
                parts["unsharded parameters (FSDP)"] += (self.unsharded_f if where == "forward" else self.unsharded_b)[k]
                figures = chosen[k]
                if where == "forward":
                    parts[f"forward working set of {self.names[k]}"] = figures.peak_forward
                elif figures.peak_backward >= figures.end_backward + self.scatter[k]:
                    parts[f"backward working set of {self.names[k]}"] = figures.peak_backward
                else:
                    p = self.static.block_parameters[self.names[k]]
                    parts["unsharded parameters (FSDP)"] -= p
                    parts[f"gradients of {self.names[k]} (unsharded)"] = figures.end_backward
                    parts["reduce-scatter buffers (FSDP)"] = self.scatter[k] + p
            parts["activations held by blocks"] = held
            parts["activations outside the blocks"] = peak - sum(parts.values())
        return {name: value for name, value in parts.items() if value}

