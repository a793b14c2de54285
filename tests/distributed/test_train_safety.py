"""The training driver cannot corrupt a run, says each mistake once, and reports what it measured.

The driver (scripts/launch/train_driver.py) on 2 gloo ranks: in the session's rank pool, where a check
needs only the driver's own behaviour (``driver_cells.run_driver``), and as real torchrun launches where
it needs the launcher's (signals to the launch or to one rank, torchrun's report of a rank's exit status,
``--parallel accelerate``); plus in-process checks of the checkpoint files. Each test names the previous
behaviour it catches: every one of them failed before the driver validated its folder, stored run.json,
wrote steps atomically, handled signals and printed errors on rank 0 alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import driver_cells
from pool import _free_port, torchrun

pytestmark = pytest.mark.timeout(300)

DRIVER = str(Path(__file__).resolve().parents[2] / "scripts" / "launch" / "train_driver.py")
TINY = ["--n-layer", "2", "--d-model", "32", "--n-head", "4", "--seq-len", "16", "--vocab-size", "64",
        "--batch", "2", "--progress", "lines"]


def _explain(result: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> str:
    code, out, err = result if isinstance(result, tuple) else (result.returncode, result.stdout, result.stderr)
    return f"exit status {code}\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-8000:]}"


def _explain_ranks(results: list[tuple[int, str, str]]) -> str:
    return "\n".join(f"=== rank {rank}: {_explain(result)}" for rank, result in enumerate(results))


def _no_rank_tracebacks(out: str, err: str) -> None:
    """The ranks printed no traceback (torchrun's own report of a failed launch is not theirs)."""
    assert "[rank0]:" not in out + err and "[rank1]:" not in out + err, _explain((0, out, err))
    assert "KeyboardInterrupt" not in out + err, _explain((0, out, err))


def _in_pool(pool, *flags: str) -> list[tuple[int, str, str]]:
    """The driver with ``TINY`` and ``flags`` on every rank of ``pool``: (status, stdout, stderr) per rank."""
    return pool.run(driver_cells.run_driver, [*TINY, *flags])


@pytest.fixture(scope="module")
def saved(rank_pools, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Steps 1-4 of a 5-step run without checkpointing, saving every step and keeping the last 2."""
    root = tmp_path_factory.mktemp("saved")
    metrics = root / "metrics.json"
    results = _in_pool(rank_pools.get(2), "--ac", "none", "--steps", "5", "--stop-after", "4", "--save-every", "1",
                       "--keep-last", "2", "--checkpoint-dir", str(root / "ckpt"), "--metrics-out", str(metrics))
    assert [status for status, _, _ in results] == [0, 0], _explain_ranks(results)
    return {"dir": root / "ckpt", **json.loads(metrics.read_text()), "stdout": results[0][1]}


def _copy(saved: dict, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(saved["dir"], target)
    return target


@pytest.mark.slow
def test_keep_last_leaves_the_newest_steps_each_complete(saved: dict) -> None:
    """``--keep-last 2`` after saves at steps 1-4 leaves steps 3 and 4, each with run.json and every rank's file.

    Caught: every checkpoint was kept forever (and the flag did not exist).
    """
    steps = sorted(p.name for p in saved["dir"].iterdir())
    assert steps == ["step-00000003", "step-00000004"], steps
    for step in steps:
        names = {p.name for p in (saved["dir"] / step).iterdir()}
        assert {".metadata", "run.json", "train_state.rank0.pt", "train_state.rank1.pt"} <= names, names
    run = json.loads((saved["dir"] / steps[-1] / "run.json").read_text())
    assert run["identity"]["n_layer"] == 2 and run["identity"]["world_size"] == 2 and run["step"] == 4, run


@pytest.mark.slow
def test_truncated_latest_step_is_named_and_the_previous_one_resumes_bitwise(pool2, saved: dict, tmp_path: Path) -> None:
    """A truncated ``.distcp`` in step 4: one warning naming the file, resume from step 3, step 4's loss
    bitwise that of the run that saved; the damaged step is replaced. The resumed run wraps every block
    (``--ac full``), and its summary shows less activation memory than the saving run's (``--ac none``).

    Caught: PyTorch's error without the path and no fallback; on CPU a "peak memory" (the process's
    resident set) that was the same in every mode.
    """
    ckpt = _copy(saved, tmp_path)
    damaged = ckpt / "step-00000004" / "__1_0.distcp"
    with damaged.open("r+b") as file:
        file.truncate(1000)
    metrics = tmp_path / "resumed.json"
    results = _in_pool(pool2, "--ac", "full", "--steps", "5", "--save-every", "1", "--keep-last", "2",
                       "--checkpoint-dir", str(ckpt), "--metrics-out", str(metrics))
    assert [status for status, _, _ in results] == [0, 0], _explain_ranks(results)
    out = "".join(stdout for _, stdout, _ in results)  # what torchrun would print: every rank's stdout
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(damaged) in warning[0] and "truncated" in warning[0], _explain_ranks(results)
    resumed = json.loads(metrics.read_text())
    assert resumed["resumed_from"] == 3 and resumed["first_step"] == 4, resumed
    assert resumed["losses"]["4"] == saved["losses"]["4"], (resumed["losses"], saved["losses"])  # exact floats
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000005"]
    assert damaged.stat().st_size > 1000  # rewritten whole
    assert "activation memory (max over ranks)" in out and "resident" not in out
    assert 0 < resumed["activation_memory_bytes"] < saved["activation_memory_bytes"] / 2, (resumed, saved)
    assert resumed["peak_memory_bytes"] is None  # CPU: no CUDA peak to report


_MISTAKES = {
    "flag": (["--stpes", "3"], "did you mean --steps?"),
    "data": (["--data", "{tmp}/nonexistent.txt", "--vocab-size", "256"], "does not exist"),
    "file": (["--checkpoint-dir", "{tmp}/not-a-folder"], "is a file"),
    "foreign": (["--n-layer", "4", "--checkpoint-dir", "{saved}"], "--n-layer 2 there, 4 here"),
}
"""Mistake -> (flags, what its one error line says); ``{tmp}`` and ``{saved}`` are filled in by the test."""


def _one_error_line(name: str, text: str, expected: str, explain: str) -> None:
    errors = [line for line in text.splitlines() if line.startswith("train_driver.py: error:")]
    assert len(errors) == 1 and expected in errors[0], f"{name}: {explain}"
    assert "usage:" not in text and "step 1/" not in text, f"{name}: {explain}"


@pytest.mark.slow
def test_each_mistake_is_one_line_on_rank_zero_before_any_training(pool2, saved: dict, tmp_path: Path) -> None:
    """A mistyped flag, a missing ``--data`` file, a ``--checkpoint-dir`` that is a file, and a folder of
    another model (4 layers against the saved 2): each prints one ``error:`` line, on rank 0 alone, without
    the usage text or a rank traceback; every rank exits with status 2 before a step; nothing is written.

    Every mistake runs in the pool (each rank's status and streams are seen apart); the mistyped flag also
    runs under torchrun, for the launcher's view of the same path (``main`` handles every mistake alike):
    torchrun reports exit status 2, and the ranks it stops print no traceback.

    Caught: the usage text once per rank (about 77 lines), the FileNotFoundError buried in tracebacks, a
    NotADirectoryError after every step had trained, and a 4-layer checkpoint resumed silently into a
    2-layer model that then wrote its own steps into the other run's folder.
    """
    (tmp_path / "not-a-folder").write_text("")
    before = {p.name: p.stat().st_mtime_ns for p in saved["dir"].rglob("*")}
    for name, (flags, expected) in _MISTAKES.items():
        flags = [flag.format(tmp=tmp_path, saved=saved["dir"]) for flag in flags]
        results = _in_pool(pool2, *flags, "--steps", "3")
        explain = _explain_ranks(results)
        assert [status for status, _, _ in results] == [2, 2], f"{name}: {explain}"
        text = "".join(out + err for _, out, err in results)  # every rank's streams, as torchrun prints them
        _one_error_line(name, text, expected, explain)
        assert "train_driver.py: error:" in results[0][2], f"{name}: the error is rank 0's\n{explain}"
        assert "Traceback" not in text, f"{name}: {explain}"
        _no_rank_tracebacks(text, "")
        if name == "foreign":
            assert "--no-resume" in results[0][2] and "another --checkpoint-dir" in results[0][2], explain
    assert {p.name: p.stat().st_mtime_ns for p in saved["dir"].rglob("*")} == before  # the other run's folder

    flags, expected = _MISTAKES["flag"]
    result = torchrun(2, DRIVER, *TINY, *flags, "--steps", "3")
    _one_error_line("flag (torchrun)", result.stdout + result.stderr, expected, _explain(result))
    assert "exitcode  : 2" in result.stdout + result.stderr, _explain(result)
    _no_rank_tracebacks(result.stdout, result.stderr)


def _launch_and_signal(flags: list[str], sig: signal.Signals, *, only_rank: int | None = None,
                       after: str = "step 2/") -> tuple[int, str, str]:
    """Start the driver under torchrun; once rank 0 logs ``after``, send ``sig`` to the launch's whole
    process group (as Ctrl-C does) or to one rank's process alone (``only_rank``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), DRIVER, *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(after):
                break
        if only_rank is None:
            os.killpg(process.pid, sig)
        else:
            ranks = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            target = [int(pid) for pid in ranks
                      if f"RANK={only_rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
            assert len(target) == 1, ranks
            os.kill(target[0], sig)
        out, err = process.communicate(timeout=180)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, "".join(lines) + out, err


def _stopped_line(out: str, name: str) -> tuple[int, Path]:
    stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and stopped[0].startswith(f"stopped by {name} after step "), out
    step = int(stopped[0].split("after step ", 1)[1].split(":", 1)[0])
    path = Path(stopped[0].split("saved ", 1)[1].split(";", 1)[0])
    return step, path


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_step_and_says_where_in_one_line(tmp_path: Path) -> None:
    """SIGINT to the launch's process group (Ctrl-C) after step 2: the ranks finish their step, save it and
    leave; rank 0 prints one line naming the checkpoint; no rank traceback, no note blaming a block. With
    ``--ac offload`` on CPU, the no-op warning comes once (rank 0) and names the model's call of the block.

    Caught: 154 lines of KeyboardInterrupt tracebacks with "raised while recomputing block 'layers.1'",
    nothing saved; the offload warning once per rank, pointing at torch/nn/modules/module.py.
    """
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.json"
    code, out, err = _launch_and_signal([*TINY, "--ac", "offload", "--steps", "500", "--checkpoint-dir", str(ckpt),
                                         "--metrics-out", str(metrics)], signal.SIGINT)
    step, path = _stopped_line(out, "SIGINT")
    assert step >= 2 and path == ckpt / f"step-{step:08d}", out
    assert Checkpoints(ckpt, 0, 2).problem(path) is None, sorted(p.name for p in path.iterdir())
    assert json.loads(metrics.read_text())["stopped_by"] == "SIGINT"
    _no_rank_tracebacks(out, err)
    assert "raised while" not in out + err and "summary" not in out, _explain((code, out, err))
    offload = [line for line in err.splitlines() if "offload of a block in host memory" in line]
    assert len(offload) == 1 and "ckpt_wrapper/testing/models.py:" in offload[0], err[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    """SIGTERM (what SLURM sends before preemption) to rank 1 alone: rank 0, never signalled, learns it from
    the step's all-reduce; both save the same step and exit with status 143; the step resumes cleanly.

    Caught: SIGTERM killed the rank mid-step, nothing was saved, and the other rank was left to time out.
    """
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints

    ckpt = tmp_path / "ckpt"
    code, out, err = _launch_and_signal([*TINY, "--steps", "500", "--checkpoint-dir", str(ckpt)], signal.SIGTERM,
                                        only_rank=1)
    step, path = _stopped_line(out, "SIGTERM")
    assert Checkpoints(ckpt, 0, 2).problem(path) is None and sorted(p.name for p in ckpt.iterdir()) == [path.name]
    assert "exitcode  : 143" in err, _explain((code, out, err))
    _no_rank_tracebacks(out, err)


@pytest.mark.slow
def test_summary_reports_the_mixed_precision_accelerate_runs_with(tmp_path: Path) -> None:
    """``--parallel accelerate`` with accelerate configured for bf16 (``ACCELERATE_MIXED_PRECISION``, what
    ``accelerate launch`` sets from ``mixed_precision: bf16``): the summary says bf16.

    Caught: "mixed precision: no" whatever accelerate ran with (the row read --param-dtype only).
    """
    pytest.importorskip("accelerate")
    result = torchrun(2, DRIVER, *TINY, "--parallel", "accelerate", "--steps", "1",
                      env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert result.returncode == 0, _explain(result)
    row = next(line for line in result.stdout.splitlines() if "mixed precision / compile" in line)
    assert "bf16 (accelerate)" in row, row


# --- in process: the checkpoint files ---------------------------------------------------------------------


def test_a_damaged_step_is_named_file_by_file(saved: dict, tmp_path: Path) -> None:
    """``problem`` names the missing per-rank file (not "fewer ranks"), a missing ``.metadata``, a missing
    ``.distcp``; an intact step has none.

    Caught: a missing per-rank file blamed on a checkpoint "saved by fewer ranks"; a step without metadata
    skipped without a word.
    """
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints

    ckpt = _copy(saved, tmp_path)
    checkpoints = Checkpoints(ckpt, rank=0, world=2)
    step3, step4 = ckpt / "step-00000003", ckpt / "step-00000004"
    assert checkpoints.problem(step4) is None
    (step4 / "train_state.rank1.pt").unlink()
    assert checkpoints.problem(step4) == f"{step4 / 'train_state.rank1.pt'} is missing (rank 1's RNG state and data position)"
    (step3 / "__0_0.distcp").unlink()
    assert checkpoints.problem(step3) == f"{step3 / '__0_0.distcp'} is missing"
    (step3 / ".metadata").unlink()
    assert ".metadata is missing" in checkpoints.problem(step3)


def test_an_interrupted_save_leaves_no_step_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half-way (here DCP raising after it started writing) leaves no ``step-N`` folder, so a
    partial step is never taken for the latest; the next start clears the partial folder.

    Caught: the step folder was created first and filled in place, so a crash left a half-written step
    where the resume looks.
    """
    import torch.distributed.checkpoint as dcp

    from ckpt_wrapper.testing.models import GPT, GPTConfig
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints

    model = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8, vocab_size=32))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = Checkpoints(tmp_path, rank=0, world=1)
    checkpoints.save(1, model, optimizer, torch.device("cpu"))

    def broken(state, checkpoint_id):  # noqa: ANN001
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(2, model, optimizer, torch.device("cpu"))
    assert [step for step, _ in checkpoints.steps()] == [1]
    assert not (tmp_path / "step-00000002").exists()
    checkpoints.clean_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_checkpoint_folder_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder under a file, and one that cannot be written, are refused with the reason; a missing one is
    created.

    Caught: NotADirectoryError or PermissionError at the first save, after every step had trained.
    """
    from ckpt_wrapper.tools.train_driver.checkpoints import check_folder

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="lies under .*file, which is a file"):
        check_folder(tmp_path / "file" / "ckpt", rank=0)
    check_folder(tmp_path / "new" / "ckpt", rank=0)
    assert (tmp_path / "new" / "ckpt").is_dir() and not list((tmp_path / "new" / "ckpt").iterdir())

    def refuse(self, data):  # noqa: ANN001 (what a read-only folder does, even for root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(ValueError, match="cannot be written \\(Permission denied\\)"):
        check_folder(tmp_path / "new" / "ckpt", rank=0)


def test_ctrl_c_inside_a_recompute_gets_no_note_blaming_the_block() -> None:
    """A KeyboardInterrupt raised while a checkpointed block recomputes carries no ckpt_wrapper note.

    Caught: Ctrl-C tracebacks ended with "raised while recomputing block 'layers.1'", as if the block failed.
    """
    from torch import nn

    from ckpt_wrapper import checkpoint_wrapper

    class Interrupted(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            type(self).calls += 1
            if type(self).calls == 2:  # the recompute in backward
                raise KeyboardInterrupt
            return super().forward(x)

    block = checkpoint_wrapper(Interrupted(4, 4))
    out = block(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(KeyboardInterrupt) as caught:
        out.sum().backward()
    assert not getattr(caught.value, "__notes__", []), caught.value.__notes__


def test_a_folder_of_another_run_is_refused_saying_what_differs(saved: dict, tmp_path: Path) -> None:
    """Another world size, another model, or steps without run.json (an older driver's) are refused, naming
    the step and the values; the same run is accepted.

    Caught: a 4-layer checkpoint loaded silently into a 2-layer model (DCP ignores keys the model lacks); a
    missing per-rank file reported as a checkpoint of "fewer ranks".
    """
    import argparse

    from ckpt_wrapper.tools.train_driver.args import build_parser
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints, run_identity

    ckpt = _copy(saved, tmp_path)

    def identity(*flags: str, world: int = 2) -> dict:
        args: argparse.Namespace = build_parser().parse_args([*TINY, *flags])
        return run_identity(args, world)

    Checkpoints(ckpt, 0, 2, identity()).refuse_foreign()  # the run that saved it
    Checkpoints(ckpt, 0, 2, identity("--ac", "offload", "--parallel", "ddp", "--lr", "1e-3")).refuse_foreign()
    with pytest.raises(ValueError, match="ranks 2 there, 4 here"):
        Checkpoints(ckpt, 0, 4, identity(world=4)).refuse_foreign()
    with pytest.raises(ValueError, match="--d-model 32 there, 64 here; --seed 0 there, 1 here"):
        Checkpoints(ckpt, 0, 2, identity("--d-model", "64", "--seed", "1")).refuse_foreign()
    (ckpt / "step-00000004" / "run.json").unlink()
    with pytest.raises(ValueError, match="step-00000004 has no run.json .*--no-resume"):
        Checkpoints(ckpt, 0, 2, identity()).refuse_foreign()


def test_no_resume_replaces_the_earlier_steps_and_keep_last_spares_the_new_one(tmp_path: Path) -> None:
    """``--no-resume``'s first save deletes the earlier steps (even higher-numbered ones); ``keep_last`` never
    deletes the step just saved.

    Caught: a fresh run's step 2 next to an earlier run's step 40, so the next resume took the earlier run's.
    """
    from ckpt_wrapper.testing.models import GPT, GPTConfig
    from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints

    model = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8, vocab_size=32))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = Checkpoints(tmp_path, rank=0, world=1)
    cpu = torch.device("cpu")
    for step in (39, 40):
        checkpoints.save(step, model, optimizer, cpu)
    checkpoints.save(1, model, optimizer, cpu, keep_last=2)  # keep_last alone: 40 and the new 1 stay
    assert [step for step, _ in checkpoints.steps()] == [1, 40]
    checkpoints.save(2, model, optimizer, cpu, keep_last=3, discard_others=True)
    assert [step for step, _ in checkpoints.steps()] == [2]
