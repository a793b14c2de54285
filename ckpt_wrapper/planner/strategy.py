"""``Strategy``: what the planner may do to one block, as a typed value with a stable text form.

A strategy is one of ``none``; ``full`` (checkpoint the whole block); ``regions`` (checkpoint some of
its children, each on its own); ``sac`` (checkpoint the block with an op-level selective preset);
``offload`` and ``full+offload`` (on accelerators); and, with ``none`` or ``regions``, ``cheap``
(recompute the block's norm and activation outputs in backward). ``str(strategy)`` is the text used in
plan tables and JSON (``"cheap+regions:attn"``, ``"sac:titan"``); ``Strategy.parse`` reads it back.

Example:
    >>> from ckpt_wrapper.planner import Strategy
    >>> strategy = Strategy(cheap=True, main="regions", regions=("attn",))
    >>> str(strategy)
    'cheap+regions:attn'
    >>> Strategy.parse("cheap+regions:attn") == strategy
    True
    >>> Strategy.parse("sac:titan").preset
    'titan'
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

from ckpt_wrapper.apply import WrapJob, wrap_blocks
from ckpt_wrapper.cheap_recompute import cheap_modules, cheap_recompute_wrapper
from ckpt_wrapper.offload import OffloadEngine, offload_wrapper
from ckpt_wrapper.selective import PRESETS, region_candidates, selective_context_fn
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["Main", "Strategy", "apply_strategy", "block_strategies"]

Main = Literal["none", "regions", "sac", "full", "offload", "full+offload"]
"""What wraps the block itself (or its children, for ``regions``)."""

MAINS: tuple[str, ...] = get_args(Main)
"""Every value of ``Strategy.main``."""

_GRAMMAR = ("'none', 'cheap', 'regions:NAME[+NAME...]', 'cheap+regions:NAME[+NAME...]', 'sac:PRESET' "
            f"(PRESET one of {sorted(PRESETS)}), 'full', 'offload' or 'full+offload'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """What to do to one block; ``str()`` gives its stable text form, ``Strategy.parse`` reads it back."""

    main: Main = "none"
    """What wraps: nothing, chosen children (``regions``), an op-level policy (``sac``), the block, offload."""
    cheap: bool = False
    """Also recompute the block's norm and activation outputs (``cheap_recompute_wrapper``)."""
    regions: tuple[str, ...] = ()
    """For ``main="regions"``: the children to checkpoint, each on its own (dotted names reach deeper)."""
    preset: str | None = None
    """For ``main="sac"``: the selective preset, a key of ``ckpt_wrapper.PRESETS``."""

    def __post_init__(self) -> None:
        if self.main not in MAINS:
            raise ValueError(f"Strategy main must be one of {list(MAINS)}, got {self.main!r}; "
                             "fix the spelling (for a preset use main='sac', preset=...)")
        if not isinstance(self.cheap, bool):
            raise TypeError(f"Strategy cheap must be a bool, got {type(self.cheap).__name__}")
        if isinstance(self.regions, str) or not isinstance(self.regions, (tuple, list)):
            raise TypeError(f"Strategy regions must be a tuple of child names, got {self.regions!r}; "
                            "write regions=('mlp',) for one region")
        object.__setattr__(self, "regions", tuple(self.regions))
        bad = [r for r in self.regions if not isinstance(r, str) or not r or "+" in r or ":" in r]
        if bad or len(set(self.regions)) != len(self.regions):
            raise ValueError(f"Strategy regions must be distinct, non-empty child names without '+' or ':', "
                             f"got {self.regions!r}; list each child of the block once, e.g. ('attn', 'mlp')")
        if (self.main == "regions") != bool(self.regions):
            raise ValueError(f"Strategy regions go with main='regions' and it needs at least one, got main="
                             f"{self.main!r} and regions={self.regions!r}; pass both, or neither")
        if self.main == "sac" and self.preset not in PRESETS:
            raise ValueError(f"Strategy main='sac' needs a preset from {sorted(PRESETS)}, got {self.preset!r}; "
                             "pick one of them")
        if self.main != "sac" and self.preset is not None:
            raise ValueError(f"Strategy preset goes with main='sac' only, got main={self.main!r} and preset="
                             f"{self.preset!r}; drop the preset or use main='sac'")
        if self.cheap and self.main not in ("none", "regions"):
            raise ValueError(f"cheap combines with main='none' or 'regions' only, got main={self.main!r} (its "
                             "wrapper already owns the block); drop cheap=True or choose regions")

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """Read a strategy from its text form, as ``str(strategy)`` writes it.

        Args:
            text: ``"none"``, ``"cheap"``, ``"regions:attn+mlp"``, ``"cheap+regions:mlp"``,
                ``"sac:matmuls"``, ``"sac:titan"``, ``"full"``, ``"offload"`` or ``"full+offload"``.

        Raises:
            TypeError: if ``text`` is not a string.
            ValueError: if it is not a strategy; the message lists the forms that are.

        Example:
            >>> from ckpt_wrapper.planner import Strategy
            >>> Strategy.parse("regions:attn+mlp").regions
            ('attn', 'mlp')
            >>> Strategy.parse("checkpoint")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: unknown strategy 'checkpoint': expected 'none', 'cheap', ...
        """
        if not isinstance(text, str):
            raise TypeError(f"a strategy's text form is a str, got {type(text).__name__}; "
                            "pass str(strategy) or the Strategy itself")
        cheap, rest = (True, text.removeprefix("cheap+")) if text.startswith("cheap+") else (False, text)
        try:
            if text == "cheap":
                return cls(cheap=True)
            if rest.startswith("regions:"):
                return cls(cheap=cheap, main="regions", regions=tuple(rest.removeprefix("regions:").split("+")))
            if cheap:
                raise ValueError("'cheap+' goes before 'regions:...' only")
            if rest.startswith("sac:"):
                return cls(main="sac", preset=rest.removeprefix("sac:"))
            if rest in ("none", "full", "offload", "full+offload"):
                return cls(main=rest)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"bad strategy {text!r} ({error}): expected {_GRAMMAR}") from None
        raise ValueError(f"unknown strategy {text!r}: expected {_GRAMMAR}; fix the spelling, "
                         "or build a Strategy(...) directly")

    def __str__(self) -> str:
        if self.main == "none":
            return "cheap" if self.cheap else "none"
        if self.main == "regions":
            return ("cheap+" if self.cheap else "") + "regions:" + "+".join(self.regions)
        if self.main == "sac":
            return f"sac:{self.preset}"
        return self.main

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    @property
    def offloads(self) -> bool:
        """Whether the block's saved tensors (or, with ``full+offload``, its input) go to host memory."""
        return self.main in ("offload", "full+offload")

    def jobs(self, block: nn.Module, *, fqn: str = "", engine: OffloadEngine | None = None) -> list[WrapJob]:
        """The wrap jobs that apply this strategy to ``block``, for ``ckpt_wrapper.apply.wrap_blocks``.

        Region jobs come first (a child named ``f"{fqn}.{region}"``), then the job on the block itself.
        Every job wraps in place.

        Args:
            block: the block.
            fqn: the block's fully qualified name in the root the jobs will run on.
            engine: the offload engine to share, for ``offload`` and ``full+offload``; default a new one.

        Raises:
            ValueError: if a region is not a submodule of the block.

        Example:
            >>> from ckpt_wrapper.planner import Strategy
            >>> from ckpt_wrapper.testing.models import Block, GPTConfig
            >>> jobs = Strategy.parse("cheap+regions:mlp").jobs(Block(GPTConfig(d_model=32, n_head=4)), fqn="layers.0")
            >>> [job.fqn for job in jobs]
            ['layers.0.mlp', 'layers.0']
        """
        jobs: list[WrapJob] = []
        for region in self.regions:
            try:
                child = block.get_submodule(region)
            except AttributeError:
                raise ValueError(
                    f"strategy {str(self)!r} names region {region!r}, but block {fqn or type(block).__name__!r} has "
                    f"no such submodule; its children are {[n for n, _ in block.named_children()]}: fix the region "
                    "or the plan"
                ) from None
            jobs.append(WrapJob(f"{fqn}.{region}" if fqn else region, child, checkpoint_wrapper))
        if self.main == "full":
            jobs.append(WrapJob(fqn, block, checkpoint_wrapper))
        elif self.main == "sac":
            jobs.append(WrapJob(fqn, block, functools.partial(
                checkpoint_wrapper, context_fn=selective_context_fn(self.preset))))
        elif self.main == "offload":
            jobs.append(WrapJob(fqn, block, functools.partial(offload_wrapper, engine=engine)))
        elif self.main == "full+offload":
            jobs.append(WrapJob(fqn, block, functools.partial(
                checkpoint_wrapper, offload=engine if engine is not None else True)))
        if self.cheap:
            jobs.append(WrapJob(fqn, block, cheap_recompute_wrapper))
        return jobs


