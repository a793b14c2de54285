"""Deprecated path: moved to ``ckpt_wrapper.cheap_recompute``."""

from ckpt_wrapper.deprecated import moved

moved(__name__)
