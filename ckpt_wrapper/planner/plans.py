"""``Plan`` and ``PlanEntry``: the planner's result, its table and JSON, and how it is applied.

Example:
    >>> from ckpt_wrapper.planner import Plan, PlanEntry, Strategy
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> plan = Plan(entries=[PlanEntry("layers.0", Strategy(main="full"), 0, 0.0),
    ...                      PlanEntry("layers.1", Strategy.parse("cheap+regions:mlp"), 0, 0.0)],
    ...             budget_bytes=1, unwrapped_bytes=2, predicted_bytes=1, step_seconds=0.0,
    ...             predicted_seconds=0.0, cost_unit="flops")
    >>> plan.apply(GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32)))
    ['layers.0', 'layers.1.mlp', 'layers.1']
    >>> Plan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from torch import nn

from ckpt_wrapper.apply import WrapJob, wrap_blocks
from ckpt_wrapper.offload import OffloadEngine
from ckpt_wrapper.table import format_table
from ckpt_wrapper.planner.strategy import Strategy, as_strategy

__all__ = ["Plan", "PlanEntry"]

FORMAT_VERSION = 1
"""The value of ``"ckpt_wrapper_plan"`` in plan JSON."""


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One block's choice; ``strategy`` may be given as its text form and is stored as a ``Strategy``."""

    name: str
    """Fully qualified name of the block."""
    strategy: Strategy
    """The strategy chosen (a str such as ``"full"`` is parsed on construction)."""
    bytes: int
    """Activation bytes the block holds under it (from the profile)."""
    cost: float
    """Its extra cost over ``none``: FLOPs or seconds, as ``Plan.cost_unit`` says."""
    peak_bytes: int | None = None
    """Its working set at the peak of its backward (held bytes, recompute, temporaries, its gradients);
    None in plans made without it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", as_strategy(self.strategy))

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, the strategy in its text form (fields never set left out)."""
        data = {"name": self.name, "strategy": str(self.strategy), "bytes": self.bytes, "cost": self.cost}
        if self.peak_bytes is not None:
            data["peak_bytes"] = self.peak_bytes
        return data


