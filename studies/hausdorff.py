"""The Omniglot release's own baseline on Lake's one-shot runs: the Modified Hausdorff
Distance (Dubuisson & Jain, 1994) between the inked pixels of each test item and of each
training image, centred on their mean; an item goes to the closest class. Its demo script
reports 38.8% errors on the official runs. Run it on any data root in the official format,
e.g. the proxy runs of ``studies.lake_proxy``, to put a network's error beside it:

    python -m studies.hausdorff --data-root data/lake-proxy-korean
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from envs.omniglot import read_runs

__all__ = ["ink_points", "modified_hausdorff", "run_errors", "main"]


def ink_points(image: torch.Tensor) -> np.ndarray:
    """[n, 2] coordinates of the inked pixels (ink high), minus their mean."""
    points = np.argwhere(image.reshape(image.shape[-2:]).numpy() > 127).astype(float)
    return points - points.mean(axis=0)


def modified_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """max(mean over a of the distance to b, mean over b of the distance to a); nearest
    neighbours by k-d tree (the demo's dense distance matrix gives the same, slower)."""
    from scipy.spatial import cKDTree

    return max(cKDTree(b).query(a)[0].mean(), cKDTree(a).query(b)[0].mean())


def run_errors(root) -> dict:
    """{run: error rate} of the baseline on the runs under ``root``, on the 105×105 files."""
    errors = {}
    for run in read_runs(root, size=None):
        training = [ink_points(x) for x in run.training]
        predicted = [int(np.argmin([modified_hausdorff(ink_points(item), t) for t in training])) for item in run.test]
        errors[run.name] = float(np.mean(np.array(predicted) != run.labels.numpy()))
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="holds omniglot-py/all_runs(.zip)")
    errors = run_errors(parser.parse_args(argv).data_root)
    for name, error in errors.items():
        print(f"{name}: {error * 100:.1f}% errors")
    print(f"mean over {len(errors)} runs: {np.mean(list(errors.values())) * 100:.2f}% errors")


if __name__ == "__main__":
    main()
