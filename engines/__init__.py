"""Orchestration: the Betty engine and the builder that wires a run."""

from engines.build import build_engine
from engines.meta_engine import MetaEngine

__all__ = ["MetaEngine", "build_engine"]
