"""Tools to prove checkpointing changes nothing a model learns: the multi-rank parity harness.

Example:
    >>> from ckpt_wrapper.testing import ParityConfig
    >>> ParityConfig(reference="sharded").tolerances()
    (0.0, 0.0)
"""

from ckpt_wrapper.testing.parity import ParityConfig, ParityReport, check_parity, default_loss

__all__ = ["ParityConfig", "ParityReport", "check_parity", "default_loss"]
