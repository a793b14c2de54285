"""``apply_activation_checkpointing`` and ``remove_activation_checkpointing``.

Example:
    >>> import torch
    >>> from ckpt_wrapper import apply_activation_checkpointing, remove_activation_checkpointing
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    >>> apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, torch.nn.Linear))
    ['0', '2']
    >>> apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, torch.nn.Linear))
    []
    >>> remove_activation_checkpointing(model)
    ['0', '2']
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ckpt_wrapper.selection import BlockSelector, walk
from ckpt_wrapper.state import ActivationWrapper, check_unwrappable, unwrap, wrap_state
from ckpt_wrapper.wrapper import CheckpointWrapper, checkpoint_wrapper

__all__ = ["WrapJob", "apply_activation_checkpointing", "remove_activation_checkpointing", "wrap_blocks"]


@dataclasses.dataclass(frozen=True)
class WrapJob:
    """One block to wrap: where it is, what it is, and the function that wraps it."""

    fqn: str
    """Fully qualified name of ``module`` in the root passed to ``wrap_blocks``."""
    module: nn.Module
    """The block."""
    wrap: Callable[[nn.Module], nn.Module]
    """Wraps the block: ``checkpoint_wrapper``, a ``functools.partial`` of a wrapper, PyTorch's own, ..."""


def wrap_blocks(root: nn.Module, jobs: Sequence[WrapJob], *, root_fqn: str = "") -> list[str]:
    """The one wrapping path: run ``jobs`` on ``root``'s blocks, all or nothing.

    Every public way to wrap (``apply_activation_checkpointing``, plans, regions, integrations) ends
    here, so each gets the same FQN labels and engine sharing. If any job fails, every block this
    call wrapped is restored and the error names the block that failed.

    Args:
        root: the module the jobs' blocks live in.
        jobs: what to wrap, in order.
        root_fqn: ``root``'s own name in the model, when it is not the model (a block whose regions
            are wrapped): job FQNs are full names that start with it.

    Returns:
        The FQNs wrapped, in job order.
    """
    done: list[tuple[WrapJob, nn.Module]] = []

    def put(fqn: str, module: nn.Module) -> None:
        relative = fqn[len(root_fqn) + 1:] if root_fqn else fqn
        parent_name, _, child = relative.rpartition(".")
        setattr(root.get_submodule(parent_name), child, module)

    try:
        for job in jobs:
            result = job.wrap(job.module)
            if not isinstance(result, nn.Module):
                raise TypeError(
                    f"the wrapper function must return an nn.Module, got {type(result).__name__} for '{job.fqn}'"
                )
            if result is not job.module:  # a wrapper that builds a new module (PyTorch's own, say)
                put(job.fqn, result)
            done.append((job, result))
            state = wrap_state(result)
            if state is not None:
                state.fqn = job.fqn
    except BaseException as error:
        for job, result in reversed(done):
            if result is not job.module:
                put(job.fqn, job.module)
            else:
                unwrap(result)
        if isinstance(error, Exception) and not getattr(error, "_ckpt_wrap_noted", False):
            error._ckpt_wrap_noted = True  # type: ignore[attr-defined]
            failed = jobs[len(done)].fqn if len(done) < len(jobs) else "?"
            error.add_note(f"ckpt_wrapper: wrapping block '{failed}' failed; no block was left wrapped")
        raise
    _share_engines([result for _, result in done])
    if any(isinstance(result, CheckpointWrapper) for _, result in done):
        _guard_kv_cache(root)
    return [job.fqn for job, _ in done]


def _guard_kv_cache(model: nn.Module) -> None:
    """On an HF model, turn its KV cache off in training forwards (from now on, whatever its mode now).

    A recompute runs each layer's forward again, which would append its keys and values to the cache
    a second time; HF's own checkpointing turns the cache off for the same reason.
    """
    config = getattr(model, "config", None)
    if not hasattr(config, "use_cache") or _no_cache_in_training in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_no_cache_in_training, with_kwargs=True)