def block_strategies(block: nn.Module, *, device: torch.device) -> list[Strategy]:
    """The strategies the planner considers for ``block``, cheapest first.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.planner import block_strategies
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> [str(s) for s in block_strategies(Block(GPTConfig(d_model=32, n_head=4)), device=torch.device("cpu"))[:4]]
        ['none', 'cheap', 'regions:attn', 'cheap+regions:attn']
    """
    strategies = [Strategy()]
    has_cheap = bool(cheap_modules(block))
    if has_cheap:
        strategies.append(Strategy(cheap=True))
    regions = region_candidates(block)
    groups = [(r,) for r in regions] + ([tuple(regions)] if len(regions) > 1 else [])
    for group in groups:
        strategies.append(Strategy(main="regions", regions=group))
        if has_cheap:
            strategies.append(Strategy(cheap=True, main="regions", regions=group))
    strategies += [Strategy(main="sac", preset="matmuls"), Strategy(main="sac", preset="titan"), Strategy(main="full")]
    if device.type == "cuda":
        strategies += [Strategy(main="offload"), Strategy(main="full+offload")]
    return strategies


def as_strategy(strategy: Strategy | str) -> Strategy:
    """``strategy`` itself, or parsed from its text form.

    Raises:
        TypeError: for anything but a ``Strategy`` or a str. ValueError: for text that is no strategy.
    """
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        return Strategy.parse(strategy)
    raise TypeError(f"expected a Strategy or its text form (a str such as 'full'), got {type(strategy).__name__}")


