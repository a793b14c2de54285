"""Deprecated path: moved to ``ckpt_wrapper.tools.bench``."""

from ckpt_wrapper.deprecated import moved

moved(__name__)
