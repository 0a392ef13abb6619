"""run.py's flags in the benchmark scripts: one builder from ``RunConfig``, so that a script's
``--ways`` or ``--lam`` means what run.py's does (its help, type and choices), with the script's
own default (a measurement's size, not a training run's)."""

from __future__ import annotations

import argparse
from typing import Iterable

from imaml.config import FIELDS, field_type, flag

__all__ = ["add_run_flags"]


def add_run_flags(parser: argparse.ArgumentParser, several: Iterable[str] = (), required: Iterable[str] = (),
                  **defaults) -> None:
    """One flag per ``RunConfig`` field named in ``defaults`` (field name → this script's default);
    the fields in ``several`` take one or more values (one measurement each), those in
    ``required`` must be given."""
    several, required = set(several), set(required)
    for name, default in defaults.items():
        field = FIELDS[name]
        shown = "required" if name in required else " ".join(map(str, default)) if name in several else default
        kwargs = {"default": default, "required": name in required,
                  "help": field.metadata["help"].replace("%", "%%") + f" [{shown}]"}
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        typ = field_type(name)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            kwargs["metavar"] = name.split("_")[-1].upper()
        if name in several:
            kwargs["nargs"] = "+"
        parser.add_argument(flag(name), **kwargs)
