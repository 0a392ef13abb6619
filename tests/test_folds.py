"""studies.folds: rows over proxy folds, with paired differences fold by fold."""

import json
import math

import pytest

from studies import folds


def _run(folder, scores, early=None, metric="accuracy"):
    folder.mkdir(parents=True)
    results = {"test": {"metric": metric, "scores": scores}, "meta_steps_done": 10, "total_seconds": 120.0}
    if early is not None:
        results["test_also_at"] = {"test": {"metric": metric, "scores": early}, "meta_steps_done": 4}
    (folder / "results.json").write_text(json.dumps(results))


def test_errors_per_fold_and_the_paired_difference_fold_by_fold(tmp_path):
    base = {"a": [1.0, 0.5, 1.0, 0.5], "b": [0.5, 0.5, 0.5, 0.5]}  # errors 25%, 50%
    other = {"a": [1.0, 1.0, 1.0, 0.5], "b": [1.0, 0.5, 0.5, 1.0]}  # errors 12.5%, 25%
    for fold in ("a", "b"):
        _run(tmp_path / "base" / fold, base[fold], early=[0.0] * 4)
        _run(tmp_path / "other" / fold, other[fold], early=[0.25] * 4)
    md = tmp_path / "t.md"
    table = folds.main(["--folds", "a", "b", "--row", f"base={tmp_path}/base/{{fold}}",
                        "--row", f"other={tmp_path}/other/{{fold}}", "--md", str(md),
                        "--json", str(tmp_path / "t.json")])
    assert table["base"]["errors"] == {"a": 0.25, "b": 0.5} and table["base"]["mean"] == 0.375
    assert table["base"]["worst"] == 0.5 and "difference" not in table["base"]
    d = table["other"]["difference"]
    assert d["mean"] == pytest.approx(-(0.125 + 0.25) / 2) and d["runs"] == 8  # error down 12.5 and 25 points
    sd = math.sqrt(2 * (0.25 - 0.1875) ** 2)  # the per-fold differences -0.125 and -0.25; t(1) = 12.706
    assert d["ci95_folds"] == pytest.approx(12.706 * sd / math.sqrt(2), rel=1e-3)
    text = md.read_text()
    assert "| other | 12.50% | 25.00% | **18.75%**" in text and "| base | 25.00% | 50.00% | **37.50%**" in text
    early = folds.main(["--folds", "a", "b", "--row", f"base={tmp_path}/base/{{fold}}",
                        "--row", f"other={tmp_path}/other/{{fold}}", "--at-test-also"])
    assert early["base"]["mean"] == 1.0 and early["other"]["mean"] == 0.75
    assert early["base"]["meta_steps"] == 4 and early["base"]["seconds"] is None  # θ at those seconds, no whole run


def test_a_missing_run_or_a_bad_row_is_one_line(tmp_path, capsys):
    _run(tmp_path / "base" / "a", [1.0])
    with pytest.raises(SystemExit, match=r"b/results.json is missing"):
        folds.main(["--folds", "a", "b", "--row", f"base={tmp_path}/base/{{fold}}"])
    with pytest.raises(SystemExit, match="has no meta-test at --test-also-at"):
        folds.main(["--folds", "a", "--row", f"base={tmp_path}/base/{{fold}}", "--at-test-also"])
    with pytest.raises(SystemExit):
        folds.main(["--folds", "a", "--row", "no-fold-in-it"])
    assert "LABEL=FOLDER with {fold}" in capsys.readouterr().err
    _run(tmp_path / "mse" / "a", [0.3], metric="mse")
    with pytest.raises(SystemExit, match="not accuracy"):
        folds.main(["--folds", "a", "--row", f"mse={tmp_path}/mse/{{fold}}"])


def test_a_row_can_be_a_lever_scored_by_lake_levers(tmp_path):
    setting = "--test-augment 32 --query-assignment independent"
    for fold, errors in (("a", {"run02": 0.5, "run01": 0.0}), ("b", {"run01": 0.25, "run02": 0.25})):
        _run(tmp_path / "base" / fold, [1.0, 0.0])  # errors 0 and 100% in run order
        levers = {setting: {f"runs/{fold}": {"error_rate": 0.0, "per_run_error": errors}}}
        (tmp_path / "base" / fold / "levers.json").write_text(json.dumps(levers))
    table = folds.main(["--folds", "a", "b", "--row", f"base={tmp_path}/base/{{fold}}",
                        "--row", f"views={tmp_path}/base/{{fold}}/levers.json::{setting}"])
    assert table["views"]["errors"] == {"a": 0.25, "b": 0.25}
    assert table["views"]["meta_steps"] == 10 and table["views"]["seconds"] == 120.0  # the scored run's
    # paired run by run, in run order: a's run01 0 → 0 and run02 100% → 50%; b's 0 → 25%, 100% → 25%
    assert table["views"]["difference"]["mean"] == pytest.approx(((0 - 0.5) / 2 + (0.25 - 0.75) / 2) / 2)
    with pytest.raises(SystemExit, match="has no setting 'K 8'"):
        folds.main(["--folds", "a", "--row", f"x={tmp_path}/base/{{fold}}/levers.json::K 8"])