def as_strategies(strategies: Sequence[Strategy | str]) -> tuple[Strategy, ...]:
    """Each of ``strategies`` as a ``Strategy``; a bare str is refused (it is no list of strategies).

    Raises:
        TypeError: for a str, or an item that is neither a ``Strategy`` nor a str.
        ValueError: for an item that is no strategy.
    """
    if isinstance(strategies, str) or not isinstance(strategies, Sequence):
        raise TypeError(f"strategies must be a list of strategies, got {strategies!r}; "
                        "write strategies=['full'] for one")
    return tuple(as_strategy(s) for s in strategies)


def apply_strategy(block: nn.Module, strategy: Strategy | str, *, fqn: str = "",
                   engine: OffloadEngine | None = None) -> list[str]:
    """Wrap ``block`` in place as ``strategy`` says, all or nothing; returns the names wrapped.

    The jobs go through ``ckpt_wrapper.apply.wrap_blocks`` with the block as root, named ``fqn``.

    Args:
        block: the block, modified in place.
        strategy: a ``Strategy`` or its text form (``"cheap+regions:mlp"``).
        fqn: the block's fully qualified name in its model.
        engine: the offload engine to share (``offload``, ``full+offload``); default a new one.

    Returns:
        The fully qualified names wrapped, regions first (``fqn`` appears once per wrapper on the block).

    Raises:
        ValueError: for an unknown strategy or region, or a block the strategy cannot wrap.

    Example:
        >>> from ckpt_wrapper.planner import apply_strategy
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> apply_strategy(Block(GPTConfig(d_model=32, n_head=4)), "cheap+regions:attn", fqn="layers.0")
        ['layers.0.attn', 'layers.0']
    """
    return wrap_blocks(block, as_strategy(strategy).jobs(block, fqn=fqn, engine=engine), root_fqn=fqn)
