"""The driver's DCP checkpoints: model and optimizer sharded, plus each rank's RNG state and data position.

A step lives in ``root/step-NNNNNNNN``: the DCP files, one ``train_state.rankR.pt`` per rank and
``run.json`` (the model and run configuration, written by rank 0). Each step is written into
``root/.partial-step-NNNNNNNN`` and renamed into place by rank 0 once every rank has finished, so a step
folder is always complete; a step damaged afterwards (a truncated ``.distcp``, a missing per-rank file
or ``.metadata``) is named and skipped for the previous good one.

Example:
    >>> import pathlib, tempfile
    >>> from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints
    >>> Checkpoints(pathlib.Path(tempfile.mkdtemp()), rank=0, world=1).steps()
    []
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RUN_FILE", "Checkpoints", "check_folder", "differences", "run_identity"]

RUN_FILE = "run.json"
"""The model and run configuration stored with each step."""
_PARTIAL = ".partial-step-"
_REPLACED = ".replaced-step-"
MODEL_KEYS = ("model", "n_layer", "d_model", "n_head", "seq_len", "vocab_size")
"""The flags that shape the model's state: a checkpoint loads only into the same values."""
RUN_KEYS = ("world_size", "batch", "seed", "data")
"""The flags that decide each rank's data and RNG stream: a resumed run must keep them."""


def check_folder(root: pathlib.Path, rank: int) -> None:
    """Refuse a ``--checkpoint-dir`` that cannot hold checkpoints, before any training; create it if missing.

    Raises:
        ValueError: it is a file, lies under a file, or cannot be written.
    """
    for parent in (root, *root.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == root else f"lies under {parent}, which is a file"
            raise ValueError(f"--checkpoint-dir {root} {where}: pass a folder (it is created if missing)")
        if parent.exists():
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test.rank{rank}.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--checkpoint-dir {root} cannot be written ({error.strerror or error}): "
                         "pass a folder this user can write") from None


