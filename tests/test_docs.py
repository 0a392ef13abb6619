"""Docs that cannot go stale: every command in README.md and docs/*.md is checked against the code.

Commands come from the code blocks (fenced ``bash``/``sh``/``console``/plain blocks and indented
ones) and from inline code spans that start with a command. A command line may carry ``$ ``
prompts, ``VAR=value`` prefixes, ``\\`` continuations, ``&&``/``;`` chains and comments.

- ``run.py`` (``python run.py``, ``.venv/bin/python run.py``, ``torchrun ... run.py``,
  ``make run ARGS="..."``): every ``--flag`` is one of run.py's parser, exactly (no abbreviations);
  a value is one of the flag's choices and of its field's type; ``--config NAME`` is a shipped
  preset; an import path (``--lower-problem problems.meta_sgd:MetaSGDLower``) imports.
- ``python -m benchmarks.X`` / ``python studies/X.py`` (and the other way round): the module exists and its own parser
  (captured where the module parses its arguments) takes every flag; flags after ``--``, and the
  unknown flags of a module that passes them on (``parse_known_args``), are run.py's.
- ``bash X.sh``, ``wandb sweep FILE``, ``python -m pytest FILE``, ``make TARGET``: the file or target exists.
Values with placeholders (``<sweep id>``, ``...``, ``~/data``, ``$a``, ``DIR``) are checked for flags only.
Inline code that names the project's files, presets or ``module:Class`` paths must resolve, and
every link to a doc (``docs/x.md#section``) must reach a heading.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaml.app.arguments import build_parser, coerce, find_preset  # noqa: E402
from imaml.config import FIELDS  # noqa: E402
from imaml.errors import UsageError  # noqa: E402
from imaml.plugins import is_import_path, load_object  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
PACKAGES = ("benchmarks", "engines", "envs", "imaml", "problems", "studies", "tests")
SCRIPT_PACKAGES = ("benchmarks", "studies")  # modules with command lines of their own
FOLDERS = (*PACKAGES, "configs", "docs", "scripts", "requirements")
IMPORT_FLAGS = ("lower_problem", "upper_problem", "model", "hypergrad", "env")
WRAPPERS = {"do", "then", "else", "time", "nohup", "env", "srun", "exec"}
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


# ----------------------------------------------------------------------------- reading the docs
def code_blocks(text: str) -> Iterator[Tuple[int, str, List[str]]]:
    """(line number of the block's first line, language, lines): fenced blocks and indented ones."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            yield i + 2, fence.group(2).lower(), lines[i + 1:end]
            i = end + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            yield i + 1, "", [line[4:] for line in lines[i:end]]
            i = end
        else:
            i += 1


def prose(text: str) -> str:
    """The text with its code blocks blanked (lines kept, so line numbers stay right)."""
    lines = text.splitlines()
    for start, _, block in code_blocks(text):
        for k in range(start - 1, start - 1 + len(block)):
            lines[k] = ""
    return "\n".join(lines)


def inline_spans(text: str) -> Iterator[Tuple[int, str]]:
    """(line, content) of every inline code span outside code blocks; a span may wrap lines."""
    body = prose(text)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
        yield body.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())


def command_lines(start: int, lang: str, block: List[str]) -> Iterator[Tuple[int, str]]:
    """(line, command) of a block: continuations joined, prompts dropped; console output skipped."""
    k = 0
    while k < len(block):
        line, number = block[k], start + k
        k += 1
        stripped = line.strip()
        if lang == "console" and not stripped.startswith("$ "):
            continue
        stripped = stripped[2:] if stripped.startswith("$ ") else stripped
        while stripped.endswith("\\") and k < len(block):
            stripped = stripped[:-1].rstrip() + " " + block[k].strip()
            k += 1
        if stripped and not stripped.startswith("#"):
            yield number, stripped


COMMAND = re.compile(r"(\w+=\S+ +)*(srun +)?(\S+/)?(python3?|torchrun|make|bash|wandb)( |$)")


