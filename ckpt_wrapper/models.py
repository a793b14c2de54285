"""Deprecated path: moved to ``ckpt_wrapper.testing.models``."""

from ckpt_wrapper.deprecated import moved

moved(__name__)
