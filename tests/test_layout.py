"""The house rules that keep the code readable (issue 19): small files and functions, Betty's
internals named in one module, no per-task/vectorized dispatch by attribute lookup."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400  # one idea per file; issue 28 raised it from 300
MAX_FUNCTION_LINES = 60
# Betty 0.1.1's private state and internal hooks; only imaml/betty_glue.py may name them
BETTY_PRIVATE = ("_inner_loop_start", "_training", "_first_order", "cur_batch", "training_step_exec", "jvp_fn_mapping",
                 "param_mappings", ".gas")


def _sources(outside_tests: bool = True) -> list:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files += subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return sorted({f for f in files if (ROOT / f).is_file() and not (outside_tests and f.startswith("tests/"))})


def test_no_source_file_outside_tests_is_over_the_line_cap():
    long = {f: n for f in _sources() if (n := len((ROOT / f).read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_is_over_60_lines():
    long = {}
    for f in _sources():
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{f}:{node.name}"] = length
    assert not long, long


def test_bettys_private_attributes_are_named_in_betty_glue_only():
    pattern = re.compile("|".join(rf"\b{re.escape(name)}\b" if name[0] != "." else re.escape(name) + r"\b"
                                  for name in BETTY_PRIVATE))
    found = {}
    for f in _sources():
        if f == "imaml/betty_glue.py":
            continue
        for number, line in enumerate((ROOT / f).read_text().splitlines(), start=1):
            if pattern.search(line.split("#")[0]):
                found[f"{f}:{number}"] = line.strip()
    assert not found, found


def test_no_dispatch_on_a_vectorized_attribute():
    found = [f for f in _sources() if re.search(r"getattr\([^)]*[\"']vectorized[\"']", (ROOT / f).read_text())]
    assert not found, found


def _imports(path: Path) -> list:
    """Every module ``path`` imports (top level or inside a function), by absolute name."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.extend([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return names


def test_the_layers_point_one_way():
    """imaml/ (the library) imports neither the data (envs), the levels (problems), the
    orchestration (engines) nor the application (imaml.app); nothing but the application and the
    entry points imports the application."""
    library = [p for p in (ROOT / "imaml").rglob("*.py") if "app" not in p.relative_to(ROOT / "imaml").parts]
    assert len(library) > 20
    for path in library:
        wrong = [name for name in _imports(path) if name.split(".")[0] in ("envs", "problems", "engines")
                 or name.startswith("imaml.app")]
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
    for folder in ("envs", "problems", "engines"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not [n for n in _imports(path) if n.startswith("imaml.app")], f"{path.relative_to(ROOT)} imports the app"
