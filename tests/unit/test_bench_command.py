"""``ckpt-wrapper bench`` runs end to end on a tiny model and writes a complete table, JSON and plot."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest

from ckpt_wrapper.tools import benchkit, cli
from ckpt_wrapper.tools.bench import BenchOptions, run

_TINY = ["--device", "cpu", "--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "16",
         "--vocab-size", "64", "--batch", "2", "--threads", "1", "--no-reexec"]


def test_bench_writes_every_configuration(tmp_path) -> None:
    """A failure means the command lost a configuration, a field, or one of its output files."""
    out = tmp_path / "bench"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(["bench", *_TINY, "--rounds", "1", "--warmup", "0", "--budgets", "0.9,0.6",
                           "--out-dir", str(out)])
    assert status == 0
    report = json.loads((out / "bench.json").read_text())
    expected = {"none", "ckpt_full", "torch_full", "ckpt_sac_matmuls", "torch_sac_matmuls", "ckpt_sac_titan",
                "torch_sac_titan", "ckpt_cheap", "torch_first1", "torch_first1+sac_matmuls", "torch_first1+sac_titan"}
    assert expected <= set(report["configs"])
    assert {"plan_0.9", "plan_0.6"} == set(report["plans"])
    for name, entry in report["configs"].items():
        assert entry["median_s"] > 0 and entry["time_ratio"] > 0, name
        assert entry["held_after_forward_bytes"] >= 0 and entry["memory_ratio"] >= 0, name
        assert entry["extra_flops"] >= 0 or entry["family"] == "baseline", name
    assert report["configs"]["none"]["time_ratio"] == 1.0
    assert report["configs"]["ckpt_full"]["extra_flops"] > 0  # full checkpointing recomputes every block
    for name, plan in report["plans"].items():
        if plan["feasible"]:  # a plan at 0.9 of the memory always exists (all blocks unwrapped is within it)
            assert name in report["configs"]
            assert plan["predicted_seconds"] > 0 and plan["time_error"] >= 0
            assert isinstance(plan["held_within_budget"], bool)
    assert report["plans"]["plan_0.9"]["feasible"]
    assert report["goals"] and all({"goal", "value", "met"} <= set(goal) for goal in report["goals"])
    assert (out / "plans" / "plan_0.9.json").exists()

    markdown = (out / "bench.md").read_text()
    for name in report["configs"]:
        assert f"| {name} |" in markdown
    assert markdown.strip() in stdout.getvalue()
    assert "round 1/1" in stderr.getvalue()  # progress goes to stderr
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in stderr.getvalue()


def test_bench_configs_filter_and_errors(tmp_path) -> None:
    """``--configs`` keeps ``none`` plus the matches; a pattern matching nothing is a usage error."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(BenchOptions(device="cpu", n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64, batch=2,
                         threads=1, rounds=1, warmup=0, configs=("torch_sac_*",), out_dir=str(tmp_path)))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["configs"]) == {"none", "torch_sac_matmuls", "torch_sac_titan"}
    with pytest.raises(ValueError, match="match no configuration"):
        with contextlib.redirect_stderr(io.StringIO()):
            run(BenchOptions(device="cpu", n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64,
                             threads=1, configs=("nope",), out_dir=str(tmp_path)))
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        cli.main(["bench", "--device", "cpu", "--budgets", "1.5"])
    stderr = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(stderr):  # nothing selected: not a run of `none` alone
        cli.main(["bench", "--device", "cpu", "--configs", " , "])
    assert "expected comma-separated configuration names or patterns" in stderr.getvalue()
    with pytest.raises(ValueError, match="compile_\\* configurations run only with --compile"):
        BenchOptions(device="cpu", configs=("compile_*",))


def test_round_robin_rotates_and_drops_warmup() -> None:
    """Every round measures each configuration once, starting one later each round; warm-up is not kept.

    A failure means one configuration always runs after the same other one (and inherits its cache and
    allocator state), or warm-up samples leak into the medians.
    """
    calls: list[str] = []
    counter = iter(range(100))

    def measure(name: str) -> benchkit.Timing:
        calls.append(name)
        return benchkit.Timing(seconds=float(next(counter)))

    samples = benchkit.run_rounds(["a", "b", "c"], measure, warmup=1, rounds=3, log=lambda line: None)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [s.seconds for s in samples["a"]] == [5.0, 7.0, 9.0]  # warm-up call 0 dropped


