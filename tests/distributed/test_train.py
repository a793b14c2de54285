"""scripts/launch/ on 2 gloo ranks: the example train.py, the driver's resume and parallelisms, the
launchers, the one flag vocabulary, and the collective counts docs/distributed.md publishes.

The example, the launchers and the documented example run under torchrun; the driver's runs, which need
nothing of the launcher, run in the session's rank pool (``driver_cells.run_driver``: the driver's ``main``
on each rank, in the pool's group). The driver's resume test chains three runs off one checkpoint
directory and compares their losses with an uninterrupted run: bitwise on CPU, with dropout on (so each
rank's RNG state must be restored), and with the last run wrapping blocks differently from the runs that
saved (names do not depend on wrapping).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import driver_cells
from ckpt_wrapper.tools.train_driver.args import build_parser, check_args
from pool import torchrun

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "scripts" / "launch"
TRAIN = str(LAUNCH / "train.py")  # the example to copy
DRIVER = str(LAUNCH / "train_driver.py")  # every mode
SHAPE = ["--n-layer", "3", "--d-model", "32", "--n-head", "4", "--seq-len", "16", "--vocab-size", "64", "--batch", "2"]
TINY = [*SHAPE, "--progress", "lines"]


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    # torchrun forwards each rank's stderr (tracebacks prefixed [rankN]); show both streams.
    return f"exit status {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-12000:]}"


def _train(pool, tmp_path: Path, name: str, *flags: str) -> dict:
    """The driver with ``TINY`` and ``flags`` on the pool's 2 ranks: its metrics, and the ranks' streams
    joined as torchrun prints them."""
    metrics = tmp_path / f"{name}.json"
    results = pool.run(driver_cells.run_driver, [*TINY, *flags, "--metrics-out", str(metrics)])
    explain = "\n".join(f"=== rank {rank}: exit status {status}\n--- stdout ---\n{out[-8000:]}\n--- stderr ---\n"
                        f"{err[-12000:]}" for rank, (status, out, err) in enumerate(results))
    assert [status for status, _, _ in results] == [0, 0], f"{name}: {explain}"
    assert [out.count("summary") for _, out, _ in results] == [1, 0], f"{name}: rank 0 alone prints the summary\n{explain}"
    return {**json.loads(metrics.read_text()), "stdout": "".join(out for _, out, _ in results),
            "stderr": "".join(err for _, _, err in results)}


@pytest.mark.slow
def test_stopped_and_resumed_runs_give_the_uninterrupted_losses_bitwise(pool2, tmp_path: Path) -> None:
    """Steps 1-2, then 3-4 (same wrapping), then 5-6 (other blocks, offload instead of recompute) equal 1-6.

    A failure means a resumed run diverges: model or optimizer state, a rank's RNG state (dropout) or the
    data position was not restored, or a checkpoint written with one wrapping does not load into another.
    """
    common = ["--parallel", "fsdp2", "--dropout", "0.1", "--steps", "6"]
    whole = _train(pool2, tmp_path, "whole", *common, "--ac", "full")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first = _train(pool2, tmp_path, "first", *common, "--ac", "full", *ckpt, "--stop-after", "2")
    second = _train(pool2, tmp_path, "second", *common, "--ac", "full", *ckpt, "--stop-after", "4")
    third = _train(pool2, tmp_path, "third", *common, "--ac", "offload", "--offload-cpu-copy", "--every", "2", *ckpt)

    assert (first["first_step"], second["first_step"], third["first_step"]) == (1, 3, 5)
    assert (second["resumed_from"], third["resumed_from"]) == (2, 4)
    assert first["wrapped"] == ["layers.0", "layers.1", "layers.2"] and third["wrapped"] == ["layers.0", "layers.2"]
    assert {**first["losses"], **second["losses"], **third["losses"]} == whole["losses"]  # exact floats
    assert len(set(whole["losses"].values())) == 6  # the model trains: losses are not a constant
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ("--parallel", "fsdp1", "--ac-order", "after", "--every", "2", "--progress", "bar"),
    ("--parallel", "ddp", "--ac", "full+offload", "--offload-cpu-copy", "--param-dtype", "bf16"),
    ("--parallel", "fsdp2", "--model", "llama", "--sharding-strategy", "SHARD_GRAD_OP"),
], ids=["fsdp1-after-every2-bar", "ddp-full+offload-bf16", "fsdp2-llama"])
def test_training_runs_under_each_parallelism(pool2, tmp_path: Path, flags: tuple[str, ...]) -> None:
    """Two steps on 2 ranks: the summary table, the progress display, and losses of the GPT agree across recipes.

    A failure means a documented flag combination does not train.
    """
    if "llama" in flags:
        pytest.importorskip("transformers")
    run = _train(pool2, tmp_path, "run", *flags, "--steps", "2")
    for row in ("parallelism", "checkpointing", "tokens/s (global)", "activation memory (max over ranks)"):
        assert row in run["stdout"], run["stdout"]
    assert run["tokens_per_s"] > 0 and run["activation_memory_bytes"] > 0
    if "bar" in flags:  # tqdm, or one updating line, on rank 0's stderr
        assert "tok/s" in run["stderr"], run["stderr"][-2000:]
    if "--model" not in flags:  # the same seeded GPT and data: the first loss does not depend on the recipe
        reference = 4.1588  # ln(64): a fresh model's loss on 64 equally likely tokens, to 2 decimals
        assert abs(run["losses"]["1"] - reference) < 0.3, run["losses"]


_EAGER_THEN_COMPILED = """
import json, sys
from ckpt_wrapper.tools.train_driver import main
eager, compiled = json.loads(sys.argv[1])
status = main(eager)
print("=== compiled", flush=True)
sys.exit(status or main(compiled))
"""


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path: Path) -> None:
    """``--compile`` (each checkpointed block compiled in place; aot_eager to keep CI fast) matches eager.

    One process, no launcher (``--parallel none``: a one-rank group of the driver's own), running the eager
    and then the compiled run, each making and shutting down its group. A failure means compiling wrapped
    blocks changes the numbers or cannot run.
    """
    common = [*TINY, "--parallel", "none", "--steps", "2"]
    eager_flags = [*common, "--metrics-out", str(tmp_path / "eager.json")]
    compiled_flags = [*common, "--compile", "--compile-backend", "aot_eager", "--metrics-out",
                      str(tmp_path / "compiled.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _EAGER_THEN_COMPILED, json.dumps([eager_flags, compiled_flags])],
                            capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, _explain(result)
    eager_out, compiled_out = result.stdout.split("=== compiled\n")
    assert eager_out.count("summary") == 1 and compiled_out.count("summary") == 1, _explain(result)
    assert "/ aot_eager" in compiled_out and "/ aot_eager" not in eager_out, _explain(result)
    eager, compiled = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("eager", "compiled"))
    for step, loss in eager["losses"].items():
        assert compiled["losses"][step] == pytest.approx(loss, rel=1e-5), (compiled["losses"], eager["losses"])


@pytest.mark.slow
def test_run_sh_driver_entry_and_text_data(tmp_path: Path) -> None:
    """``scripts/launch/run.sh driver`` launches the driver on 2 ranks (the CPU default), here on a local text file.

    A failure means the launcher's driver entry or byte-level text data is broken.
    """
    text = tmp_path / "corpus.txt"
    text.write_text("Activation checkpointing trades compute for memory. " * 40)
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(_port())}
    result = subprocess.run(["bash", str(LAUNCH / "run.sh"), "driver", *TINY, "--vocab-size", "256", "--steps", "2",
                             "--parallel", "ddp", "--data", str(text)],
                            capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, _explain(result)
    assert f"data: {text} (" in result.stdout and "2 rank(s)" in result.stdout, _explain(result)


@pytest.mark.slow
def test_distributed_doc_collective_counts_hold_on_two_ranks(tmp_path: Path) -> None:
    """docs/distributed.md's measurement, run under torchrun on 2 ranks: checkpointing adds no collective.

    test_docs runs the example in one process, where FSDP skips collectives; this runs it where the table's
    numbers come from. A failure means checkpointing now costs communication in some nesting order, or the
    documented table is stale.
    """
    import re

    page = (REPO_ROOT / "docs" / "distributed.md").read_text()
    example = tmp_path / "collectives.py"
    example.write_text(re.search(r"^```python\n(.*?)^```", page, re.DOTALL | re.MULTILINE).group(1))
    result = torchrun(2, str(example))
    assert result.returncode == 0, _explain(result)
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if "{" in line}
    expected = {  # the table in docs/distributed.md
        "fsdp2 reshard_after_forward=True, checkpoint before sharding": ("'c10d::_allgather_base_': 10", "'c10d::_reduce_scatter_base_': 5"),
        "fsdp2 reshard_after_forward=False, checkpoint before sharding": ("'c10d::_allgather_base_': 5",),
        "fsdp1 FULL_SHARD use_orig_params=False, checkpoint after sharding": ("'c10d::allgather_': 9",),
        "fsdp1 SHARD_GRAD_OP use_orig_params=False, checkpoint after sharding": ("'c10d::allgather_': 5",),
        "ddp find_unused_parameters=False, checkpoint before sharding": ("'c10d::allreduce_': 1",),
    }
    for recipe, counts in expected.items():
        assert recipe in lines and all(c in lines[recipe] for c in counts), f"{recipe}: {lines.get(recipe)}\n{_explain(result)}"


def _port() -> int:
    from pool import _free_port

    return _free_port()


@pytest.mark.slow
def test_example_trains_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The example (train.py) on 2 ranks: steps 1-2, then a rerun with --steps 4 resumes at 3 and prints the
    losses of an uninterrupted 1-4 run (no dropout, a constant learning rate, data a function of the step).

    A failure means the example users copy does not train, does not shard its checkpointed blocks, or does
    not resume from its DCP checkpoint.
    """
    def example(*flags: str) -> tuple[list[str], str]:
        result = torchrun(2, TRAIN, *SHAPE, *flags)
        assert result.returncode == 0, _explain(result)
        assert result.stdout.count("summary") == 1, _explain(result)
        return [line.split("(")[0] for line in result.stdout.splitlines() if line.startswith("step ")], result.stdout

    whole, _ = example("--steps", "4")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first, _ = example("--steps", "2", *ckpt)
    second, out = example("--steps", "4", *ckpt)
    assert [line.replace("/2 ", "/4 ") for line in first] + second == whole, (first, second, whole)
    assert "blocks checkpointed, then sharded  3 (Block)" in out, out
    assert "steps                              3-4" in out, out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000002", "step-000004"]


# --- fast checks: no ranks ---------------------------------------------------------------------------------


def test_launchers_build_the_torchrun_command(tmp_path: Path) -> None:
    """run.sh keeps the demo as its default entry; ENTRY or a first argument picks train.py or the driver; the
    SLURM script gives every node its own NODE_RANK and the first node as rendezvous host.

    Runs the scripts with ``DRY_RUN=1`` and stand-ins for ``srun`` and ``scontrol``. A failure means
    ``make demo`` or a multi-node job would launch the wrong thing.
    """
    def dry(*args: str, **env: str) -> str:
        full = {**{k: v for k, v in os.environ.items() if k != "ENTRY"}, "DRY_RUN": "1", "PYTHON": "python3", **env}
        result = subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30, env=full, cwd=REPO_ROOT)
        assert result.returncode == 0, _explain(result)
        return result.stdout

    run_sh = str(LAUNCH / "run.sh")
    assert dry(run_sh, "--steps", "3").split()[-4:] == ["ckpt_wrapper", "demo", "--steps", "3"]
    assert "--nproc_per_node 2 --nnodes 1 --node_rank 0" in dry(run_sh)
    assert dry(run_sh, "train", "--steps", "3").split()[-3:] == [TRAIN, "--steps", "3"]
    assert dry(run_sh, "--steps", "3", ENTRY="train").split()[-3:] == [TRAIN, "--steps", "3"]
    assert dry(run_sh, "driver", "--steps", "3").split()[-3:] == [DRIVER, "--steps", "3"]
    assert dry(run_sh, "parity", "--steps", "3").split()[-4:] == ["ckpt_wrapper", "parity", "--steps", "3"]

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake_bin / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    slurm = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO_ROOT),
             "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
             "SLURM_GPUS_ON_NODE": "4"}
    out = dry(str(LAUNCH / "slurm.sbatch"), "--steps", "5", **slurm)
    assert "--nproc_per_node 4 --nnodes 2 --node_rank 1 --master_addr node-a --master_port 20007" in out, out
    assert out.split()[-3:] == [TRAIN, "--steps", "5"], out
    out = dry(str(LAUNCH / "slurm.sbatch"), "--steps", "5", ENTRY="driver", **slurm)
    assert out.split()[-3:] == [DRIVER, "--steps", "5"], out


