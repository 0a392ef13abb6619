"""--activation: the conv and MLP nonlinearity, smooth (SiLU) where iMAML needs a Hessian that
does not jump (docs/meta-gradients.md), ReLU by default, recorded with the run's protocol."""

import json

import pytest
import torch
from torch import nn

from imaml import config as config_module
from imaml.app.cli import main
from imaml.models import ACTIVATIONS, build_model


def test_the_cli_offers_exactly_the_models_activations():
    assert tuple(ACTIVATIONS) == config_module.ACTIVATIONS


@pytest.mark.parametrize("name,shape", [("conv4", (1, 28, 28)), ("conv4-strided", (1, 28, 28)), ("mlp", (1,))])
def test_every_nonlinearity_of_the_network_is_the_one_asked_for(name, shape):
    relu = build_model(name, shape, 5, channels=4)
    silu = build_model(name, shape, 5, channels=4, activation="silu")
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.SiLU))}  # noqa: E731
    assert kinds(relu) == {nn.ReLU} and kinds(silu) == {nn.SiLU}
    counts = [sum(isinstance(m, kind) for m in model.modules()) for model, kind in ((relu, nn.ReLU), (silu, nn.SiLU))]
    assert counts[0] == counts[1] == (2 if name == "mlp" else 4)
    # same parameters, so a checkpoint of one loads into the other
    assert [p.shape for p in relu.parameters()] == [p.shape for p in silu.parameters()]
    silu.load_state_dict(relu.state_dict())


def test_silu_makes_the_support_gradient_continuous_where_relu_jumps():
    """Why the option exists: across a ReLU kink the gradient jumps by a finite amount however
    small the step; with SiLU it changes in proportion to the step."""
    x, w2 = torch.zeros(1, 1), torch.ones(1, 1)
    for name, expect_jump in (("relu", True), ("silu", False)):
        act = ACTIVATIONS[name]()
        grads = []
        for bias in (-1e-4, 1e-4):  # either side of the kink at 0
            b = torch.tensor([bias], requires_grad=True)
            (w2 @ act(x + b)).sum().backward()
            grads.append(float(b.grad))
        jump = abs(grads[1] - grads[0])
        assert (jump > 0.5) == expect_jump, (name, grads)


@pytest.mark.parametrize("argv,message", [
    (["--activation", "gelu"], "argument --activation: invalid choice: 'gelu'"),
    (["--activation", "silu", "--model", "resnet12", "--task", "glyphs"], "--activation silu: resnet12 keeps its leaky ReLUs"),
])
def test_a_bad_activation_stops_with_one_line(tmp_path, data_root, capsys, argv, message):
    code = main(["--data-root", data_root, "--output-dir", str(tmp_path / "out"), "--meta-steps", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_protocol_records_the_activation(tmp_path, data_root):
    out = tmp_path / "out"
    code = main(["--task", "sinusoid", "--algo", "imaml", "--activation", "silu", "--meta-steps", "1",
                 "--meta-batch-size", "2", "--test-tasks", "2", "--val-tasks", "2", "--inner-steps", "2",
                 "--test-inner-steps", "2", "--processes", "1", "--data-root", data_root, "--output-dir", str(out)])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["protocol"]["activation"] == "silu"
