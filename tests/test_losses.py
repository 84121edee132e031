"""DPO loss against hand-computed values (arithmetic in the docstrings)."""

import math

import pytest
import torch

from sdpo.losses import LOSSES, get_loss, preference_loss, preference_metrics

T = torch.tensor


def test_sigmoid_check_value():
    """beta = 0.1; policy -10/-12, reference -11/-11 -> rho = (1) - (-1) = 2, beta*rho = 0.2.
    -log sigma(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139."""
    loss = preference_loss("sigmoid", T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]), beta=0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_label_smoothing_is_cdpo():
    """eps = 0.1: 0.9 * (-log sigma(0.2)) + 0.1 * (-log sigma(-0.2)) = 0.9*0.598139 + 0.1*0.798139 = 0.618139."""
    loss = preference_loss("sigmoid", T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]), beta=0.1,
                           label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.618139, abs=1e-6)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_policy_equal_to_reference_gives_ln2(beta):
    logps = torch.randn(8) * 50
    other = torch.randn(8) * 50
    loss = preference_loss("sigmoid", logps, other, logps.clone(), other.clone(), beta=beta)
    assert torch.allclose(loss, torch.full((8,), math.log(2)), atol=1e-6)


def test_loss_is_unreduced_and_decreases_with_margin():
    rho = torch.linspace(-5, 5, 11)
    zeros = torch.zeros(11)
    loss = preference_loss("sigmoid", rho, zeros, zeros, zeros, beta=0.5)
    assert loss.shape == (11,)
    assert torch.all(loss[1:] < loss[:-1])


def test_gradients_finite_at_extreme_margins():
    chosen = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    preference_loss("sigmoid", chosen, zeros, zeros, zeros, beta=1.0).sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_metrics_use_trl_names_and_are_detached():
    chosen = torch.tensor([-10.0, -5.0], requires_grad=True)
    m = preference_metrics(chosen, T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0]), beta=0.1)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}
    assert all(not v.requires_grad for v in m.values())
    # pair 0: rewards 0.1*(1) = 0.1 and 0.1*(-1) = -0.1; pair 1: 0.0 and 0.1
    assert torch.allclose(m["rewards/chosen"], T([0.1, 0.0]))
    assert torch.allclose(m["rewards/rejected"], T([-0.1, 0.1]))
    assert torch.allclose(m["rewards/margins"], T([0.2, -0.1]))
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_unknown_loss_and_option_are_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, gamma=1.0)


def test_registry_declares_needs():
    assert LOSSES["sigmoid"].needs_reference and not LOSSES["sigmoid"].mean_logps
