#!/usr/bin/env bash
# A separate venv, .venv-peers, for the TorchOpt peer row (studies/peers/torchopt_imaml.py).
# TorchOpt is no requirement of this project: it goes into its own venv with --no-deps, and a
# .pth file there makes the project venv's packages (torch, numpy, betty, learn2learn, ...)
# importable, so both rows run the same torch. The repository's own packages import from the
# working directory (run the peer as `python -m studies.peers.torchopt_imaml` from the root).
#
#   bash studies/peers/setup_torchopt.sh [PROJECT_VENV]      (default: <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROJECT_VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
PEERS="$ROOT/.venv-peers"
TORCHOPT="torchopt==0.7.3"

if [ ! -x "$PROJECT_VENV/bin/python" ]; then
    echo "error: no project venv at $PROJECT_VENV (give its folder as the first argument)" >&2
    exit 2
fi
project_site="$("$PROJECT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

python3.11 -m venv "$PEERS"
# --no-deps: TorchOpt's requirements (torch, numpy, typing-extensions) come from the project venv;
# optree and graphviz are the two it needs that the project does not have
"$PEERS/bin/python" -m pip install --no-deps "$TORCHOPT" optree graphviz
peers_site="$("$PEERS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$project_site" > "$peers_site/project-venv.pth"

"$PEERS/bin/python" - <<'PY'
import warnings

warnings.simplefilter("ignore")  # functorch deprecation notices on import
import torch
import torchopt

print(f"ok: torchopt {torchopt.__version__} with torch {torch.__version__} ({torch.__file__})")
PY
