"""A stand-in for Lake's 20 one-shot runs, built from alphabets held out of a background set.

The official runs (``all_runs.zip``) draw on the evaluation alphabets. Where only a background
set is at hand (``images_background_small1.zip`` on these machines), this holds some of its
alphabets out and writes, under ``--out``:

- ``omniglot-py/<set>.zip``: the background set without the held-out alphabets (the original
  PNG bytes, copied), so meta-training never sees them;
- ``omniglot-py/all_runs.zip``: 20 runs in the official format, from the held-out alphabets.
  As in Lake's runs, each run takes 20 characters of one alphabet; its training images are
  all by one drawer and its test items by another, in a random order, with
  ``class_labels.txt`` saying which class each item is.

Then ``python run.py --task omniglot-lake --data-root OUT ...`` runs the real protocol on it:

    python -m studies.lake_proxy --source ../shared/data/omniglot/images_background_small1.zip \\
        --hold-out Korean --out data/lake-proxy-korean
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["build_proxy", "build_sets", "main"]


def _characters(zf: zipfile.ZipFile, set_name: str) -> Dict[str, Dict[str, List[str]]]:
    """{alphabet: {character: [png members sorted by drawer]}}."""
    pattern = re.compile(rf"{re.escape(set_name)}/([^/]+)/([^/]+)/[^/]+\.png$")
    found: Dict[str, Dict[str, List[str]]] = {}
    for member in zf.namelist():
        match = pattern.match(member)
        if match:
            found.setdefault(match.group(1), {}).setdefault(match.group(2), []).append(member)
    return {a: {c: sorted(files) for c, files in chars.items()} for a, chars in found.items()}


def build_proxy(source: Path, hold_out: Sequence[str], out: Path, runs: int = 20, ways: int = 20,
                seed: int = 0) -> dict:
    """Write the reduced background zip and the proxy all_runs.zip; return what was written."""
    set_name = source.name[: -len(".zip")]
    folder = out / "omniglot-py"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zf:
        alphabets = _characters(zf, set_name)
        unknown = [a for a in hold_out if a not in alphabets]
        if unknown:
            raise SystemExit(f"--hold-out {', '.join(unknown)}: not an alphabet of {source.name}; "
                             f"choose from {', '.join(sorted(alphabets))}")
        small = [a for a in hold_out if len(alphabets[a]) < ways]
        if small:
            raise SystemExit(f"--hold-out {small[0]}: {len(alphabets[small[0]])} characters, a run needs {ways}")
        held = {m for a in hold_out for files in alphabets[a].values() for m in files}
        with zipfile.ZipFile(folder / source.name, "w", zipfile.ZIP_STORED) as kept:
            for member in zf.namelist():
                if member not in held and not any(member.startswith(f"{set_name}/{a}/") for a in hold_out):
                    kept.writestr(member, zf.read(member))
        rng = np.random.default_rng(seed)
        written = []
        with zipfile.ZipFile(folder / "all_runs.zip", "w", zipfile.ZIP_STORED) as runs_zip:
            for r in range(1, runs + 1):
                name = f"run{r:02d}"
                alphabet = hold_out[(r - 1) % len(hold_out)]
                characters = sorted(alphabets[alphabet])
                chosen = [characters[i] for i in rng.permutation(len(characters))[:ways]]
                train_drawer, test_drawer = rng.permutation(20)[:2]
                order = rng.permutation(ways)  # item k shows class order[k]
                lines = []
                for j, character in enumerate(chosen, start=1):
                    runs_zip.writestr(f"all_runs/{name}/training/class{j:02d}.png",
                                      zf.read(alphabets[alphabet][character][train_drawer]))
                for k, cls in enumerate(order, start=1):
                    runs_zip.writestr(f"all_runs/{name}/test/item{k:02d}.png",
                                      zf.read(alphabets[alphabet][chosen[cls]][test_drawer]))
                    lines.append(f"{name}/test/item{k:02d}.png {name}/training/class{cls + 1:02d}.png")
                runs_zip.writestr(f"all_runs/{name}/class_labels.txt", "\n".join(lines) + "\n")
                written.append({"run": name, "alphabet": alphabet})
    kept_alphabets = sorted(set(alphabets) - set(hold_out))
    return {"background": str(folder / source.name), "kept_alphabets": kept_alphabets,
            "kept_characters": sum(len(alphabets[a]) for a in kept_alphabets),
            "runs": str(folder / "all_runs.zip"), "held_out": list(hold_out), "run_alphabets": written}


def build_sets(source: Path, evaluation: Sequence[str], out: Path) -> dict:
    """Write ``omniglot-py/images_background.zip`` (the source's other alphabets) and
    ``images_evaluation.zip`` (``evaluation``), the original PNG bytes under the official
    folder names, so ``--task omniglot`` (the MAML split of both sets) runs on a minimal set."""
    set_name = source.name[: -len(".zip")]
    folder = out / "omniglot-py"
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"images_background": 0, "images_evaluation": 0}
    with zipfile.ZipFile(source) as zf:
        alphabets = _characters(zf, set_name)
        unknown = [a for a in evaluation if a not in alphabets]
        if unknown:
            raise SystemExit(f"--evaluation {', '.join(unknown)}: not an alphabet of {source.name}; "
                             f"choose from {', '.join(sorted(alphabets))}")
        writers = {name: zipfile.ZipFile(folder / f"{name}.zip", "w", zipfile.ZIP_STORED) for name in counts}
        try:
            for alphabet, characters in sorted(alphabets.items()):
                name = "images_evaluation" if alphabet in evaluation else "images_background"
                counts[name] += len(characters)
                for character, files in characters.items():
                    for member in files:
                        writers[name].writestr(f"{name}/{alphabet}/{character}/{Path(member).name}", zf.read(member))
        finally:
            for w in writers.values():
                w.close()
    return {"folder": str(folder), "characters": counts}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="an official background-set zip")
    parser.add_argument("--hold-out", required=True, help="alphabets to hold out, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="the data root to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--as-sets", action="store_true",
                        help="instead write images_background.zip and images_evaluation.zip (the held-out "
                             "alphabets) for --task omniglot")
    args = parser.parse_args(argv)
    if args.as_sets:
        summary = build_sets(args.source, [a.strip() for a in args.hold_out.split(",") if a.strip()], args.out)
        print(f"wrote {summary['folder']}: characters {summary['characters']}")
        return
    summary = build_proxy(args.source, [a.strip() for a in args.hold_out.split(",") if a.strip()], args.out,
                          seed=args.seed)
    print(f"kept {summary['kept_characters']} characters of {', '.join(summary['kept_alphabets'])} in "
          f"{summary['background']}; 20 runs from {', '.join(summary['held_out'])} in {summary['runs']}")


if __name__ == "__main__":
    main()
