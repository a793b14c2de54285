"""Glue for training frameworks, each imported only when used (ckpt_wrapper itself needs none of them).

- ``ckpt_wrapper.integrations.accelerate``: checkpoint before ``accelerator.prepare`` so accelerate's FSDP
  plugin (versions 1 and 2) still finds the blocks; refuses to stack on accelerate's own checkpointing.
  Needs accelerate >= 1.6: the ``[accelerate]`` extra, e.g. ``pip install ".[accelerate]"`` from a clone.

- ``ckpt_wrapper.integrations.lightning``: ``CheckpointingCallback`` for ``Trainer(callbacks=...)`` (DDP, FSDP1,
  ``ModelParallelStrategy``), ``apply_checkpointing`` for ``configure_model``.
- ``ckpt_wrapper.integrations.hf_trainer``: ``use_ckpt_wrapper(trainer)`` instead of ``gradient_checkpointing=True``.
- ``ckpt_wrapper.integrations.torchtitan``: ``ac_config(mode=...)`` for a torchtitan config's ``activation_checkpoint``.

The tested versions are pinned in the ``[integrations]`` extra; see ``docs/integrations.md``.

HF transformers models need no glue: select their blocks by class name
(``by_class_name("LlamaDecoderLayer")``); see ``docs/transformers.md``.
"""

__all__: list[str] = []