def _no_cache_in_training(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if not (model.training and torch.is_grad_enabled()):
        return None
    asked = kwargs.get("use_cache")
    if asked is False or (asked is None and not getattr(model.config, "use_cache", False)):
        return None
    warnings.warn(
        f"{type(model).__name__}: use_cache=True in a training forward of a model with checkpointed layers; "
        "ckpt_wrapper sets use_cache=False for it (a recompute would add every layer's keys and values to the "
        "cache a second time). Set model.config.use_cache = False for training to silence this.",
        UserWarning,
        stacklevel=3,
    )
    return args, {**kwargs, "use_cache": False}


def _share_engines(modules: Sequence[nn.Module]) -> None:
    """Give blocks wrapped together, each with an engine of its own and equal options, one engine.

    One pool serves them all, and backward can prefetch a block's tensors while the next computes:
    neither works across separate engines.
    """
    shared: dict[Any, Any] = {}
    for module in modules:
        state = wrap_state(module)
        if state is not None and state.engine is not None and state.engine_mergeable:
            state.engine = shared.setdefault(state.engine.options, state.engine)
            state.engine_mergeable = False


def _policy_selection(policy: Any, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Exactly the modules PyTorch's ``apply_activation_checkpointing`` wraps for an FSDP auto-wrap policy.

    PyTorch's own traversal decides (``_recursive_wrap`` for a callable policy, ``_Policy._run_policy``
    for a policy object), with a wrapper that only records; modules come inner first, as PyTorch wraps
    them, the root never.
    """
    from torch.distributed.fsdp.wrap import _recursive_wrap

    chosen: list[nn.Module] = []
    if getattr(policy, "_run_policy", None) is not None and not callable(policy):
        targets = policy._run_policy(model, ignored_modules=set(), root_kwargs={})
        chosen = [m for m in _post_order(model) if m in targets]
    elif callable(policy):
        def record(module: nn.Module, **_: Any) -> nn.Module:
            chosen.append(module)
            return module

        _recursive_wrap(module=model, auto_wrap_policy=policy, wrapper_cls=record, ignored_modules=set(),
                        ignored_params=set(), only_wrap_children=True)
    else:
        raise TypeError(
            f"auto_wrap_policy must be an FSDP auto-wrap policy (a callable such as "
            f"functools.partial(transformer_auto_wrap_policy, ...) or a ModuleWrapPolicy); got {policy!r}"
        )
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    unique = list({id(m): m for m in chosen if m is not model}.values())
    return [(names[id(m)], m) for m in unique]


def _post_order(model: nn.Module) -> list[nn.Module]:
    def visit(module: nn.Module) -> list[nn.Module]:
        return [m for child in module.children() for m in visit(child)] + [module]

    return visit(model)


def apply_activation_checkpointing(
    model: nn.Module,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] = checkpoint_wrapper,
    check_fn: Callable[[nn.Module], bool] = lambda _: True,
    auto_wrap_policy: Any = None,
) -> list[str]:
    """Wrap the blocks of ``model`` that ``check_fn`` selects, in place; return their names.

    A drop-in for PyTorch's private ``apply_activation_checkpointing`` (same parameters) that keeps
    every parameter, buffer and state-dict name, wraps outermost matches only (never the root, never a
    block inside a block), skips blocks already wrapped, and says so when the selection matches nothing.

    Args:
        model: the model to modify in place.
        checkpoint_wrapper_fn: called on each selected block; ``checkpoint_wrapper`` (default),
            ``offload_wrapper``, or a ``functools.partial`` of either with options.
        check_fn: ``module -> bool``, or a selector such as ``by_class_name("LlamaDecoderLayer")``,
            ``by_name("layers.*")`` or ``every_nth(2, ...)``, which also see names and order.
        auto_wrap_policy: an FSDP auto-wrap policy; when given it takes precedence over ``check_fn``.

    Returns:
        The fully qualified names of the blocks wrapped by this call, in module order; ``[]`` when
        everything selected was wrapped already.

    Raises:
        ValueError: if the selection matches no module (the message lists the classes in the model), or
            the model already checkpoints itself (HF ``gradient_checkpointing_enable()``).
        TypeError: if ``check_fn`` or ``auto_wrap_policy`` is not usable.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import apply_activation_checkpointing, by_class
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> apply_activation_checkpointing(model, check_fn=by_class(torch.nn.Linear))
        ['0']
        >>> [name for name, _ in model.named_parameters()]
        ['0.weight', '0.bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_double_checkpointing(model)
    if auto_wrap_policy is not None:
        chosen = _policy_selection(auto_wrap_policy, model)
        described = f"auto_wrap_policy {auto_wrap_policy!r}"
    elif isinstance(check_fn, BlockSelector):
        chosen = check_fn.select(model)
        described = check_fn.describe()
    elif callable(check_fn):
        chosen = list(walk(model, lambda name, module: bool(check_fn(module))))
        described = f"check_fn {getattr(check_fn, '__qualname__', check_fn)!r}"
    else:
        raise TypeError(f"check_fn must be callable (module -> bool) or a selector, got {type(check_fn).__name__}")

    if not chosen:
        raise ValueError(_nothing_matched_message(model, described))
    jobs = [WrapJob(name, module, checkpoint_wrapper_fn) for name, module in chosen if not isinstance(module, ActivationWrapper)]
    return wrap_blocks(model, jobs)


def _refuse_double_checkpointing(model: nn.Module) -> None:
    # HF transformers models checkpoint their own layers once gradient_checkpointing_enable() ran;
    # wrapping them as well would recompute every block twice.
    enabled = [name or type(model).__name__ for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if enabled:
        raise ValueError(
            f"{type(model).__name__} already checkpoints its layers itself (gradient_checkpointing=True on "
            f"{', '.join(enabled[:3])}{'...' if len(enabled) > 3 else ''}); wrapping it too would recompute every "
            "block twice. Turn HF's off first (model.gradient_checkpointing_disable(), or "
            "activation_checkpointing_disable() in newer transformers), or keep it and skip apply_activation_checkpointing."
        )


def _nothing_matched_message(model: nn.Module, described: str) -> str:
    classes = sorted({type(m).__name__ for _, m in model.named_modules() if m is not model})
    inside = sum(isinstance(m, ActivationWrapper) for m in model.modules())
    note = (
        f" {inside} module(s) are wrapped already; modules inside them are never candidates."
        if inside
        else ""
    )
    return (
        f"apply_activation_checkpointing: {described} matched no module of {type(model).__name__}.{note} "
        f"Module classes in the model: {', '.join(classes) or '(none)'}. "
        "Select blocks by one of these classes, e.g. check_fn=ckpt_wrapper.by_class_name('<class name>')."
    )


def remove_activation_checkpointing(model: nn.Module) -> list[str]:
    """Restore every wrapped module in ``model`` (the root included) to its original class, in place.

    PyTorch's own ``CheckpointWrapper`` / ``OffloadWrapper`` are also removed, which lets a model
    migrate: their inner modules take their place.

    Args:
        model: the model to modify in place.

    Returns:
        The fully qualified names of the modules unwrapped (``""`` for the root).

    Raises:
        ValueError: if a wrapped block was sharded with ``fully_shard`` afterwards (nothing is changed).

    Example:
        >>> import torch
        >>> from ckpt_wrapper import checkpoint_wrapper, remove_activation_checkpointing
        >>> model = torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(2, 2)))
        >>> remove_activation_checkpointing(model), type(model[0]).__name__
        (['0'], 'Linear')
    """
    ours = [(name, m) for name, m in model.named_modules() if isinstance(m, ActivationWrapper)]
    for _, module in ours:  # check all first: a half-unwrapped model is worse than an error
        check_unwrappable(module)
    removed: list[str] = []
    for name, module in ours:
        unwrap(module)
        removed.append(name)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _no_cache_in_training:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    # PyTorch's wrapper holds the block as a child; put the child back where the wrapper was.
    for name, module in list(model.named_modules()):
        inner = module._modules.get("_checkpoint_wrapped_module") if name else None
        if inner is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, inner)
            removed.append(name)
    return removed
