"""The two levels of the bilevel problem, as Betty problems."""

from problems.lower import ImplicitLower, LowerConfig, UnrolledLower
from problems.upper import MetaInit
from problems.vectorized import VectorizedImplicitLower, VectorizedUnrolledLower

__all__ = ["MetaInit", "ImplicitLower", "UnrolledLower", "LowerConfig", "VectorizedImplicitLower",
           "VectorizedUnrolledLower"]
