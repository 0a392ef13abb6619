#!/usr/bin/env python
"""Meta-train with iMAML or unrolled MAML, meta-test, and write <output-dir>/results.json.

    python run.py --algo imaml --task glyphs
    python run.py --algo maml --task sinusoid --shots 10
"""

import sys

from imaml.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
