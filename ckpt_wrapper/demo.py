"""Deprecated path: moved to ``ckpt_wrapper.tools.demo``."""

from ckpt_wrapper.deprecated import moved

moved(__name__)
