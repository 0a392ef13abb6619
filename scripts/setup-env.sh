#!/usr/bin/env bash
# Build the project's virtual environment on a fresh Python 3.11 machine.
#
# Why a script and not one `pip install`: three packages of our stack do not install
# cleanly by themselves on Python 3.11 (see README, "Installation"):
#   - betty-ml 0.1.1 declares `torch>=1.6.*`, which pip >= 24.1 refuses: we pin pip < 24.1;
#   - learn2learn 0.2.0 ships C files from an old Cython that fail on 3.11: we regenerate
#     them from its .pyx with Cython 3 before building;
#   - torch and torchvision must be a matched pair (torchvision 0.29.1 pins torch 2.14.1), or
#     torchvision's compiled ops cannot load and `import torchvision` fails: we install the
#     two in one command, first, so that nothing else pulls another torch. IMAML_TORCH
#     replaces that command's arguments (e.g. another pair, or a CUDA index URL).
# Re-running is cheap: each step is skipped when its package is already there at its version.
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${PYTHON:-python3.11}
TORCH=2.14.1 TORCHVISION=0.29.1  # a matched pair: torchvision 0.29.1 requires torch==2.14.1
TORCH_SPEC=${IMAML_TORCH:-torch==$TORCH torchvision==$TORCHVISION}
HERE=$(cd "$(dirname "$0")/.." && pwd)

command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "setup-env: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)  # absolute: later steps run from other directories
PY="$VENV/bin/python"
# pip, minus expected noise: local index mirrors that lack a package, and betty-ml 0.1.1's
# non-standard specifiers (pip < 24.1 accepts them with a deprecation notice on every call)
pip() {
  "$PY" -m pip --disable-pip-version-check -q "$@" \
    2> >(grep -v -E "is ignored: it is neither|non-standard dependency specifier|^$" >&2)
}
# have NAME [VERSION]: installed (at VERSION, ignoring a local "+cpu"-style suffix)
have() { "$PY" -c "import importlib.metadata as m, sys; v = m.version(sys.argv[1]); sys.exit(len(sys.argv) > 2 and v.split('+')[0] != sys.argv[2])" "$@" 2>/dev/null; }

# pip < 24.1 still accepts betty-ml 0.1.1's non-standard specifiers (with a warning).
pip install "pip>=23,<24.1"

# word splitting of TORCH_SPEC is intended: it is a list of requirements (and pip options)
# shellcheck disable=SC2086
if [ -n "${IMAML_TORCH:-}" ] || ! { have torch "$TORCH" && have torchvision "$TORCHVISION"; }; then
  pip install $TORCH_SPEC
fi
# betty-ml's only runtime deps are torch (installed above) and numpy; its metadata warnings
# about the non-standard specifiers are expected.
have betty-ml || pip install --no-deps "betty-ml==0.1.1"
pip install -c "$HERE/requirements/constraints.txt" -r "$HERE/requirements/base.txt"

if ! have learn2learn; then
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  pip download --no-deps --no-binary :all: -d "$build" "learn2learn==0.2.0"
  tar -xzf "$build"/learn2learn-0.2.0.tar.gz -C "$build"
  src="$build/learn2learn-0.2.0"
  rm -f "$src"/learn2learn/data/*.c
  (cd "$src/learn2learn/data" && "$VENV/bin/cythonize" -3 -q ./*.pyx >/dev/null)
  (cd "$src" && pip install --no-deps --no-build-isolation .)
fi

pip install --no-deps --no-build-isolation -e "$HERE"
# the stack imports with nothing special, torchvision's compiled ops included
"$PY" - <<'EOF'
import contextlib, io
import betty, torch, torchvision, wandb  # noqa: F401,E401
with contextlib.redirect_stderr(io.StringIO()):  # gym's "unmaintained" notice
    import learn2learn
torch.ops.torchvision.nms  # the compiled library loaded (it fails when torch and torchvision do not match)
print(f"stack ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"betty-ml {betty.__version__}, learn2learn {learn2learn.__version__}")
EOF
