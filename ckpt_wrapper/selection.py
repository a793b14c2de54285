"""Block selection: which modules ``apply_activation_checkpointing`` wraps.

A selector is a ``check_fn`` that can also see each module's fully qualified name and its place among
the other matches. Selection is outermost-first: once a module matches, nothing inside it is looked at,
so blocks are never wrapped inside blocks, and the root is never a candidate.

Example:
    >>> import torch
    >>> from ckpt_wrapper import by_class_name, every_nth
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    >>> [name for name, _ in by_class_name("Linear").select(model)]
    ['0', '1', '2', '3']
    >>> [name for name, _ in every_nth(2, by_class_name("Linear")).select(model)]
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ckpt_wrapper.state import ActivationWrapper

__all__ = ["walk", "BlockSelector", "by_class", "by_class_name", "by_name", "every_nth", "first_n", "all_but_last"]


def walk(model: nn.Module, matches: Callable[[str, nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
    """Pre-order (name, module) pairs that match, never descending into a match or a wrapped block."""

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            # Containers (ModuleList, ModuleDict) have no forward to wrap: look inside them instead.
            if matches(name, child) and not _is_container(child):
                yield name, child
            elif not isinstance(child, ActivationWrapper):
                yield from visit(f"{name}.", child)

    seen: set[int] = set()
    for name, module in visit("", model):
        if id(module) not in seen:  # a module registered twice is wrapped once
            seen.add(id(module))
            yield name, module


def _is_container(module: nn.Module) -> bool:
    return type(module).forward is nn.Module.forward


class BlockSelector:
    """Chooses blocks by name and module; usable wherever a ``check_fn`` is.

    Subclasses implement ``matches(name, module)``; ``select(model)`` returns the outermost matches in
    module order. Selectors combine with ``|`` (either) and ``&`` (both).
    """

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether the module at fully qualified ``name`` is a block to wrap."""
        raise NotImplementedError

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(fully qualified name, module)`` pairs of ``model`` this selector picks, in order."""
        return list(walk(model, self.matches))

    def __call__(self, module: nn.Module) -> bool:
        # Lets a selector stand in for a plain check_fn (for example with PyTorch's own
        # apply_activation_checkpointing), where names are unknown.
        return self.matches("", module)

    def __or__(self, other: BlockSelector) -> BlockSelector:
        return _Combined(self, other, any)

    def __and__(self, other: BlockSelector) -> BlockSelector:
        return _Combined(self, other, all)

    def describe(self) -> str:
        """A short human-readable description, used in error messages."""
        return type(self).__name__


class _Combined(BlockSelector):
    def __init__(self, left: BlockSelector, right: BlockSelector, how: Callable[[Any], bool]) -> None:
        for side in (left, right):
            if not isinstance(side, BlockSelector):
                raise TypeError(f"selectors combine only with selectors, got {type(side).__name__}")
        self.left, self.right, self.how = left, right, how

    def matches(self, name: str, module: nn.Module) -> bool:
        return self.how(side.matches(name, module) for side in (self.left, self.right))

    def describe(self) -> str:
        joiner = " | " if self.how is any else " & "
        return f"({self.left.describe()}{joiner}{self.right.describe()})"


class _EachMustMatch(BlockSelector):
    """A selector given a list (of classes, names or patterns): each item must match some module."""

    def items(self) -> list[Any]:
        raise NotImplementedError

    def item_matches(self, item: Any, name: str, module: nn.Module) -> bool:
        raise NotImplementedError

    def matches(self, name: str, module: nn.Module) -> bool:
        return any(self.item_matches(item, name, module) for item in self.items())

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = super().select(model)
        modules = [(name, m) for name, m in model.named_modules() if m is not model]
        unmatched = [item for item in self.items() if not any(self.item_matches(item, n, m) for n, m in modules)]
        if unmatched and len(unmatched) < len(self.items()):  # nothing at all matched: apply says so
            shown = [_shown(item) for item in self.items()]
            raise ValueError(
                f"{self.describe()}: {', '.join(map(repr, map(_shown, unmatched)))} matched no module of "
                f"{type(model).__name__} (the others, {[s for s in shown if s not in map(_shown, unmatched)]}, did). "
                "A misspelt name would silently leave blocks unwrapped; fix or remove it. Module classes in the "
                f"model: {', '.join(sorted({type(m).__name__ for _, m in modules}))}."
            )
        return chosen


def _shown(item: Any) -> str:
    if isinstance(item, type):
        return item.__name__
    return item.pattern if isinstance(item, re.Pattern) else str(item)


class _ByClass(_EachMustMatch):
    def __init__(self, classes: tuple[type, ...]) -> None:
        bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
        if not classes or bad:
            raise TypeError(f"by_class expects nn.Module subclasses, got {bad or 'nothing'}")
        self.classes = classes

    def items(self) -> list[Any]:
        return list(self.classes)

    def item_matches(self, item: Any, name: str, module: nn.Module) -> bool:
        return isinstance(module, item)

    def describe(self) -> str:
        return f"by_class({', '.join(c.__name__ for c in self.classes)})"


class _ByClassName(_EachMustMatch):
    def __init__(self, names: tuple[str, ...]) -> None:
        flat = [part.strip() for item in names for part in _as_str(item, "by_class_name").split(",")]
        self.names = frozenset(part for part in flat if part)
        if not self.names:
            raise ValueError("by_class_name needs at least one class name, such as 'LlamaDecoderLayer'")

    def items(self) -> list[Any]:
        return sorted(self.names)

    def item_matches(self, item: Any, name: str, module: nn.Module) -> bool:
        # Any class in the MRO counts, so a block still matches after fully_shard or wrapping
        # changed its concrete class; dotted names match the full import path.
        return any(cls.__name__ == item or f"{cls.__module__}.{cls.__qualname__}" == item for cls in type(module).__mro__)

    def describe(self) -> str:
        return f"by_class_name({', '.join(sorted(self.names))})"


class _ByName(_EachMustMatch):
    def __init__(self, patterns: tuple[str | re.Pattern[str], ...]) -> None:
        if not patterns:
            raise ValueError("by_name needs at least one pattern, such as 'layers.*'")
        self.patterns = [p if isinstance(p, re.Pattern) else _as_str(p, "by_name") for p in patterns]

    def items(self) -> list[Any]:
        return list(self.patterns)

    def item_matches(self, item: Any, name: str, module: nn.Module) -> bool:
        if not name:
            raise TypeError(
                "by_name selects by fully qualified name, which a plain check_fn call does not give; "
                "pass it to ckpt_wrapper.apply_activation_checkpointing, which does."
            )
        return item.fullmatch(name) is not None if isinstance(item, re.Pattern) else fnmatch.fnmatchcase(name, item)

    def describe(self) -> str:
        shown = [p.pattern if isinstance(p, re.Pattern) else p for p in self.patterns]
        return f"by_name({', '.join(map(repr, shown))})"


class _EveryNth(BlockSelector):
    def __init__(self, n: int, of: BlockSelector, offset: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"every_nth needs n >= 1, got {n!r}")
        if not isinstance(offset, int) or not 0 <= offset < n:
            raise ValueError(f"every_nth needs 0 <= offset < n, got offset={offset!r} with n={n}")
        if not isinstance(of, BlockSelector):
            raise TypeError(
                f"every_nth needs a selector to count, such as by_class_name('Block'); got {type(of).__name__}"
            )
        self.n, self.of, self.offset = n, of, offset

    def matches(self, name: str, module: nn.Module) -> bool:
        raise TypeError("every_nth depends on order; use it through select() or apply_activation_checkpointing")

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return self.of.select(model)[self.offset :: self.n]

    def describe(self) -> str:
        return f"every_nth({self.n}, {self.of.describe()}, offset={self.offset})"


class _Slice(BlockSelector):
    def __init__(self, of: BlockSelector, count: int, *, keep_first: bool, label: str) -> None:
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"{label} needs a count >= 0, got {count!r}")
        if not isinstance(of, BlockSelector):
            raise TypeError(f"{label} needs a selector to count, such as by_class_name('Block'); got {type(of).__name__}")
        self.of, self.count, self.keep_first, self.label = of, count, keep_first, label

    def matches(self, name: str, module: nn.Module) -> bool:
        raise TypeError(f"{self.label} depends on order; use it through select() or apply_activation_checkpointing")

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = self.of.select(model)
        if self.keep_first:
            return chosen[: self.count]
        return chosen[: max(len(chosen) - self.count, 0)]

    def describe(self) -> str:
        return f"{self.label}({self.count}, {self.of.describe()})"


def _as_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} expects strings, got {type(value).__name__}: {value!r}")
    return value


def by_class(*classes: type[nn.Module]) -> BlockSelector:
    """Select modules that are instances of any of ``classes``.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_class
        >>> [n for n, _ in by_class(torch.nn.ReLU).select(torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU()))]
        ['1']
    """
    return _ByClass(classes)


def by_class_name(*names: str) -> BlockSelector:
    """Select modules by class name, as HF and accelerate configs write it (``"LlamaDecoderLayer"``).

    Each argument may hold several comma-separated names; a dotted name matches the full import path.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_class_name
        >>> [n for n, _ in by_class_name("ReLU,GELU").select(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.GELU()))]
        ['0', '1']
    """
    return _ByClassName(names)


def by_name(*patterns: str | re.Pattern[str]) -> BlockSelector:
    """Select modules whose fully qualified name matches a glob (``"layers.*"``) or compiled regex.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_name
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
        >>> [n for n, _ in by_name("1").select(model)]
        ['1']
    """
    return _ByName(patterns)


def every_nth(n: int, of: BlockSelector, *, offset: int = 0) -> BlockSelector:
    """Select every ``n``-th block that ``of`` selects, starting at index ``offset`` (0-based).

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_class, every_nth
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(5)])
        >>> [n for n, _ in every_nth(2, by_class(torch.nn.Linear), offset=1).select(model)]
        ['1', '3']
    """
    return _EveryNth(n, of, offset)


def first_n(n: int, of: BlockSelector) -> BlockSelector:
    """Select the first ``n`` blocks that ``of`` selects, in module order.

    For offload, the first blocks run earliest in forward and latest in backward, so their copies have
    the most time to hide behind compute.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_class, first_n
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(4)])
        >>> [n for n, _ in first_n(2, by_class(torch.nn.Linear)).select(model)]
        ['0', '1']
    """
    return _Slice(of, n, keep_first=True, label="first_n")


def all_but_last(k: int, of: BlockSelector) -> BlockSelector:
    """Select every block that ``of`` selects except the last ``k``.

    The last blocks are the first needed in backward, with no compute to hide a transfer behind.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import all_but_last, by_class
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(4)])
        >>> [n for n, _ in all_but_last(1, by_class(torch.nn.Linear)).select(model)]
        ['0', '1', '2']
    """
    return _Slice(of, k, keep_first=False, label="all_but_last")
