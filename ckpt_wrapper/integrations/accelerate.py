"""Checkpointing for models trained with HF accelerate: wrap before ``accelerator.prepare``.

Checkpointed blocks keep their class name and ``isinstance``, so accelerate's FSDP plugin (versions 1
and 2, ``transformer_cls_names_to_wrap`` or the model's ``_no_split_modules``) still makes each block an
FSDP unit, and ``accelerator.get_state_dict`` / ``save_state`` see unchanged names. Compared with
accelerate's own ``activation_checkpointing=True``:

- RNG state is preserved (accelerate's FSDP2 path passes ``preserve_rng_state=False``, so dropout in the
  recompute draws different masks from the forward and gradients change);
- names carry no ``_checkpoint_wrapped_module.`` prefix;
- blocks can be chosen freely (every N-th, by name), not only "every FSDP unit".

The two must not be stacked: ``apply_checkpointing`` refuses an accelerator whose FSDP plugin has
``activation_checkpointing=True``.

Example (on every process, before ``prepare``)::

    from accelerate import Accelerator
    from ckpt_wrapper.integrations.accelerate import apply_checkpointing

    accelerator = Accelerator()          # FSDP, DDP or one process, as `accelerate launch` configured it
    model = build_model()
    apply_checkpointing(accelerator, model)             # the blocks the FSDP plugin wraps
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)

accelerate is imported only when a function here is called; install it with
``pip install 'accelerate>=1.6'``, or install ckpt_wrapper with its ``[accelerate]`` extra (README.md, "Install").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_wrapper.apply import apply_activation_checkpointing
from ckpt_wrapper.integrations.blocks import resolve_wrapper
from ckpt_wrapper.log import get_logger
from ckpt_wrapper.selection import by_class_name
from ckpt_wrapper.state import ActivationWrapper, original_class, unwrap

__all__ = ["apply_checkpointing", "block_class_names"]

logger = get_logger(__name__)


def _accelerate() -> Any:
    try:
        import accelerate
    except ImportError as error:
        raise ImportError(
            "ckpt_wrapper.integrations.accelerate needs HF accelerate, which is not installed "
            f"({error}). Install it into this environment with: pip install 'accelerate>=1.6' (or reinstall "
            "ckpt_wrapper with its extra, e.g. pip install '.[accelerate]' from a clone)"
        ) from error
    return accelerate


def _fsdp_plugin(accelerator: Any) -> Any:
    """The FSDP plugin accelerate will shard with, or None when it will not use FSDP.

    accelerate keeps a plugin passed to ``Accelerator`` only when it runs FSDP (on an accelerator);
    on CPU it runs DDP and the plugin is dropped, so this reads the state, not the constructor's input.
    """
    from accelerate.utils import DistributedType

    state = getattr(accelerator, "state", None)
    if state is None:
        raise TypeError(f"expected an accelerate.Accelerator, got {type(accelerator).__name__}")
    if getattr(state, "distributed_type", None) != DistributedType.FSDP:
        return None
    return getattr(state, "fsdp_plugin", None)


def _is_transformer_policy(plugin: Any) -> bool:
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    return (policy.func if isinstance(policy, functools.partial) else policy) is transformer_auto_wrap_policy


def block_class_names(accelerator: Any, model: nn.Module) -> list[str]:
    """The class names of the blocks accelerate makes FSDP units of (or would, for an HF model).

    That is the FSDP plugin's ``transformer_cls_names_to_wrap`` when it wraps by transformer layer, else
    the model's ``_no_split_modules`` (what HF models declare, and what accelerate falls back to).

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the model, before ``accelerator.prepare``.

    Returns:
        The class names, possibly empty (a plain model under DDP declares none).

    Raises:
        ImportError: if accelerate is not installed.
    """
    _accelerate()
    plugin = _fsdp_plugin(accelerator)
    if plugin is not None and _is_transformer_policy(plugin):
        names = plugin.transformer_cls_names_to_wrap
        if isinstance(names, str):
            names = names.split(",")
        if names:
            return [name.strip() for name in names if name.strip()]
    return [str(name) for name in (getattr(model, "_no_split_modules", None) or [])]


def apply_checkpointing(
    accelerator: Any,
    model: nn.Module,
    *,
    check_fn: Callable[[nn.Module], bool] | None = None,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None = None,
    **checkpoint_options: Any,
) -> list[str]:
    """Checkpoint the blocks of ``model`` so that ``accelerator.prepare`` shards them as usual; in place.

    Call it on every process after building the model and before ``accelerator.prepare``. It refuses
    to stack on accelerate's own checkpointing, and keeps RNG state preserved (dropout unchanged).
    With FSDP1 it resolves the plugin's ``transformer_cls_names_to_wrap`` to the blocks' own classes,
    as ``prepare`` would, so blocks left unwrapped are still FSDP units.

    Args:
        accelerator: the ``accelerate.Accelerator`` that will prepare the model.
        model: the model; modified in place.
        check_fn: which blocks to checkpoint (a selector such as ``every_nth(2, by_class_name(...))`` or
            ``module -> bool``); default: the blocks the FSDP plugin wraps (``block_class_names``).
        checkpoint_wrapper_fn: applied to each block; default ``checkpoint_wrapper`` with
            ``checkpoint_options``. ``offload_wrapper`` or a ``functools.partial`` work too.
        **checkpoint_options: options for the default ``checkpoint_wrapper`` (``offload=True``,
            ``context_fn=...``, ...).

    Returns:
        The fully qualified names of the blocks wrapped.

    Raises:
        ImportError: if accelerate is not installed.
        ValueError: if accelerate's FSDP plugin has ``activation_checkpointing=True``, the model was
            prepared already, ``preserve_rng_state=False`` is asked for, no blocks can be found, or (FSDP2)
            the selection would hide unwrapped blocks from the plugin.
        TypeError: for ``checkpoint_options`` together with ``checkpoint_wrapper_fn``.
    """
    _accelerate()
    plugin = _fsdp_plugin(accelerator)
    if plugin is not None and plugin.activation_checkpointing:
        raise ValueError(
            "accelerate's FSDP plugin has activation_checkpointing=True, so accelerator.prepare would wrap these "
            "blocks again with PyTorch's checkpoint_wrapper and recompute each twice. Turn accelerate's off "
            "(fsdp_activation_checkpointing: false in the accelerate config, FSDP_ACTIVATION_CHECKPOINTING=false, "
            "or FullyShardedDataParallelPlugin(activation_checkpointing=False)) to keep ckpt_wrapper's, which keeps "
            "names and RNG state; or do not call apply_checkpointing to keep accelerate's."
        )
    if getattr(model, "_is_accelerate_prepared", False) or _is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} was already prepared (wrapped or sharded by accelerator.prepare); call "
            "apply_checkpointing on the model before accelerator.prepare(model, ...)."
        )
    if checkpoint_options.get("preserve_rng_state", True) is False:
        raise ValueError(
            "preserve_rng_state=False changes dropout: the recompute draws different masks from the forward (what "
            "accelerate's own FSDP2 checkpointing does). This integration keeps RNG state preserved; call "
            "ckpt_wrapper.apply_activation_checkpointing directly if you really want it off."
        )
    checkpoint_wrapper_fn = resolve_wrapper(checkpoint_wrapper_fn, checkpoint_options)
    names = block_class_names(accelerator, model)
    if check_fn is None:
        if not names:
            raise ValueError(
                f"cannot tell the blocks of {type(model).__name__}: accelerate's FSDP plugin names no "
                "transformer_cls_names_to_wrap and the model has no _no_split_modules. Pass check_fn, e.g. "
                "check_fn=ckpt_wrapper.by_class_name('Block')."
            )
        check_fn = by_class_name(*names)
    wrapped = apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper_fn, check_fn=check_fn)
    if plugin is not None and _is_transformer_policy(plugin) and names:
        try:
            _keep_plugin_finding_blocks(plugin, model, names)
        except ValueError:
            for fqn in wrapped:  # leave the model as it came
                unwrap(model.get_submodule(fqn))
            raise
    logger.info("checkpointed %d block(s) before accelerator.prepare (FSDP plugin: %s): %s",
                len(wrapped), "none" if plugin is None else f"version {getattr(plugin, 'fsdp_version', 1)}", wrapped)
    return wrapped


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, (nn.parallel.DistributedDataParallel, FullyShardedDataParallel, FSDPModule))


def _keep_plugin_finding_blocks(plugin: Any, model: nn.Module, names: list[str]) -> None:
    """Make the plugin wrap every block of the named classes, checkpointed or not.

    accelerate resolves each name to ``type(first module with that class name)``. When that module is
    checkpointed, the class found is the generated wrapper class, and blocks left unwrapped are not its
    instances: FSDP would silently fold them into the root unit.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    blocks = [(fqn, m) for fqn, m in model.named_modules() if original_class(m).__name__ in names]
    if {original_class(m).__name__ for _, m in blocks} != set(names):
        return  # a name matches no module: prepare raises accelerate's own error for it
    if getattr(plugin, "fsdp_version", 1) == 1:  # accelerate < 1.6 knows FSDP1 only
        # FSDP1 uses a resolved policy as given: prepare re-resolves only the bare function. A policy the
        # user resolved already is left alone.
        if plugin.auto_wrap_policy is transformer_auto_wrap_policy:
            classes = {original_class(m) for _, m in blocks}
            plugin.auto_wrap_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
            logger.info("FSDP1 plugin: transformer_cls_names_to_wrap %s resolved to the blocks' own classes", names)
        return
    # FSDP2 re-resolves the names inside prepare; only the selection can keep them resolvable.
    resolved = {name: get_module_class_from_name(model, name) for name in names}
    hidden = [fqn for fqn, m in blocks if not isinstance(m, resolved[original_class(m).__name__])]
    if hidden:
        first = next(fqn for fqn, m in blocks if isinstance(m, ActivationWrapper))
        raise ValueError(
            f"accelerate's FSDP2 plugin finds block classes by name from the first module of that name, '{first}', "
            f"which is checkpointed here; the blocks left unwrapped ({', '.join(hidden[:4])}"
            f"{'...' if len(hidden) > 4 else ''}) would then not become FSDP units. Checkpoint every block of "
            "the class, or leave the first one unwrapped, e.g. every_nth(2, by_class_name(...), offset=1)."
        )
