"""Other libraries' implementations of our methods on run.py's tasks and network: the peer rows of
``studies.compare`` (``common.py`` has what they share)."""
