"""Import paths to user classes: ``--lower-problem my_pkg.module:MyLower`` and the like.

The one resolver for every extension point (Lower and Upper problems, the Env, the model,
the hypergradient solver). A path is ``module.sub:Name`` or ``module.sub.Name``; the
current directory is importable, so a project's own modules work when the CLI runs from it.
Every failure is a one-line ``UsageError`` that names the flag, the path and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Optional, Tuple

from imaml.errors import UsageError

__all__ = ["is_import_path", "split_import_path", "load_object", "load_class", "check_class", "qualname"]


def is_import_path(value: Optional[str]) -> bool:
    """True for ``module:Name`` / ``module.Name``; built-in names (``conv4``, ``cg``) have neither."""
    return isinstance(value, str) and (":" in value or "." in value)


def split_import_path(spec: str) -> Tuple[str, str]:
    """``"a.b:C"`` or ``"a.b.C"`` -> ``("a.b", "C")``; ValueError if it is not of that form."""
    module, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    parts = module.split(".") + attr.split(".")
    if not sep or not all(part.isidentifier() for part in parts):
        raise ValueError(f"{spec}: not an import path; write module.sub:ClassName (or module.sub.ClassName)")
    return module, attr


def qualname(obj: object) -> str:
    """``problems.lower.ImplicitLower``: how error messages name a class."""
    return f"{obj.__module__}.{obj.__qualname__}"


def load_object(spec: str, flag: str) -> object:
    """Import ``spec`` and return the object it names (a class, a function)."""
    try:
        module_name, attr = split_import_path(spec)
    except ValueError as err:
        raise UsageError(f"{flag} {err}") from None
    _current_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as err:
        raise UsageError(f"{flag} {spec}: cannot import module {module_name} ({_one_line(err)})") from None
    obj = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            defined = ", ".join(_classes_in(module)) or "no classes"
            raise UsageError(f"{flag} {spec}: module {module_name} has no attribute {attr} "
                             f"(it defines: {defined})")
        obj = getattr(obj, name)
    return obj


def load_class(spec: str, flag: str, base: type, needed_by: str = "") -> type:
    """The class ``spec`` names, checked to subclass ``base``."""
    return check_class(load_object(spec, flag), f"{flag} {spec}", base, needed_by)


def check_class(cls: object, what: str, base: type, needed_by: str = "") -> type:
    """``cls`` itself if it is a subclass of ``base``; else a UsageError naming the classes in
    its module that would fit. ``what`` is how the message names it (a flag and path, or a
    keyword argument); ``needed_by`` says why this base (``--algo imaml``)."""
    why = f", which {needed_by} needs" if needed_by else ""
    if not inspect.isclass(cls):
        raise UsageError(f"{what}: is a {type(cls).__name__}, not a class; expected a subclass of "
                         f"{qualname(base)}{why}")
    if issubclass(cls, base):
        return cls
    module = sys.modules.get(cls.__module__)
    fits = [name for name, c in _classes_in(module).items() if issubclass(c, base)] if module else []
    hint = f" ({module.__name__} defines {', '.join(fits)}, which is)" if fits else ""
    raise UsageError(f"{what}: {qualname(cls)} is not a subclass of {qualname(base)}{why}{hint}")


def _classes_in(module) -> dict:
    """The classes defined in ``module`` itself (not imported into it), by name."""
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__}


def _current_directory_importable() -> None:
    """Users run the CLI from their project directory; ``run.py`` and console scripts put
    their own directory on ``sys.path``, not the current one. Appended, so a local folder
    never shadows an installed package of the same name."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _one_line(err: BaseException) -> str:
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({os.path.basename(err.filename or '?')}, line {err.lineno})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__
