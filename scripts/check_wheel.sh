#!/usr/bin/env bash
# Wheel smoke check: ckpt_wrapper installs and works like any library, away from this checkout.
#
#   1. copies the files git tracks (and untracked, not ignored ones) to a temporary folder and builds a
#      wheel there with `pip wheel --no-deps` (so a stale build/ or egg-info in the checkout cannot leak in);
#   2. checks the wheel holds every subpackage (tools, testing, planner, integrations) and no tests;
#   3. makes a fresh venv, installs torch (TORCH_SPEC, pinned exactly: an unpinned torch would pull a
#      multi-GB CUDA build) and the wheel;
#   4. from a folder outside the repository, with PYTHONPATH unset: imports ckpt_wrapper from the venv,
#      wraps and backpropagates a small model, and runs `ckpt-wrapper --help` and `python -m ckpt_wrapper --help`.
#
# Usage: bash scripts/check_wheel.sh          (or: make wheel-check)
# Environment (defaults): PYTHON (python3) makes the venv; TORCH_SPEC (torch==2.13.0);
# KEEP (unset; set to 1 to keep the temporary folder and print where it is).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work="$(mktemp -d "${TMPDIR:-/tmp}/ckpt_wrapper-wheel.XXXXXX")"
started=$SECONDS
step() { echo "check_wheel [$((SECONDS - started))s]: $*"; }
finish() {
    if [[ -n "${KEEP:-}" ]]; then step "kept $work"; else rm -rf "$work"; step "removed $work"; fi
}
trap finish EXIT
# torch warns at import when numpy is absent; the wheel does not need numpy.
export PYTHONWARNINGS="ignore:Failed to initialize NumPy"

step "copying the source tree to $work/src"
mkdir -p "$work/src"
if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' path; do [[ -e "$path" ]] && printf '%s\0' "$path"; done \
        | xargs -0 cp --parents -t "$work/src")
else
    cp -r "$repo_root/." "$work/src"
    rm -rf "$work/src/.venv" "$work/src/build" "$work/src/dist" "$work/src"/*.egg-info
fi

step "building the wheel"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheels=("$work"/dist/ckpt_wrapper-*.whl)
[[ -f "${wheels[0]}" && ${#wheels[@]} -eq 1 ]] || { echo "check_wheel: expected one ckpt_wrapper wheel in $work/dist" >&2; exit 1; }
wheel="${wheels[0]}"
step "built $(basename "$wheel")"

step "checking the wheel's contents"
"$PYTHON" - "$wheel" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
needed = ["ckpt_wrapper/__init__.py", "ckpt_wrapper/log.py", "ckpt_wrapper/tools/__init__.py",
          "ckpt_wrapper/tools/cli.py", "ckpt_wrapper/testing/__init__.py", "ckpt_wrapper/testing/models.py",
          "ckpt_wrapper/planner/__init__.py", "ckpt_wrapper/integrations/__init__.py",
          "ckpt_wrapper/integrations/accelerate.py"]
missing = [name for name in needed if name not in names]
strays = [name for name in names if not (name.startswith("ckpt_wrapper/") or ".dist-info/" in name)]
tests = [name for name in names if "/tests/" in f"/{name}" or name.split("/")[-1].startswith("test_")]
if missing or strays or tests:
    sys.exit(f"check_wheel: bad wheel: missing {missing}, outside the package {strays}, tests {tests}")
entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
if "ckpt-wrapper = ckpt_wrapper.tools.cli:main" not in zipfile.ZipFile(sys.argv[1]).read(entry_points).decode():
    sys.exit("check_wheel: the wheel does not declare the ckpt-wrapper command")
packages = sorted({n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")})
print(f"  {len(names)} files; packages: {', '.join(packages)}; no tests")
EOF

step "making a fresh venv and installing $TORCH_SPEC and the wheel"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-compile "$TORCH_SPEC" "$wheel"

step "smoke test from $work/elsewhere (outside the repository, PYTHONPATH unset)"
mkdir -p "$work/elsewhere"
cd "$work/elsewhere"
unset PYTHONPATH
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import pathlib
import sys

import torch

import ckpt_wrapper
from ckpt_wrapper import apply_activation_checkpointing, by_class_name
from ckpt_wrapper.testing.models import GPT, GPTConfig

where = pathlib.Path(ckpt_wrapper.__file__).resolve()
if pathlib.Path(sys.argv[1]).resolve() not in where.parents:
    sys.exit(f"check_wheel: ckpt_wrapper was imported from {where}, not from the venv")
for module in ("ckpt_wrapper.tools.cli", "ckpt_wrapper.testing.parity", "ckpt_wrapper.planner",
               "ckpt_wrapper.integrations.accelerate", "ckpt_wrapper.log"):
    __import__(module)

torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
names = [name for name, _ in model.named_parameters()]
wrapped = apply_activation_checkpointing(model, check_fn=by_class_name("Block"))
assert wrapped == ["layers.0", "layers.1"], wrapped
tokens = torch.randint(0, 64, (2, 16))
model.loss(tokens, tokens).backward()
assert [name for name, _ in model.named_parameters()] == names
assert all(p.grad is not None for p in model.parameters())
print(f"  ckpt_wrapper {ckpt_wrapper.__version__} (torch {torch.__version__}) from {where.parent}: "
      f"wrapped {wrapped}, backward ran, names unchanged")
EOF
"$work/venv/bin/ckpt-wrapper" --help >"$work/help.txt"
grep -q "demo" "$work/help.txt" || { echo "check_wheel: ckpt-wrapper --help does not list the demo" >&2; exit 1; }
"$work/venv/bin/python" -m ckpt_wrapper --help >/dev/null
step "ckpt-wrapper --help and python -m ckpt_wrapper --help work"

step "passed"