def run_identity(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """What ``run.json`` records: the values of ``MODEL_KEYS`` and ``RUN_KEYS``, and every flag for reference."""
    data = None
    if args.data is not None:
        data = f"{args.data.name} ({args.data.stat().st_size} bytes)" if args.data.is_file() else args.data.name
    values = {key: getattr(args, key) for key in MODEL_KEYS if key != "data"}
    values.update(world_size=world, batch=args.batch, seed=args.seed, data=data)
    flags = {key: (str(value) if isinstance(value, pathlib.Path) else value) for key, value in vars(args).items()
             if isinstance(value, (str, int, float, bool, type(None), pathlib.Path))}
    return {"format": 1, "identity": values, "flags": flags}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--n-layer 4 there, 2 here`` for each identity value that differs."""
    there, here = saved.get("identity", {}), current["identity"]
    out = []
    for key in (*MODEL_KEYS, *RUN_KEYS):
        if there.get(key) != here.get(key):
            name = "ranks" if key == "world_size" else f"--{key.replace('_', '-')}"
            out.append(f"{name} {there.get(key, 'unknown')} there, {here.get(key)} here")
    return out


class Checkpoints:
    """DCP checkpoints in ``root/step-NNNNNNNN``: model and optimizer, one small file per rank, ``run.json``.

    The per-rank file holds what DCP's replicated-state de-duplication would lose: each rank's RNG state
    (dropout streams differ per rank) and the data position (the step).

    Args:
        root: the checkpoint folder.
        rank: this process's rank.
        world: the number of ranks.
        identity: this run's ``run_identity`` (written into each step; checked by ``refuse_foreign``).
    """

    def __init__(self, root: pathlib.Path, rank: int, world: int, identity: dict[str, Any] | None = None) -> None:
        self.root, self.rank, self.world = root, rank, world
        self.identity = identity or {"format": 1, "identity": {"world_size": world}, "flags": {}}

    def steps(self) -> list[tuple[int, pathlib.Path]]:
        """Every step folder, oldest first, as ``(step, path)`` (complete or not: see ``problem``)."""
        found = []
        for path in self.root.glob("step-*"):
            number = path.name.removeprefix("step-")
            if path.is_dir() and number.isdigit():
                found.append((int(number), path))
        return sorted(found)

    def refuse_foreign(self) -> None:
        """Refuse a folder holding another run's steps (or steps without ``run.json``), saying what differs.

        Raises:
            ValueError: naming the step, the values that differ and how to start fresh.
        """
        for step, path in reversed(self.steps()):
            saved = _read_json(path / RUN_FILE)
            if saved is None:
                found = "has no run.json (written by an older driver or another program)"
            else:
                diff = differences(saved, self.identity)
                if not diff:
                    continue
                found = f"differs: {'; '.join(diff)}"
            raise ValueError(
                f"--checkpoint-dir {self.root} holds another run's checkpoints ({path} {found}). Resume it with "
                "the flags that saved it, start over with --no-resume (this run then deletes those steps at "
                "its first save), or pass another --checkpoint-dir")

    def problem(self, path: pathlib.Path) -> str | None:
        """Why the step at ``path`` cannot be resumed from (naming the file), or None if it looks whole."""
        if not (path / ".metadata").is_file():
            return f"{path / '.metadata'} is missing (DCP's index of the step)"
        if not (path / RUN_FILE).is_file():
            return f"{path / RUN_FILE} is missing"
        for rank in range(self.world):
            mine = path / f"train_state.rank{rank}.pt"
            if not mine.is_file():
                return f"{mine} is missing (rank {rank}'s RNG state and data position)"
        try:
            import torch.distributed.checkpoint as dcp

            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as error:  # unpickling a damaged file raises anything
            return f"{path / '.metadata'} cannot be read ({type(error).__name__}: {error})"
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size < size:
                return f"{file} is truncated: {file.stat().st_size} bytes, the metadata expects {size}"
        return None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             keep_last: int = 0, discard_others: bool = False) -> pathlib.Path:
        """Save after ``step`` (a collective: every rank calls it); return the step's folder.

        Written into a partial folder, renamed into place by rank 0 after a barrier; then every other step
        is deleted if ``discard_others`` (``--no-resume``'s first save), else all but the newest
        ``keep_last`` (0 keeps all).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.root / f"step-{step:08d}"
        partial = self.root / f"{_PARTIAL}{step:08d}"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        torch.save(_rng_state(device) | {"step": step, "next_data_step": step + 1, "world_size": self.world},
                   partial / f"train_state.rank{self.rank}.pt")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=partial)
        _barrier()  # every rank's files are written
        if self.rank == 0:
            (partial / RUN_FILE).write_text(json.dumps({**self.identity, "step": step}, indent=1))
            if final.exists():  # a damaged step of the same number, being replaced
                replaced = self.root / f"{_REPLACED}{step:08d}"
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
                partial.rename(final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                partial.rename(final)
            others = [path for _, path in self.steps() if path != final]  # oldest first
            if discard_others:
                doomed = others
            else:  # the newest keep_last steps stay, the one just saved among them
                doomed = others[:max(len(others) - keep_last + 1, 0)] if keep_last > 0 else []
            for old in doomed:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()  # nobody reads the folder before the rename
        return final

    def clean_partial(self) -> None:
        """Rank 0 deletes what an interrupted save left (partial and replaced folders)."""
        if self.rank == 0:
            for path in [*self.root.glob(f"{_PARTIAL}*"), *self.root.glob(f"{_REPLACED}*")]:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> int:
        """Load ``path`` into ``model``, ``optimizer`` and this rank's RNG; return the next step to train.

        A collective. Raises whatever DCP or ``torch.load`` raise on a damaged step, on every rank alike
        (the caller falls back to an older step).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        extra: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            extra = torch.load(path / f"train_state.rank{self.rank}.pt", weights_only=True)
        except Exception as caught:
            error = caught
        if not _all_true(error is None):
            raise RuntimeError(f"{path}: rank {self.rank}'s train_state file cannot be read"
                               + (f" ({error})" if error else " on another rank"))
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path)  # DCP gathers a failure on any rank and raises it on all
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _set_rng_state(extra, device)
        return int(extra["next_data_step"])


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value)
    return int(value.item()) == 0


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
