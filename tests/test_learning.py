"""Meta-training has to buy something: short sinusoid runs must beat their own initialization."""

import pytest

from imaml.app.cli import run_from_args


# the task's presets, shortened
SHORT = {"maml": ["--meta-steps", "300", "--meta-lr", "0.003"],
         "imaml": ["--meta-steps", "200", "--inner-steps", "5"]}


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_meta_training_lowers_sinusoid_test_mse(tmp_path, data_root, algo):
    results = run_from_args([
        "--task", "sinusoid", "--algo", algo, "--shots", "10", "--meta-batch-size", "10",
        "--test-tasks", "100", "--val-every", "1000", "--log-every", "50", *SHORT[algo],
        "--data-root", data_root, "--output-dir", str(tmp_path / algo)])
    before, after = results["before_meta_training"], results["test"]
    assert after["metric"] == "mse"
    # clearly lower: the intervals do not overlap
    assert after["mean"] + after["ci95"] < before["mean"] - before["ci95"], (before, after)
