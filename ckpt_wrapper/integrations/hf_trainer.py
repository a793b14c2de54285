"""Checkpointing for the HF ``Trainer``: one call between building the trainer and ``trainer.train()``.

``use_ckpt_wrapper(trainer)`` checkpoints the model's layers (its ``_no_split_modules``, or the classes
the FSDP config names) through ``ckpt_wrapper.integrations.accelerate.apply_checkpointing`` on the
trainer's own accelerator, before the trainer prepares the model, so the Trainer's FSDP (through
accelerate, versions 1 and 2) still makes every layer its own unit, and DDP or one process work the
same. Compared with ``TrainingArguments(gradient_checkpointing=True)``: RNG state is preserved (HF's
FSDP path through accelerate does not preserve it), names and ``save_pretrained`` files are unchanged,
layers can be chosen freely (``every_nth``), and selective policies and offload are available.

HF's own checkpointing is never stacked on it: ``gradient_checkpointing=True`` /
``activation_checkpointing=True`` in the arguments, or ``"activation_checkpointing": true`` in
``fsdp_config``, are refused with the setting to change, now and again when training begins.

Example::

    from transformers import Trainer, TrainingArguments
    from ckpt_wrapper.integrations.hf_trainer import use_ckpt_wrapper

    trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=data)
    use_ckpt_wrapper(trainer)            # every decoder layer; or check_fn=..., offload=True, context_fn=...
    trainer.train()

transformers and accelerate are imported only when the function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_wrapper.integrations import accelerate as _accelerate_integration

__all__ = ["use_ckpt_wrapper"]


def _hf_checkpointing_on(args: Any) -> bool:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is an alias).
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def _refuse_hf_checkpointing(args: Any, model: nn.Module) -> None:
    if _hf_checkpointing_on(args):
        raise ValueError(
            "TrainingArguments has gradient_checkpointing=True (activation_checkpointing=True), so trainer.train() "
            "would turn on HF's own checkpointing on top of ckpt_wrapper's and recompute every layer twice. Set "
            "gradient_checkpointing=False (drop --gradient_checkpointing) to keep ckpt_wrapper's, which keeps names "
            "and RNG state; or do not call use_ckpt_wrapper to keep HF's."
        )
    on = [name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if on:
        raise ValueError(
            f"{type(model).__name__} has HF's gradient checkpointing enabled ({', '.join(on[:3])}); ckpt_wrapper's would "
            "recompute every layer a second time. Call model.gradient_checkpointing_disable() before use_ckpt_wrapper."
        )


def _refusing_callback(model: nn.Module) -> Any:
    from transformers import TrainerCallback

    class RefuseHFCheckpointing(TrainerCallback):
        """Refuses to train when HF's checkpointing was turned on after ``use_ckpt_wrapper``."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _refuse_hf_checkpointing(args, model)

    return RefuseHFCheckpointing()


def use_ckpt_wrapper(
    trainer: Any,
    *,
    check_fn: Callable[[nn.Module], bool] | None = None,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None = None,
    **checkpoint_options: Any,
) -> list[str]:
    """Make ``trainer`` train with ckpt_wrapper's checkpointing instead of HF's; modifies ``trainer.model``.

    Call it after building the ``Trainer`` and before ``trainer.train()``, on every process.

    Args:
        trainer: the ``transformers.Trainer`` (or a subclass).
        check_fn: which layers (a selector such as ``every_nth(2, by_class_name("LlamaDecoderLayer"))``);
            default: the classes the Trainer's FSDP config wraps, else the model's ``_no_split_modules``.
        checkpoint_wrapper_fn: applied to each layer; default ``checkpoint_wrapper`` with ``checkpoint_options``.
        **checkpoint_options: ``checkpoint_wrapper`` options: ``offload=True``,
            ``context_fn=ckpt_wrapper.selective_context_fn("titan")``, ...

    Returns:
        The fully qualified names of the layers wrapped.

    Raises:
        ValueError: if HF's checkpointing is on (``gradient_checkpointing=True``, or ``activation_checkpointing``
            in ``fsdp_config``), the model was prepared already, or no layers can be found; and see
            ``ckpt_wrapper.integrations.accelerate.apply_checkpointing``.
        TypeError: if ``trainer`` is not a Trainer.
    """
    for needed in ("args", "model", "accelerator", "add_callback"):
        if not hasattr(trainer, needed):
            raise TypeError(f"expected a transformers.Trainer (built, before train()), got {type(trainer).__name__}")
    _refuse_hf_checkpointing(trainer.args, trainer.model)
    try:
        wrapped = _accelerate_integration.apply_checkpointing(
            trainer.accelerator, trainer.model, check_fn=check_fn, checkpoint_wrapper_fn=checkpoint_wrapper_fn,
            **checkpoint_options)
    except ValueError as error:
        if "activation_checkpointing=True" in str(error):
            error.add_note('ckpt_wrapper: with the HF Trainer, that is "activation_checkpointing": true in '
                           "TrainingArguments(fsdp_config=...); set it false")
        raise
    trainer.add_callback(_refusing_callback(trainer.model))
    return wrapped
