"""The environment scripts/setup-env.sh builds: the stack imports with nothing special.

torch and torchvision must be a matched pair (torchvision pins one torch release), or
torchvision's compiled library cannot load and ``import torchvision`` (so ``import
learn2learn``) fails. These checks run the imports in a fresh interpreter that never sees the
project's modules, as a user's own script, a notebook or learn2learn's examples would.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what a user's script does: the compiled ops (PNG codec, nms) included
USER_SCRIPT = r"""
import sys
import torch, torchvision, learn2learn
from torchvision import transforms
image = (torch.rand(3, 8, 8) * 255).to(torch.uint8)
assert torch.equal(torchvision.io.decode_png(torchvision.io.encode_png(image)), image)
boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.1], [5.0, 5.0, 6.0, 6.0]])
assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
assert transforms.ToTensor()(transforms.ToPILImage()(image)).shape == (3, 8, 8)
learn2learn.algorithms.MAML(torch.nn.Linear(2, 2), lr=0.1).clone()
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("imaml", "envs", "problems", "engines"))
assert not ours, ours
print("ok")
"""


def test_torchvision_and_learn2learn_import_in_a_plain_interpreter(tmp_path):
    # -I: isolated mode (no PYTHONPATH, no current directory on sys.path); cwd: away from the checkout
    done = subprocess.run([sys.executable, "-I", "-c", USER_SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_set_up_script_and_the_readme_name_the_same_pair():
    script = (ROOT / "scripts" / "setup-env.sh").read_text()
    torch_version = re.search(r"^TORCH=([\w.]+)", script, re.M).group(1)
    vision_version = re.search(r"\bTORCHVISION=([\w.]+)", script).group(1)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Installation"):]
    assert f"| torch | {torch_version}" in table and f"| torchvision | {vision_version}" in table
    assert "imaml.compat" not in script and not (ROOT / "imaml" / "compat.py").exists()