def documented_commands(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, command) of the code blocks and inline spans that start with one of our programs."""
    text = path.read_text()
    for start, lang, block in code_blocks(text):
        if lang in SHELL:
            yield from ((n, c) for n, c in command_lines(start, lang, block) if COMMAND.match(c))
    for number, span in inline_spans(text):
        if COMMAND.match(span):
            yield number, span


def segments(command: str) -> List[List[str]]:
    """The simple commands of a line (split at ``&&``, ``||``, ``;``, ``|``), comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out: List[List[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            out.append([])
        else:
            out[-1].append(token)
    return [words for words in out if words]


def placeholder(value: str) -> bool:
    return bool(re.search(r"[<>~$*…]|\.\.\.|^[A-Z][A-Z0-9_]*$", value))


# ----------------------------------------------------------------------------- the parsers
@lru_cache(maxsize=None)
def run_options() -> dict:
    return dict(build_parser()._option_string_actions)


class _Captured(BaseException):  # not an Exception: no `except Exception` in a main() swallows it
    def __init__(self, parser):
        super().__init__("captured")
        self.parser = parser


@lru_cache(maxsize=None)
def module_parser(module: str) -> Optional[argparse.ArgumentParser]:
    """The parser a benchmark module reads its arguments with: it is run as ``python -m`` would,
    up to its first ``parse_known_args`` (``parse_args`` goes through it), which hands it over."""
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    original, argv = argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module may be imported already
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Captured as captured:
        return captured.parser
    except (Exception, SystemExit):
        return None
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv = original, argv
    return None


def module_file(module: str) -> Optional[Path]:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- the checks
def split_flags(args: List[str], options: dict) -> Iterator[Tuple[str, Optional[argparse.Action], list]]:
    """(flag, its action or None, its values) for each ``--flag`` of ``args``; stray words as ('', None, [word])."""
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("--") or token == "--":
            yield "", None, [token]
            continue
        flag, eq, value = token.partition("=")
        action = options.get(flag)
        if eq:
            yield flag, action, [value]
            continue
        nargs = getattr(action, "nargs", None)
        values = []
        if action is None or nargs == 0:
            pass
        elif nargs == "?":
            if i < len(args) and args[i].lower() in BOOL_WORDS:
                values, i = [args[i]], i + 1
        elif nargs in ("+", "*"):
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
        elif i < len(args) and (not args[i].startswith("--") or placeholder(args[i])):
            values, i = [args[i]], i + 1
        else:
            yield flag, action, None  # a flag that needs a value and has none
            continue
        yield flag, action, values


def check_import(flag: str, value: str) -> Optional[str]:
    top = re.split(r"[.:]", value)[0]
    if top not in PACKAGES and importlib.util.find_spec(top) is None:
        return None  # the reader's own module (my_pkg.module:MyLower): nothing to import here
    try:
        load_object(value, flag)
    except UsageError as err:
        return str(err)
    return None


def check_run_value(flag: str, action: argparse.Action, value: str) -> Optional[str]:
    if placeholder(value):
        return None
    name = action.dest
    for alternative in value.split("|"):
        if action.choices and alternative not in action.choices:
            return f"{flag} {alternative}: not one of {', '.join(map(str, action.choices))}"
        if name == "config":
            if not find_preset(alternative).is_file():
                return f"--config {alternative}: no such preset (configs/) or file"
            continue
        if name in IMPORT_FLAGS and is_import_path(alternative):
            problem = check_import(flag, alternative)
            if problem:
                return problem
        if name in FIELDS:
            try:
                coerce(name, alternative, flag)
            except UsageError as err:
                return str(err)
    return None


def check_run_args(args: List[str], program: str = "run.py") -> List[str]:
    problems = []
    for flag, action, values in split_flags(args, run_options()):
        if not flag:
            if values and values[0] != "--" and not placeholder(values[0]):
                problems.append(f"{values[0]}: {program} takes no positional argument here")
        elif action is None:
            problems.append(f"{flag}: not a flag of {program}")
        elif values is None:
            problems.append(f"{flag}: needs a value")
        else:
            problems += [p for p in (check_run_value(flag, action, v) for v in values) if p]
    return problems


def check_benchmark(module: str, args: List[str]) -> List[str]:
    path = module_file(module)
    if path is None:
        return [f"python -m {module}: no such module"]
    shared = args[args.index("--") + 1:] if "--" in args else []
    ours = args[:args.index("--")] if "--" in args else args
    parser = module_parser(module)
    if parser is None:  # no argparse to ask: at least the flags appear in its source
        source = path.read_text()
        return [f"{flag}: not in {path.relative_to(ROOT)}" for flag in ours
                if flag.startswith("--") and flag.split("=")[0] not in source]
    if type(parser).__module__ == "imaml.app.arguments":  # a peer: run.py's own flags
        return check_run_args(args, module)
    passes_on = "parse_known_args" in path.read_text()  # what it does not know goes on to run.py
    problems = check_run_args(shared, f"run.py (after -- of {module})")
    own = dict(parser._option_string_actions)
    options = {**run_options(), **own} if passes_on else own
    for flag, action, values in split_flags(ours, options):
        if flag and action is None:
            problems.append(f"{flag}: not a flag of {module}" + (" nor of run.py" if passes_on else ""))
        elif flag and values is None:
            problems.append(f"{flag}: needs a value")
        elif flag and flag not in own:
            problems += [p for p in (check_run_value(flag, action, v) for v in values) if p]
        elif flag:
            problems += check_benchmark_values(module, flag, action, values)
    return problems


def check_benchmark_values(module: str, flag: str, action: argparse.Action, values: list) -> List[str]:
    problems = []
    for value in values:
        if placeholder(value):
            continue
        if action.choices and value not in action.choices:
            problems.append(f"{flag} {value}: not one of {', '.join(map(str, action.choices))}")
        elif module == "studies.compare" and flag == "--set" and ":" in value and "=" in value:
            name, _, setting = value.split(":", 1)[1].partition("=")
            problems += check_run_args([f"--{name}", setting], f"run.py (--set {value})")
        elif module == "studies.compare" and flag == "--config" and "=" in value:
            preset = value.split("=", 1)[1]
            if not find_preset(preset).is_file():
                problems.append(f"--config {value}: no such preset")
    return problems


def check_words(words: List[str]) -> List[str]:
    """The problems of one simple command (its program after prefixes and wrappers)."""
    while words and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in WRAPPERS):
        words = words[1:]
    if not words:
        return []
    program, args = words[0], words[1:]
    name = program.rsplit("/", 1)[-1]
    if name == "make":
        return check_make(args)
    if name in ("bash", "sh") and args and not placeholder(args[0]):
        return [] if (ROOT / args[0]).is_file() else [f"{args[0]}: no such script"]
    if name == "wandb" and args[:1] == ["sweep"] and len(args) > 1 and not placeholder(args[1]):
        return [] if (ROOT / args[1]).is_file() else [f"{args[1]}: no such sweep file"]
    if name in ("torchrun",) or re.fullmatch(r"python(3(\.\d+)?)?", name):
        return check_python(args)
    return []


def check_python(args: List[str]) -> List[str]:
    for k, word in enumerate(args):
        if word == "-m" and k + 1 < len(args):
            module, rest = args[k + 1], args[k + 2:]
            if module == "pytest":
                return [f"{p}: no such test file" for p in rest
                        if p.startswith("tests/") and not (ROOT / p.split("::")[0]).exists()]
            return check_benchmark(module, rest) if module.startswith(SCRIPT_PACKAGES) else []
        if word.endswith(".py"):
            if Path(word).name == "run.py":
                return check_run_args(args[k + 1:])
            if word.startswith(tuple(f"{package}/" for package in SCRIPT_PACKAGES)):
                return check_benchmark(word[:-3].replace("/", "."), args[k + 1:])
            return []
    return []


def check_make(args: List[str]) -> List[str]:
    targets = [a for a in args if "=" not in a and not a.startswith("-")]
    makefile = (ROOT / "Makefile").read_text()
    problems = [f"make {t}: no such target" for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    if "run" in targets:
        for assignment in (a for a in args if a.startswith("ARGS=")):
            problems += check_run_args(shlex.split(assignment[5:]), 'run.py (make run ARGS="...")')
    return problems


def check_command(command: str) -> List[str]:
    try:
        parts = segments(command)
    except ValueError as err:
        return [f"cannot read the command ({err})"]
    return [problem for words in parts for problem in check_words(words)]


def check_doc(path: Path) -> List[str]:
    """Every problem of one Markdown file, as 'file:line: command: problem'."""
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for number, command in documented_commands(path):
        out += [f"{label}:{number}: {command[:100]}: {problem}" for problem in check_command(command)]
    text = path.read_text()
    out += [f"{label}:{number}: `{span}`: {problem}" for number, span in inline_spans(text)
            for problem in check_reference(span)]
    out += [f"{label}:{number}: {problem}" for number, problem in check_links(path, text)]
    return out


# ----------------------------------------------------------------------------- names and links
def check_reference(span: str) -> List[str]:
    """A project file, preset or ``module:Name`` named in inline code must exist."""
    if placeholder(span) or " " in span.strip():
        file_and_name = re.fullmatch(r"((?:%s)/[\w/]+\.py): (\w+)" % "|".join(FOLDERS), span)
        if file_and_name and not placeholder(span):
            module = file_and_name.group(1)[:-3].replace("/", ".")
            return check_dotted(f"{module}.{file_and_name.group(2)}")
        return []
    span = span.rstrip(",.;")
    if re.fullmatch(r"(%s)/[\w./-]*" % "|".join(FOLDERS), span):
        return [] if (ROOT / span).exists() else [f"{span}: no such file or folder"]
    if re.fullmatch(r"[\w.-]+\.yaml", span):
        found = (ROOT / "configs" / span).is_file() or (ROOT / "configs" / "sweeps" / span).is_file()
        return [] if found else [f"{span}: no such preset in configs/"]
    if re.search(r"\.(md|py|yaml|json|jsonl|png|pt|txt|sh|zip|pkl)$", span):
        return []
    if re.fullmatch(r"(%s)(\.\w+)+(:\w+(\.\w+)*)?(\(.*\))?" % "|".join(PACKAGES), span):
        return check_dotted(re.sub(r"\(.*\)$", "", span))
    return []


def check_dotted(path: str) -> List[str]:
    """``pkg.mod:Name``, ``pkg.mod.Name`` or ``pkg.mod``: the longest importable module, then attributes."""
    parts = path.replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return [f"{path}: {name} has no {'.'.join(parts[cut:])}"]
            obj = getattr(obj, attr)
        return []
    return [f"{path}: cannot import {parts[0]}"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    seen: dict = {}
    for line in prose(path.read_text()).splitlines():
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            seen[base] = seen.get(base, -1) + 1
            seen.setdefault(f"{base}-{seen[base]}" if seen[base] else base, 0)
    return set(seen)


def check_links(path: Path, text: str) -> Iterator[Tuple[int, str]]:
    body = prose(text)
    for match in re.finditer(r"\]\(([^)\s]+)\)", body):
        target, _, anchor = match.group(1).partition("#")
        if re.match(r"\w+://|mailto:", target):
            continue
        file = (path.parent / target).resolve() if target else path
        number = body.count("\n", 0, match.start()) + 1
        if not file.exists():
            yield number, f"link {match.group(1)}: no such file"
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            yield number, f"link {match.group(1)}: no such heading in {file.name}"


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_and_name_in_the_docs_matches_the_code(doc):
    problems = check_doc(doc)
    assert not problems, "\n".join(problems)


NUMBER = re.compile(r"\d+ min \d+ s|(?<![\w.])\d+(?:[.,]\d+)+(?:%|×)?|(?<![\w.])\d+(?:%|×)")


def test_every_number_in_the_readme_has_its_home_in_docs():
    """One home per number: a figure in the README (a decimal, a percentage, a ratio, a time) is
    quoted from docs/, where its command is, so it cannot drift from it."""
    docs = " ".join(path.read_text() for path in DOCS[1:])
    readme = prose((ROOT / "README.md").read_text())
    readme = re.sub(r"\]\([^)]*\)", "]", readme)  # link targets are no figures
    missing = []
    for number, line in enumerate(readme.splitlines(), start=1):
        for figure in NUMBER.findall(line):
            if not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", docs):
                missing.append(f"README.md:{number}: {figure}")
    assert not missing, "figures with no home in docs/:\n" + "\n".join(missing)


# flags of the other tools the docs name: pip's and torchrun's
FOREIGN_FLAGS = {"--no-deps", "--index-url", "--standalone", "--nnodes", "--nproc-per-node", "--nproc_per_node",
                 "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--local-addr"}


def known_flags() -> set:
    """run.py's flags, every benchmark module's, the shell scripts', and FOREIGN_FLAGS."""
    flags = set(run_options()) | FOREIGN_FLAGS
    for path in sorted(p for package in SCRIPT_PACKAGES for p in (ROOT / package).rglob("*.py")):
        source = path.read_text()
        if "ArgumentParser" in source and "__main__" in source:
            parser = module_parser(".".join(path.relative_to(ROOT).with_suffix("").parts))
            flags |= set(parser._option_string_actions) if parser else set()
    for path in [*(ROOT / "benchmarks").rglob("*.sh"), *(ROOT / "studies").rglob("*.sh"), *(ROOT / "scripts").glob("*.sh")]:
        flags |= set(re.findall(r"--[a-z][\w-]*", path.read_text()))
    return flags


def unknown_inline_flags(path: Path, known: set) -> List[str]:
    """'file:line: --flag' for each flag in the inline code of ``path`` that is not in ``known``."""
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{label}:{number}: {flag} (in `{span[:60]}`)" for number, span in inline_spans(path.read_text())
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*(?![\w-]*…)", span) if flag not in known]


def test_every_flag_named_in_inline_code_exists():
    """A flag named in a sentence or a table (`--inner-tol`) is one that some program here takes."""
    known = known_flags()
    unknown = [problem for doc in DOCS for problem in unknown_inline_flags(doc, known)]
    assert not unknown, "flags that no program here takes:\n" + "\n".join(unknown)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_py_help_runs():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert "--algo" in done.stdout


def test_run_py_list_presets_runs():
    if "--list-presets" not in run_options():
        pytest.skip("run.py has no --list-presets yet (the docs name it; imaml/app/arguments.py is adding it)")
    done = _run("--list-presets")
    assert done.returncode == 0, done.stderr
    assert "glyphs-imaml-head" in done.stdout


SYNTHETIC = '''# A doc

```bash
python run.py --no-wandb --algo imaml   # a flag that does not exist
OMP_NUM_THREADS=1 .venv/bin/python run.py --task glyphs \\
    --config no-such-preset && make run ARGS="--meta-stepz 100"
torchrun --standalone --nproc_per_node=2 run.py --lower-problem problems.meta_sgd:NoSuchLower
python -m studies.compare --out runs/x --methods maml no-such-method -- --algo imaml --seeds-of-run 1
python -m benchmarks.nonexistent --x 1
python run.py --algo imaml --adapt head --head-init zero --data-root ~/data --processes N   # fine
```

```console
$ python run.py --execution sideways
output line --not-a-flag, not a command
```

    python run.py --inner-stepz 3

Inline: `python run.py --metaa-lr 0.1`, `problems.lower:NoSuchClass`, `configs/nothing.yaml`, `--no-wandb`,
a [link](#no-such-heading) and [one that works](#a-doc).
'''


def test_the_checker_finds_stale_commands(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(SYNTHETIC)
    report = "\n".join(check_doc(doc))
    expected = ["doc.md:4: python run.py --no-wandb", "--no-wandb: not a flag of run.py",
                "doc.md:5:", "--config no-such-preset: no such preset", "--meta-stepz: not a flag of run.py",
                "doc.md:7:", "problems.meta_sgd:NoSuchLower", "doc.md:8:", "--methods no-such-method: not one of",
                "--seeds-of-run: not a flag of run.py", "doc.md:9:", "benchmarks.nonexistent: no such module",
                "doc.md:14:", "--execution sideways: not one of", "doc.md:18:", "--inner-stepz: not a flag",
                "doc.md:20:", "--metaa-lr: not a flag", "problems.lower:NoSuchClass", "configs/nothing.yaml",
                "link #no-such-heading: no such heading"]
    for piece in expected:
        assert piece in report, f"{piece!r} not in:\n{report}"
    assert "--not-a-flag" not in report and "#a-doc" not in report
    assert unknown_inline_flags(doc, known_flags()) == ["doc.md:20: --metaa-lr (in `python run.py --metaa-lr 0.1`)",
                                                        "doc.md:20: --no-wandb (in `--no-wandb`)"]
    assert not [line for line in report.splitlines() if line.startswith("doc.md:10:")], report  # the fine one


def test_the_checker_reads_continuations_chains_and_prompts():
    block = ["$ A=1 python run.py \\", "    --algo maml  # comment", "output", "$ make test && make run"]
    assert list(command_lines(3, "console", block)) == [(3, "A=1 python run.py --algo maml  # comment"),
                                                        (6, "make test && make run")]
    assert segments("make test && python run.py --algo maml; echo 'a b'  # done") == [
        ["make", "test"], ["python", "run.py", "--algo", "maml"], ["echo", "a b"]]
