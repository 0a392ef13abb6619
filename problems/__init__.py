"""The two levels of the bilevel problem, as Betty problems."""

from problems.lower import ImplicitLower, LowerConfig, UnrolledLower
from problems.upper import MetaInit, UpperConfig

__all__ = ["MetaInit", "UpperConfig", "ImplicitLower", "UnrolledLower", "LowerConfig"]