@dataclasses.dataclass
class Plan:
    """A plan: a strategy per block, what it should cost, and how to apply it."""

    entries: list[PlanEntry]
    """One per block, in module order."""
    budget_bytes: int | None
    """The activation memory budget, in bytes; None when only a peak limit was given."""
    unwrapped_bytes: int
    """Activation bytes of the unwrapped model (the base of fractional budgets)."""
    predicted_bytes: int
    """Activation bytes predicted with the plan applied."""
    step_seconds: float
    """Forward-and-backward time of the unwrapped model on each rank: modelled from counts (``cost="model"``)
    or measured, plus the modelled communication under DDP or FSDP (``communication``)."""
    predicted_seconds: float
    """Step time predicted with the plan applied."""
    cost_unit: Literal["flops", "seconds"]
    """The unit of ``PlanEntry.cost`` and of the profile's costs."""
    profile: dict[str, dict[str, tuple[int, float]]] = dataclasses.field(default_factory=dict)
    """Per block signature: strategy (text form) -> (bytes held, extra cost)."""
    limit_bytes: int | None = None
    """The peak limit per rank (``memory_limit``), in bytes; None if none was given."""
    peak: dict[str, Any] | None = None
    """The predicted peak of a training step on one rank (``PeakReport.to_dict()``: ``peak_bytes``, ``at``,
    ``components``, ``blocks``) and the setting it assumes (``sharding``, ``world_size``, ``optimizer``);
    None in plans made before peaks were predicted."""
    calibration: dict[str, Any] | None = None
    """The cost model's constants (``Calibration.to_dict()``) when ``cost_unit`` is modelled seconds."""

    communication: dict[str, Any] | None = None
    """What a data-parallel step communicates per rank (``Communication.to_dict()``, with its ``sharding``)
    and its modelled ``seconds``, included in ``step_seconds`` and ``predicted_seconds`` alike; None with
    no sharding or one rank."""

    OPTIONAL = ("limit_bytes", "peak", "calibration", "communication")
    """Fields written to JSON only when set, so plans of earlier versions write back as they were."""

    def apply(self, model: nn.Module) -> list[str]:
        """Wrap ``model``'s blocks as planned, in place, all or nothing; returns the names wrapped.

        Every block's jobs go through one ``ckpt_wrapper.apply.wrap_blocks`` call: if any block fails,
        none is left wrapped, and the error names the block.

        Raises:
            ValueError: if the model lacks a planned block or region, or a strategy cannot wrap its block.
        """
        engine = OffloadEngine()  # one pool for every offloading block, so backward can prefetch
        jobs: list[WrapJob] = []
        for entry in self.entries:  # all jobs are built before any block is wrapped
            try:
                block = model.get_submodule(entry.name)
            except AttributeError:
                raise ValueError(f"the plan names block {entry.name!r}, which this model does not have; "
                                 "plan and model must match") from None
            jobs += entry.strategy.jobs(block, fqn=entry.name, engine=engine)
        return wrap_blocks(model, jobs)

    def to_json(self) -> str:
        """The plan as JSON (``Plan.from_json`` reads it back); strategies in their text form."""
        data = dataclasses.asdict(self)
        data["entries"] = [entry.to_dict() for entry in self.entries]
        for name in self.OPTIONAL:
            if data[name] is None:
                del data[name]
        return json.dumps({"ckpt_wrapper_plan": FORMAT_VERSION, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by ``to_json`` (by this version or an earlier one).

        Raises:
            ValueError: if the text is not a ckpt_wrapper plan, or an entry's strategy is unknown.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("ckpt_wrapper_plan", None) != FORMAT_VERSION:
            raise ValueError("not a ckpt_wrapper plan (expected the JSON written by Plan.to_json / Plan.save)")
        try:
            entries = []
            for item in data["entries"]:
                try:
                    entries.append(PlanEntry(**item))
                except ValueError as error:
                    raise ValueError(f"plan entry {item.get('name')!r}: {error}") from None
            data["entries"] = entries
            data["profile"] = {k: {s: tuple(v) for s, v in d.items()} for k, d in data.get("profile", {}).items()}
            return cls(**data)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed ckpt_wrapper plan ({error}); expected the JSON written by Plan.to_json") from None

    def save(self, path: str) -> None:
        """Write the plan to ``path`` as JSON."""
        with open(path, "w") as handle:
            handle.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan saved with ``save``."""
        with open(path) as handle:
            return cls.from_json(handle.read())

    def __str__(self) -> str:
        mib = 2**20
        unit = "GFLOP" if self.cost_unit == "flops" else "ms"
        scale = 1e-9 if self.cost_unit == "flops" else 1e3
        peaks = all(e.peak_bytes is not None for e in self.entries)
        rows = [[e.name, str(e.strategy), f"{e.bytes / mib:.2f}"] + ([f"{e.peak_bytes / mib:.2f}"] if peaks else [])
                + [f"{e.cost * scale:.3f}"] for e in self.entries]
        total_cost = sum(e.cost for e in self.entries)
        rows.append(["total", "", f"{sum(e.bytes for e in self.entries) / mib:.2f}"] + ([""] if peaks else [])
                    + [f"{total_cost * scale:.3f}"])
        headers = ["block", "strategy", "MiB held"] + (["MiB backward peak"] if peaks else []) + [f"extra {unit}"]
        lines = [format_table(rows, headers=headers, align="llr" + "r" * (len(headers) - 3))]
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / mib:.2f} MiB"
        lines.append(
            f"activation memory: predicted {self.predicted_bytes / mib:.2f} MiB "
            f"({self.predicted_bytes / max(self.unwrapped_bytes, 1):.3f}x of unwrapped {self.unwrapped_bytes / mib:.2f} MiB), "
            f"budget {budget}"
        )
        if self.peak is not None:
            limit = "none" if self.limit_bytes is None else f"{self.limit_bytes / mib:.2f} MiB"
            parts = ", ".join(f"{name} {value / mib:.2f}" for name, value in self.peak["components"].items())
            lines.append(f"step peak per rank: predicted {self.peak['peak_bytes'] / mib:.2f} MiB at {self.peak['at']} "
                         f"({self.peak.get('sharding', 'none')}, {self.peak.get('world_size', 1)} rank(s)), limit {limit}")
            lines.append(f"  made of (MiB): {parts}")
        lines.append(
            f"step time: predicted {self.predicted_seconds * 1e3:.1f} ms "
            f"({self.predicted_seconds / max(self.step_seconds, 1e-12):.3f}x of unwrapped {self.step_seconds * 1e3:.1f} ms)"
            + ("" if self.communication is None else
               f", of which communication {self.communication['seconds'] * 1e3:.1f} ms "
               f"({self.communication['sharding']}, {self.communication['world_size']} ranks)")
        )
        return "\n".join(lines)
