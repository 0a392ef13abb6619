"""Extensions by import path: a user's own classes from a module outside the package, chosen
from the command line or from Python, and one-line errors when a path or a class is wrong."""

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engines import build_engine
from imaml.app.cli import main, run_from_args
from imaml.errors import UsageError
from problems.anil import ANILImplicit, ANILUnrolled
from tests.reference import engine_meta_gradient, relative_error

DOCS = Path(__file__).resolve().parents[1] / "docs" / "extending.md"

USER_MODULE = '''
import torch
from torch import nn

from envs import FewShotEnv
from imaml.solvers import conjugate_gradient
from problems import UnrolledLower

calls = {"lower": [], "env": 0, "solver": 0}


class CountingLower(UnrolledLower):
    """Plain MAML that records every inner objective it computes (train or eval mode)."""

    def training_step(self, batch):
        calls["lower"].append(self._training)
        return super().training_step(batch)


class CountingEnv(FewShotEnv):
    def step(self):
        calls["env"] += 1
        return super().step()


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_outputs, config):
        super().__init__()
        self.hidden = config.channels
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), config.channels), nn.ReLU())
        self.head = nn.Linear(config.channels, num_outputs)

    def forward(self, x):
        return self.head(self.body(x))


class WrongSignature(nn.Module):
    def __init__(self, width):
        super().__init__()


def plain_cg(matvec, b, settings):
    calls["solver"] += 1
    return conjugate_gradient(matvec, b, settings.cg_steps, settings.cg_tol)


def returns_a_tensor(matvec, b, config):
    return b
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``my_ext.parts``: a package of the user's own, outside this project, on sys.path."""
    package = tmp_path / "user_project" / "my_ext"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "parts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(package.parent))
    for name in ("my_ext", "my_ext.parts"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import my_ext.parts

    return my_ext.parts


def _cli(data_root, out, *extra):
    return ["--task", "glyphs", "--algo", "maml", "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "2", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "2",
            "--test-tasks", "4", "--val-every", "100", "--data-root", data_root, "--output-dir", str(out), *extra]


def test_a_lower_problem_from_a_module_outside_the_package_runs(tmp_path, data_root, user_module):
    out = tmp_path / "run"
    run_from_args(_cli(data_root, out, "--lower-problem", "my_ext.parts:CountingLower"))
    calls = user_module.calls["lower"]
    # every training inner step went through the user's hook: meta-steps × tasks × inner steps
    assert calls.count(True) == 2 * 2 * 2
    assert calls.count(False) > 0  # and meta-validation / meta-test adapted with it too
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lower_problem"] == "my_ext.parts:CountingLower"
    assert results["test"]["num_tasks"] == 4


def test_the_current_directory_is_importable(tmp_path, make_config, monkeypatch):
    """Users run the CLI from their project directory, which run.py does not put on sys.path."""
    (tmp_path / "local_lowers.py").write_text("from problems import UnrolledLower\n\nclass Mine(UnrolledLower):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "local_lowers", raising=False)
    engine = build_engine(make_config(lower_problem="local_lowers.Mine"))  # the dotted form works too
    assert type(engine.lower).__name__ == "Mine"


def test_env_model_and_solver_by_import_path(make_config, user_module):
    config = make_config(task="glyphs", algo="imaml", env="my_ext.parts:CountingEnv", model="my_ext.parts:TinyNet",
                         hypergrad="my_ext.parts:plain_cg", cg_steps=200, cg_tol=1e-13, lam=50.0, channels=6)
    engine = build_engine(config, dtype=torch.float64)
    assert type(engine.env).__name__ == "CountingEnv"
    assert type(engine.upper.module).__name__ == "TinyNet" and engine.upper.module.hidden == 6
    got, _ = engine_meta_gradient(engine)
    assert user_module.calls["env"] == 1 and user_module.calls["solver"] == config.meta_batch_size
    # the user's solver is an untruncated CG: the same meta-gradient as the built-in one without its trust region
    builtin = build_engine(make_config(**{**config.to_dict(), "hypergrad": "cg", "cg_trust_region": False}),
                           dtype=torch.float64)
    expected, _ = engine_meta_gradient(builtin)
    assert relative_error(got, expected) < 1e-12


def test_a_solver_must_return_x_and_solve_info(make_config, user_module):
    engine = build_engine(make_config(algo="imaml", hypergrad="my_ext.parts:returns_a_tensor"))
    with pytest.raises(TypeError, match="must return \\(x, SolveInfo\\)"):
        engine_meta_gradient(engine)


def test_python_callers_pass_classes_and_models(make_config, data_root):
    config = make_config(task="glyphs", algo="maml")
    engine = build_engine(config, lower_cls=ANILUnrolled)
    assert type(engine.lower) is ANILUnrolled
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    assert build_engine(config, model=model).upper.module is model
    with pytest.raises(UsageError, match="lower_cls=ANILImplicit: problems.anil.ANILImplicit is not a subclass "
                                         "of problems.lower.UnrolledLower, which --algo maml needs "
                                         "\\(problems.anil defines ANILUnrolled, which is\\)"):
        build_engine(config, lower_cls=ANILImplicit)


BAD_PATHS = [
    (["--lower-problem", "no_such_pkg.mod:Lower"],
     "--lower-problem no_such_pkg.mod:Lower: cannot import module no_such_pkg.mod (No module named 'no_such_pkg')"),
    (["--lower-problem", "problems.anil:Nope"],
     "--lower-problem problems.anil:Nope: module problems.anil has no attribute Nope (it defines: ANILUnrolled, ANILImplicit)"),
    (["--lower-problem", "ANILUnrolled"],
     "--lower-problem ANILUnrolled: not an import path; write module.sub:ClassName (or module.sub.ClassName)"),
    (["--algo", "imaml", "--lower-problem", "problems.anil:ANILUnrolled"],
     "problems.anil.ANILUnrolled is not a subclass of problems.lower.ImplicitLower, which --algo imaml needs "
     "(problems.anil defines ANILImplicit, which is)"),
    (["--algo", "imaml", "--lower-problem", "problems.meta_sgd:MetaSGDLower"],
     "problems.meta_sgd.MetaSGDLower is not a subclass of problems.lower.ImplicitLower, which --algo imaml needs"),
    (["--lower-problem", "problems.head:head_names"], "is a function, not a class"),
    (["--lower-problem", "problems.meta_sgd:MetaSGDLower", "--upper-problem", "problems.upper:MetaInit"],
     "problems.upper.MetaInit is not a subclass of problems.meta_sgd.MetaSGDInit, which the Lower problem "
     "problems.meta_sgd.MetaSGDLower needs"),
    (["--env", "problems.upper:MetaInit"], "is not a subclass of envs.few_shot_env.FewShotEnv"),
    (["--model", "collections:OrderedDict"], "collections.OrderedDict is not a subclass of torch.nn.modules.module.Module"),
    (["--model", "my_ext.parts:WrongSignature"],
     "a model class is built as Class(input_shape, num_outputs, config)"),
    (["--algo", "imaml", "--hypergrad", "my_ext.parts:calls"], "is a dict, not a function"),
    (["--test-ways", "5"], "--test-ways 5: the Lower problem problems.lower.UnrolledLower adapts a head with --ways 3 "
                           "outputs, so it meta-tests only at 3 ways; a zero-initialized head adapts to any number: "
                           "--head-init zero"),
    (["--task", "sinusoid", "--ways", "none", "--test-ways", "5"], "--test-ways 5: only for classification tasks"),
]


@pytest.mark.parametrize("argv,message", BAD_PATHS, ids=[" ".join(a) for a, _ in BAD_PATHS])
def test_bad_extensions_stop_with_one_line(tmp_path, data_root, capsys, user_module, argv, message):
    code = main(_cli(data_root, tmp_path / "out", *argv))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_the_walk_through_in_the_docs_runs(tmp_path, data_root, monkeypatch):
    """docs/extending.md's example, copied out of the page: it imports, runs and is used."""
    code = re.search(r"<!-- example: (\w+)\.py -->\s*```python\n(.*?)```", DOCS.read_text(), re.S)
    assert code, "docs/extending.md lost its example block"
    (tmp_path / f"{code.group(1)}.py").write_text(textwrap.dedent(code.group(2)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(code.group(1))
    seen = []
    original = module.L1ProximalLower.training_step
    monkeypatch.setattr(module.L1ProximalLower, "training_step",
                        lambda self, batch: seen.append(self._training) or original(self, batch))
    out = tmp_path / "run"
    run_from_args(_cli(data_root, out, "--lower-problem", f"{code.group(1)}:L1ProximalLower"))
    assert seen.count(True) == 2 * 2 * 2 and (out / "results.json").is_file()


def test_every_import_path_in_the_docs_resolves():
    paths = re.findall(r"`((?:problems|envs|imaml)\.[\w.]+:\w+)`", DOCS.read_text())
    assert len(paths) >= 5
    for path in paths:
        module, name = path.split(":")
        assert hasattr(__import__(module, fromlist=[name]), name), path
