"""Importing the project leaves Betty's hypergradient table exactly as betty-ml ships it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SNAPSHOT = """
from betty import hypergradient
before = dict(hypergradient.jvp_fn_mapping)
import imaml, problems, engines, envs  # noqa: F401
import imaml.solvers, engines.build  # noqa: F401
from engines import build_engine  # noqa: F401
after = dict(hypergradient.jvp_fn_mapping)
assert after == before, (sorted(before), sorted(after))
assert sorted(after) == ["cg", "darts", "neumann", "reinforce"], sorted(after)
print("betty table untouched")
"""


def test_importing_the_project_leaves_bettys_solver_table_untouched():
    """In a fresh interpreter (this test process may have installed ours already)."""
    out = subprocess.run([sys.executable, "-c", SNAPSHOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "betty table untouched" in out.stdout


def test_our_solvers_take_only_keys_of_our_own(make_config):
    from betty import hypergradient
    from betty.hypergradient.cg import cg
    from betty.hypergradient.darts import darts
    from betty.hypergradient.neumann import neumann

    from engines import build_engine

    build_engine(make_config(algo="imaml"))  # builds a Lower problem: installs our solvers
    assert (hypergradient.jvp_fn_mapping["cg"], hypergradient.jvp_fn_mapping["darts"],
            hypergradient.jvp_fn_mapping["neumann"]) == (cg, darts, neumann)
    assert "imaml_cg" in hypergradient.jvp_fn_mapping
