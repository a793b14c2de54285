"""Old import paths keep working for a release, each with a ``FutureWarning`` naming the new one."""

from __future__ import annotations

import pytest

import ckpt_wrapper.distributed
import ckpt_wrapper.testing.recipes as recipes


@pytest.mark.parametrize("name", ["ShardRecipe", "shard_model", "clean_name", "SHARD_KINDS"])
def test_moved_distributed_names_still_resolve_with_a_warning(name: str) -> None:
    """A failure means code written as ``from ckpt_wrapper.distributed import ShardRecipe`` broke without notice."""
    with pytest.warns(FutureWarning, match=rf"ckpt_wrapper\.testing\.recipes\.{name}"):
        found = getattr(ckpt_wrapper.distributed, name)
    assert found is getattr(recipes, name)


def test_from_import_of_a_moved_name_warns() -> None:
    with pytest.warns(FutureWarning, match="moved to ckpt_wrapper.testing.recipes"):
        from ckpt_wrapper.distributed import ShardRecipe
    assert ShardRecipe is recipes.ShardRecipe


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ckpt_wrapper.distributed.nonexistent  # noqa: B018


def test_current_names_do_not_warn() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ckpt_wrapper.distributed import DTYPES, default_device, init_distributed, resolve_dtype
    assert callable(default_device) and callable(init_distributed) and callable(resolve_dtype) and DTYPES
