"""Throughput and memory benchmarks: this project's engine against a Betty reference and a
plain PyTorch loop doing the same math (see docs/performance.md)."""