def _example_module():
    spec = importlib.util.spec_from_file_location("ckpt_wrapper_train_example", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_combinations_that_cannot_work_are_usage_errors() -> None:
    """Impossible flag combinations are refused before any rank trains, saying what to change."""
    parser = build_parser()
    cases = {
        ("--stop-after", "2"): "--checkpoint-dir",
        ("--parallel", "none"): "one process",
        ("--parallel", "fsdp2", "--sharding-strategy", "HYBRID_SHARD"): "an FSDP1 strategy: use --parallel fsdp1",
        ("--data", "x.txt", "--vocab-size", "100"): "--vocab-size must be >= 256",
        ("--ac-order", "after"): "--parallel fsdp1, ddp or none",
        ("--stop-after", "30", "--checkpoint-dir", "c"): "within 1..--steps",
        ("--parallel", "ddp", "--reduce-dtype", "fp32"): "drop --reduce-dtype",
        ("--parallel", "accelerate", "--ac", "plan"): "not wired to --parallel accelerate",
    }
    for flags, expected in cases.items():
        with pytest.raises(ValueError, match=expected.replace(".", r"\.").replace("(", r"\(")):
            check_args(parser.parse_args(list(flags)), world=2)
    assert all(action.help for action in parser._actions), "every flag has help"
    assert all(action.help for action in _example_parser()._actions), "every flag of the example has help"


def _example_parser() -> argparse.ArgumentParser:
    """The example's parser, captured from its parse_args (the example builds it inline, as users would)."""
    example, captured = _example_module(), []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured.append(self)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        example.parse_args([])
    return captured[0]


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, program, flags) for every train.py, train_driver.py, slurm.sbatch, run.sh train/driver and
    ckpt_wrapper parity/demo command in the docs' and README's bash blocks and the scripts' docstrings.

    ``program`` is ``train`` (the example), ``driver``, ``parity`` or ``demo``.
    """
    import re
    import shlex

    from ckpt_wrapper.testing import command
    from ckpt_wrapper.tools import demo, train_driver

    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    texts = [(p.name, block) for p in pages for block in re.findall(r"^```bash\n(.*?)^```", p.read_text(), re.S | re.M)]
    # In docstrings the commands are the indented lines; in the shell scripts, the indented comment lines.
    docstrings = [("train.py", _example_module().__doc__), ("train_driver", train_driver.__doc__),
                  ("parity command", command.__doc__), ("demo", demo.__doc__)]
    texts += [(name, "\n".join(ln for ln in doc.splitlines() if ln.startswith("    "))) for name, doc in docstrings]
    for script in (LAUNCH / "run.sh", LAUNCH / "slurm.sbatch"):
        lines = script.read_text().splitlines()
        texts.append((script.name, "\n".join(ln[1:] for ln in lines if ln.startswith("#   "))))
    found = []
    for name, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+\(.*\)\s*$", "", line.split(" #", 1)[0])  # a trailing (comment) in run.sh's list
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            entries = ("ENTRY=train", "ENTRY=driver", "ENTRY=demo")
            entry = next((w.split("=", 1)[1] for w in words if w in entries), None)
            for i, word in enumerate(words):
                if word.endswith("train_driver.py"):
                    found.append((name, "driver", words[i + 1:]))
                elif word.endswith(("train.py", "slurm.sbatch")):
                    found.append((name, entry or "train", words[i + 1:]))
                elif word.endswith("run.sh") and words[i + 1: i + 2] in (["train"], ["driver"], ["parity"], ["demo"]):
                    found.append((name, words[i + 1], words[i + 2:]))
                elif word.endswith("run.sh"):  # no entry argument: ENTRY, else the demo
                    found.append((name, entry or "demo", words[i + 1:]))
                elif word == "ckpt_wrapper" and words[i + 1: i + 2] in (["parity"], ["demo"]):
                    found.append((name, words[i + 1], words[i + 2:]))
                else:
                    continue
                break
    return found


def _parse(program: str, flags: list[str]) -> argparse.Namespace:
    """Parse ``flags`` as ``program`` does, and run its checks."""
    if program == "train":
        return _example_module().parse_args(flags)
    if program == "driver":
        args = build_parser().parse_args(flags)
        check_args(args, world=1 if args.parallel == "none" else 2)
        return args
    from ckpt_wrapper.tools.cli import build_parser as cli_parser

    args = cli_parser().parse_args([program, *flags])
    args._module.options_from_args(args)
    return args


def test_documented_commands_are_valid_and_use_no_old_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    """Every train.py, driver, parity and demo command line in README.md, docs/ and the scripts' docstrings
    parses, passes the flag checks and uses no deprecated spelling.

    A failure means a documented command uses a flag that was renamed or a combination that is refused.
    """
    commands = _documented_commands()
    programs = {program for _, program, _ in commands}
    assert len(commands) >= 15 and programs == {"train", "driver", "parity", "demo"}, commands  # the extraction works
    for page, program, flags in commands:
        try:
            _parse(program, flags)
        except (SystemExit, ValueError) as error:
            raise AssertionError(f"{page}: {program} {' '.join(flags)}: {error}\n{capsys.readouterr().err}") from error
        note = capsys.readouterr().err
        assert "deprecated" not in note, f"{page}: {program} {' '.join(flags)}: {note}"


def test_train_demo_and_parity_speak_one_flag_vocabulary(capsys: pytest.CaptureFixture[str]) -> None:
    """The same concept has the same flag in every command, and the old spellings still work with a note.

    A failure means a command grew its own spelling of a shared flag, or an old spelling stopped working.
    """
    from ckpt_wrapper.tools.cli import build_parser as cli_parser
    from ckpt_wrapper.tools.flags import recipe_from_args

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}

    cli = cli_parser()
    subparsers = next(a for a in cli._actions if isinstance(a, argparse._SubParsersAction)).choices
    example, driver, demo, parity = _example_parser(), build_parser(), subparsers["demo"], subparsers["parity"]
    shape = {"--n-layer", "--d-model", "--n-head", "--seq-len", "--vocab-size"}
    training = {"--steps", "--batch", "--lr", "--seed", "--device"}
    assert shape | training | {"--model", "--blocks", "--checkpoint-dir"} <= options(example) <= options(driver)
    assert shape | training <= options(demo)
    sharding = {"--parallel", "--ac-order", "--sharding-strategy", "--use-orig-params", "--fsdp1-cpu-offload",
                "--find-unused", "--param-dtype", "--reduce-dtype"}
    assert sharding | {"--steps", "--device", "--blocks", "--ac", "--model", "--rtol", "--atol"} <= options(parity)
    assert sharding | {"--ac"} <= options(driver) and {"--rtol", "--atol"} <= options(demo)

    new = ["--parallel", "fsdp1", "--ac-order", "after", "--sharding-strategy", "SHARD_GRAD_OP",
           "--param-dtype", "bf16", "--reduce-dtype", "fp32"]
    old = ["--shard", "fsdp", "--order", "after", "--strategy", "SHARD_GRAD_OP", "--mixed-precision", "bf16"]
    for parser in (driver, parity):
        assert recipe_from_args(parser.parse_args(old)) == recipe_from_args(parser.parse_args(new))
    notes = capsys.readouterr().err
    for spelling in ("--shard", "--order", "--strategy", "--mixed-precision", "--parallel fsdp"):
        assert f"note: {spelling} is deprecated" in notes, notes
    assert recipe_from_args(driver.parse_args(["--no-reshard"])).reshard_after_forward is False
    assert driver.parse_args(["--parallel", "fsdp"]).parallel == "fsdp1"


def test_the_example_refuses_a_checkpoint_of_another_model_and_skips_torn_steps(tmp_path: Path, capsys) -> None:
    """The example resumed a 4-layer checkpoint into a 2-layer model without a word (DCP loads the keys the
    model has) and took any ``step-*`` folder for a checkpoint, a save cut short included. It now stores its
    model's flags with each step, refuses another model in one line with exit status 2 before any process
    group starts, and resumes only from steps whose save completed."""
    example = _example_module()
    args = example.parse_args(["--n-layer", "4"])
    root = tmp_path / "ckpt"
    good = root / "step-000002"
    good.mkdir(parents=True)
    (good / "config.json").write_text(json.dumps(example.model_config(args)))
    (root / "step-000009").mkdir()  # torn: DCP files, no config.json (written last, after every rank)
    (root / "step-000009" / ".metadata").write_bytes(b"")
    (root / ".partial-step-000010").mkdir()
    assert example.newest_step(root, example.model_config(args)) == good

    status = example.main(["--n-layer", "2", "--checkpoint-dir", str(root)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "--n-layer 4 there, 2 here" in err and "another --checkpoint-dir" in err, err
    assert not torch.distributed.is_initialized()
    assert sorted(p.name for p in root.iterdir()) == [".partial-step-000010", "step-000002", "step-000009"]
