"""Rank 0's progress display, the memory figures and the summary table.

Memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); everywhere, the activation
memory of one training forward (``ckpt_wrapper.measure.live_bytes_after_forward``: the bytes forward
leaves alive for backward), which is what checkpointing changes. The process's resident set on CPU is
not shown: it is dominated by the Python and torch runtime and the same in every mode.

Example:
    >>> from ckpt_wrapper.tools.train_driver.progress import summary_text
    >>> print(summary_text([("steps", "1-2 of 2"), ("loss first / last", "4.1 / 3.9")]))
    summary
      steps              1-2 of 2
      loss first / last  4.1 / 3.9
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch

from ckpt_wrapper.table import format_table

__all__ = ["MiB", "Progress", "activation_bytes", "peak_memory", "size_text", "summary_text"]

MiB = 2**20
"""Bytes in a mebibyte."""


class Progress:
    """Rank 0's display: tqdm or one ``\\r``-updated line on a terminal, else a line per ``every`` steps.

    Args:
        mode: ``auto``, ``bar``, ``lines`` or ``off``.
        first: the first step of this run.
        last: the last step of this run.
        every: steps between lines in ``lines`` mode.
        enabled: False on every rank but 0 (then nothing is shown).
    """

    def __init__(self, mode: str, first: int, last: int, every: int, enabled: bool) -> None:
        self.first, self.last, self.every, self.bar = first, last, every, None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        if self.mode == "bar":
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=last - first + 1, initial=0, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, memory: str) -> None:
        """Show ``step``'s loss, throughput and memory (``memory``: already formatted, may be empty)."""
        text = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s" + (f"  {memory}" if memory else "")
        if self.mode == "bar" and self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.mode == "bar":
            print(f"\rstep {step}/{self.last}  {text}", end="", file=sys.stderr, flush=True)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.last):
            print(f"step {step}/{self.last}  {text}", flush=True)

    def close(self) -> None:
        """End the bar (or the updating line)."""
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "bar":
            print(file=sys.stderr)


def peak_memory(device: torch.device) -> int | None:
    """The CUDA allocator's peak bytes on a GPU; None on CPU (no figure that checkpointing changes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def activation_bytes(forward: Callable[[], Any], module: torch.nn.Module) -> tuple[Any, int]:
    """Run ``forward()`` once, measuring what it leaves alive for backward; return ``(output, bytes)``.

    The output stays alive (backward follows) and is not counted, nor are ``module``'s parameters as
    they are after the forward (FSDP's gathered ones included).
    """
    from ckpt_wrapper.measure import live_bytes_after_forward

    held: list[Any] = []

    def run() -> Any:
        held.append(forward())
        return held[-1]

    def parameters():  # a generator: read after the forward
        for p in module.parameters():
            yield p.to_local() if hasattr(p, "to_local") else p

    measured = live_bytes_after_forward(run, exclude=parameters())
    return held[0], measured


def size_text(n: int) -> str:
    """``143.2 KiB``, ``12.5 MiB``, ``1.20 GiB``."""
    if n < MiB:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / MiB:,.1f} MiB" if n < 1024 * MiB else f"{n / (1024 * MiB):,.2f} GiB"


def summary_text(rows: list[tuple[str, str]]) -> str:
    """``summary`` and then the rows as a two-column table."""
    return "summary\n" + format_table(rows, indent="  ")
