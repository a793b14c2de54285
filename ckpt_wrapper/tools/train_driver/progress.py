"""Rank 0's progress display, the peak-memory figure and the summary table.

Example:
    >>> from ckpt_wrapper.tools.train_driver.progress import summary_text
    >>> print(summary_text([("steps", "1-2 of 2"), ("loss first / last", "4.1 / 3.9")]))
    summary
      steps              1-2 of 2
      loss first / last  4.1 / 3.9
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from ckpt_wrapper.table import format_table

__all__ = ["MiB", "Progress", "peak_memory", "summary_text"]

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

    def update(self, step: int, loss: float, tokens_per_s: float, peak: int) -> None:
        """Show ``step``'s loss, throughput and peak memory."""
        text = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  peak {peak / MiB:,.0f} MiB"
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


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak on GPUs, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def summary_text(rows: list[tuple[str, str]]) -> str:
    """``summary`` and then the rows as a two-column table."""
    return "summary\n" + format_table(rows, indent="  ")
