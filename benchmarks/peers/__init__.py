"""Other libraries' implementations of our methods on run.py's tasks and network: the peer rows of
``benchmarks.compare`` (``common.py`` has what they share)."""
