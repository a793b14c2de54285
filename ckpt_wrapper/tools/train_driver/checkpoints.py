"""The driver's DCP checkpoints: model and optimizer sharded, plus each rank's RNG state and data position.

Example:
    >>> import pathlib, tempfile
    >>> from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints
    >>> Checkpoints(pathlib.Path(tempfile.mkdtemp()), rank=0, world=1).latest() is None
    True
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import nn

__all__ = ["Checkpoints"]


class Checkpoints:
    """DCP checkpoints in ``root/step-NNNNNNNN``: model and optimizer, plus one small file per rank.

    The per-rank file holds what DCP's replicated-state de-duplication would lose: each rank's RNG state
    (dropout streams differ per rank) and the data position (the step).
    """

    def __init__(self, root: pathlib.Path, rank: int, world: int) -> None:
        self.root, self.rank, self.world = root, rank, world

    def latest(self) -> tuple[int, pathlib.Path] | None:
        """The newest complete checkpoint (DCP writes ``.metadata`` last) as ``(step, path)``, or None."""
        found = sorted(p for p in self.root.glob("step-*") if (p / ".metadata").exists())
        return (int(found[-1].name.removeprefix("step-")), found[-1]) if found else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> pathlib.Path:
        """Save after ``step`` (a collective: every rank calls it); return the checkpoint's directory."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        path = self.root / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(device) | {"step": step, "next_data_step": step + 1, "world_size": self.world},
                   path / f"train_state.rank{self.rank}.pt")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=path)
        return path

    def load(self, path: pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> int:
        """Load ``path`` into ``model``, ``optimizer`` and this rank's RNG; return the next step to train.

        Raises:
            ValueError: if another world size saved it (each rank's data slice and RNG stream would differ).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        mine = path / f"train_state.rank{self.rank}.pt"
        extra = torch.load(mine, weights_only=True) if mine.exists() else {"world_size": "fewer"}
        if extra["world_size"] != self.world:
            raise ValueError(f"{path} was saved by {extra['world_size']} ranks, expected {self.world} (this run): "
                             "each rank's data slice and RNG stream would differ. Resume with the world size "
                             "that saved it, or pass --no-resume")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _set_rng_state(extra, device)
        return int(extra["next_data_step"])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
