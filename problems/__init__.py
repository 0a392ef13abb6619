"""The two levels of the bilevel problem, as Betty problems."""

from problems.lower import ImplicitLower, LowerConfig, UnrolledLower
from problems.upper import MetaInit

__all__ = ["MetaInit", "ImplicitLower", "UnrolledLower", "LowerConfig"]