def test_markdown_table_rejects_ragged_rows() -> None:
    """A row with a missing cell is an error naming the expected count, not a shifted table."""
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        benchkit.markdown_table(["name", "ms"], [["none"]])


def test_version_prints_the_package_and_torch_versions(capsys) -> None:
    """``ckpt-wrapper --version`` (and ``python -m ckpt_wrapper --version``) prints both versions, exit 0.

    Failed before: ``--version`` was an unknown argument (exit 2).
    """
    import subprocess
    import sys

    import torch

    import ckpt_wrapper

    expected = f"ckpt-wrapper {ckpt_wrapper.__version__} (torch {torch.__version__})"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == expected
    result = subprocess.run([sys.executable, "-m", "ckpt_wrapper", "--version"], capture_output=True, text=True,
                            timeout=120, cwd=str(__import__("pathlib").Path(ckpt_wrapper.__file__).parents[1]))
    assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr[-2000:]


def test_usage_errors_are_one_line(capsys) -> None:
    """Every subcommand's usage error is one line on stderr naming --help, exit status 2 (no usage block)."""
    for argv in (["bench", "--budgets", "1.5"], ["plan", "--cost", "cheap"], ["parity", "--steps", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith(f"ckpt-wrapper {argv[0]}: error: ") and err[0].endswith("--help)"), err


def test_torch_remat_anchors_keep_the_gradients_and_drop_activations() -> None:
    """The torch_remat anchors wrap the bench's copy so that it learns what the unwrapped model learns.

    A failure means the hand-annotated forward differs from ``models.Block``'s (a wrong gradient would make
    the anchor a comparison with another model), or that its checkpoint keeps what it should drop.
    """
    pytest.importorskip("torch_remat")
    import copy

    import torch

    from ckpt_wrapper.measure import held_after_forward
    from ckpt_wrapper.testing.data import lm_loss
    from ckpt_wrapper.testing.models import GPT, GPTConfig
    from ckpt_wrapper.tools.bench_configs import configurations, select

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, d_model=64, n_head=4, seq_len=32, vocab_size=128, dropout=0.0))
    tokens = torch.randint(0, 128, (4, 32))
    lm_loss(model(tokens), tokens).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    unwrapped = held_after_forward(lambda: model(tokens), device=torch.device("cpu"))
    anchors = [c for c in select(configurations(3, (1,), cuda=False), ("remat_*",)) if c.name != "none"]
    assert [c.name for c in anchors] == ["remat_full", "remat_save_attn"]
    held = {}
    for config in anchors:
        copied = copy.deepcopy(model)
        copied.zero_grad(set_to_none=True)
        config.wrap(copied)
        lm_loss(copied(tokens), tokens).backward()
        for name, p in copied.named_parameters():
            torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=0, msg=f"{config.name}: {name}")
        held[config.name] = held_after_forward(lambda: copied(tokens), device=torch.device("cpu"))
    assert held["remat_full"] < held["remat_save_attn"] < unwrapped, (held, unwrapped)


def test_compile_anchors_partition_under_their_own_budget(tmp_path) -> None:
    """``--compile`` adds torch.compile at budget 1.0 and at each budget, each compiled under its own budget.

    A failure means a configuration reused another's compiled graphs or compiled outside its budget (the
    lower budget would then hold as much as the default), or lost the unwrapped model's loss.
    """
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(BenchOptions(device="cpu", n_layer=1, d_model=64, n_head=2, seq_len=32, vocab_size=128, batch=4,
                         threads=1, rounds=1, warmup=0, budgets=(0.3,), compile=True, configs=("compile_*",),
                         out_dir=str(tmp_path)))
    report = json.loads((tmp_path / "bench.json").read_text())
    configs = report["configs"]
    assert set(configs) == {"none", "compile_1", "compile_0.3"}
    assert configs["compile_1"]["extra_flops"] is None  # FlopCounterMode cannot see compiled kernels
    assert configs["compile_0.3"]["held_after_forward_bytes"] < 0.6 * configs["compile_1"]["held_after_forward_bytes"]
    for name in ("compile_1", "compile_0.3"):  # the bench refuses a configuration whose loss differs; check it ran
        assert abs(configs[name]["first_loss"] - configs["none"]["first_loss"]) <= 1e-3 * abs(configs["none"]["first_loss"])
