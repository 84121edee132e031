"""The preference-loss family against hand-computed values (arithmetic in the docstrings) and properties.

Notation (as in sdpo.losses and the notes): h(y) = log pi(y|x) - log pi_ref(y|x), rho = h(y_w) - h(y_l),
z = beta * rho, sigma the logistic function, -log sigma(x) = log(1 + e^-x) = softplus(-x).

Tolerances: float32 has a unit roundoff of 6e-8, and these losses take a handful of operations on values
of order 1, so a float32 result is within ~1e-6 abs of the exact one (values of order 10 are compared
with rel=1e-6 instead). Identities that hold exactly in real arithmetic are checked in float64 at 1e-9.
"""

import math

import pytest
import torch

from sdpo.losses import (
    LOSSES,
    get_loss,
    listwise_loss,
    preference_loss,
    preference_metrics,
    resolve_options,
)

T = torch.tensor
F64 = torch.float64
LN2 = math.log(2)
PAIRWISE = sorted(n for n, s in LOSSES.items() if not s.listwise)
LISTWISE = sorted(n for n, s in LOSSES.items() if s.listwise)


def softplus(x: float) -> float:
    """log(1 + e^x) in float64; -log sigma(x) = softplus(-x)."""
    return math.log1p(math.exp(x))


def check_point(loss_type: str, **options) -> torch.Tensor:
    """The notes' check point: beta 0.1; policy -10 / -12, reference -11 / -11 -> rho = 1 - (-1) = 2, z = 0.2."""
    return preference_loss(loss_type, T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]), beta=0.1, **options)


def test_registry_splits_pairwise_and_listwise():
    """Guard for the parametrisations below: the families are what this file was written against."""
    assert PAIRWISE == ["dpop", "exponential", "hinge", "ipo", "nca_pair", "robust", "savage", "sigmoid",
                        "simpo", "truncated_quadratic"]
    assert LISTWISE == ["infonca", "nca"]


# --------------------------------------------------------------------------------------------------
# 1. Hand-computed values at the check point
# --------------------------------------------------------------------------------------------------
def test_sigmoid_check_value():
    """beta = 0.1; policy -10/-12, reference -11/-11 -> rho = (1) - (-1) = 2, beta*rho = 0.2.
    -log sigma(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139."""
    loss = check_point("sigmoid")
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_label_smoothing_is_cdpo():
    """eps = 0.1: 0.9 * (-log sigma(0.2)) + 0.1 * (-log sigma(-0.2)) = 0.9*0.598139 + 0.1*0.798139 = 0.618139.
    (-log sigma(-0.2) = log(1 + e^0.2) = 0.2 + log(1 + e^-0.2) = 0.798139.)"""
    assert check_point("sigmoid", label_smoothing=0.1).item() == pytest.approx(0.618139, abs=1e-6)
    # eps = 0 is plain DPO
    assert check_point("sigmoid", label_smoothing=0.0).item() == pytest.approx(0.598139, abs=1e-6)


def test_hinge_check_value():
    """max(0, 1 - z) = 1 - 0.2 = 0.8."""
    assert check_point("hinge").item() == pytest.approx(0.8, abs=1e-6)


def test_nca_pair_check_value():
    """c = beta h(y_w) = 0.1 * (-10 + 11) = 0.1, r = beta h(y_l) = 0.1 * (-12 + 11) = -0.1.
    -log sigma(c) = log(1 + e^-0.1) = log(1.904837) = 0.644397;
    -log sigma(-c) = log(1 + e^0.1) = 0.1 + 0.644397 = 0.744397;
    -log sigma(-r) = -log sigma(0.1) = 0.644397.
    Loss = 0.644397 + 0.5 * 0.744397 + 0.5 * 0.644397 = 0.644397 + 0.372198 + 0.322198 = 1.338793."""
    assert check_point("nca_pair").item() == pytest.approx(1.338793, abs=1e-6)


def test_robust_check_value():
    """eps = 0.1: [-(1 - eps) log sigma(0.2) + eps log sigma(-0.2)] / (1 - 2 eps)
    = [0.9 * 0.598139 - 0.1 * 0.798139] / 0.8 = [0.538325 - 0.079814] / 0.8 = 0.458511 / 0.8 = 0.573139.
    0.1 is robust's default, so passing it or not gives the same value."""
    assert check_point("robust", label_smoothing=0.1).item() == pytest.approx(0.573139, abs=1e-6)
    assert check_point("robust").item() == pytest.approx(0.573139, abs=1e-6)


def test_robust_other_rate():
    """eps = 0.2: [0.8 * 0.598139 - 0.2 * 0.798139] / 0.6 = [0.478511 - 0.159628] / 0.6 = 0.318883 / 0.6
    = 0.531472 — differs from eps = 0.1, so the option is really used."""
    expected = (0.8 * softplus(-0.2) - 0.2 * softplus(0.2)) / 0.6
    assert expected == pytest.approx(0.531472, abs=1e-6)
    assert check_point("robust", label_smoothing=0.2).item() == pytest.approx(expected, abs=1e-6)


def test_exponential_check_value():
    """e^-z = e^-0.2 = 0.818731."""
    assert check_point("exponential").item() == pytest.approx(math.exp(-0.2), abs=1e-6)
    assert math.exp(-0.2) == pytest.approx(0.818731, abs=1e-6)


def test_truncated_quadratic_check_value():
    """max(0, 1 - z)^2 = 0.8^2 = 0.64."""
    assert check_point("truncated_quadratic").item() == pytest.approx(0.64, abs=1e-6)


def test_savage_check_value():
    """1 / (1 + e^z)^2 = 1 / (1 + 1.221403)^2 = 1 / 2.221403^2 = 1 / 4.934630 = 0.202649."""
    expected = 1 / (1 + math.exp(0.2)) ** 2
    assert expected == pytest.approx(0.202649, abs=1e-6)
    assert check_point("savage").item() == pytest.approx(expected, abs=1e-6)


def test_ipo_check_value():
    """IPO takes the rho of (per-token average) log-probs as given: (rho - 1/(2 beta))^2 = (2 - 1/0.2)^2
    = (2 - 5)^2 = 9. Not a function of z = beta*rho: beta 0.5 gives (2 - 1)^2 = 1."""
    assert check_point("ipo").item() == pytest.approx(9.0, rel=1e-6)
    loss = preference_loss("ipo", T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]), beta=0.5)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_dpop_chosen_above_reference_is_dpo():
    """Chosen -10 >= reference chosen -11: penalty max(0, -11 - (-10)) = max(0, -1) = 0, so DPOP is
    -log sigma(0.1 * (2 - 50 * 0)) = -log sigma(0.2) = 0.598139 (the sigmoid value), whatever lambda."""
    assert check_point("dpop").item() == pytest.approx(0.598139, abs=1e-6)
    assert check_point("dpop", dpop_lambda=1000.0).item() == pytest.approx(0.598139, abs=1e-6)


def test_dpop_chosen_below_reference_is_penalised():
    """Policy -12 / -14, reference -11 / -11: h_w = -1, h_l = -3, rho = -1 - (-3) = 2 (DPO: 0.598139).
    Penalty = max(0, log pi_ref(y_w) - log pi(y_w)) = max(0, -11 - (-12)) = 1; lambda = 50:
    z = 0.1 * (2 - 50 * 1) = -4.8; -log sigma(-4.8) = log(1 + e^4.8) = 4.8 + log(1 + e^-4.8)
    = 4.8 + log(1.008230) = 4.8 + 0.008196 = 4.808196.
    lambda = 0 switches the penalty off: back to 0.598139; lambda = 10: z = 0.1*(2 - 10) = -0.8,
    log(1 + e^0.8) = log(3.225541) = 1.171101."""
    args = (T([-12.0]), T([-14.0]), T([-11.0]), T([-11.0]))
    assert preference_loss("dpop", *args, beta=0.1).item() == pytest.approx(4.808196, rel=1e-6)
    assert preference_loss("dpop", *args, beta=0.1, dpop_lambda=0.0).item() == pytest.approx(0.598139, abs=1e-6)
    assert preference_loss("dpop", *args, beta=0.1, dpop_lambda=10.0).item() == pytest.approx(
        softplus(0.8), abs=1e-6)
    assert softplus(0.8) == pytest.approx(1.171101, abs=1e-6)
    # plain DPO does not see the fall of the chosen likelihood
    assert preference_loss("sigmoid", *args, beta=0.1).item() == pytest.approx(0.598139, abs=1e-6)


def test_simpo_check_value_and_reference_free():
    """SimPO on (average) log-probs -10 / -12, beta 0.1, gamma 0.5 (default):
    -log sigma(0.1 * (-10 - (-12)) - 0.5) = -log sigma(0.2 - 0.5) = -log sigma(-0.3) = log(1 + e^0.3)
    = log(2.349859) = 0.854355. gamma = 0: -log sigma(0.2) = 0.598139. gamma = 1: log(1 + e^0.8) = 1.171101.
    The reference arguments are ignored: any values give the same loss."""
    c, r = T([-10.0]), T([-12.0])
    base = preference_loss("simpo", c, r, T([-11.0]), T([-11.0]), beta=0.1)
    assert base.item() == pytest.approx(0.854355, abs=1e-6)
    assert softplus(0.3) == pytest.approx(0.854355, abs=1e-6)
    for rc, rr in [(0.0, 0.0), (-3.0, 40.0), (1e4, -1e4), (-7.5, -100.0)]:
        other = preference_loss("simpo", c, r, T([rc]), T([rr]), beta=0.1)
        assert other.item() == base.item()  # exactly: the reference never enters the computation
    assert preference_loss("simpo", c, r, T([0.0]), T([0.0]), beta=0.1, simpo_gamma=0.0).item() == pytest.approx(
        0.598139, abs=1e-6)
    assert preference_loss("simpo", c, r, T([0.0]), T([0.0]), beta=0.1, simpo_gamma=1.0).item() == pytest.approx(
        1.171101, abs=1e-6)


def test_every_pairwise_loss_is_unreduced_and_rowwise():
    """[B] in, [B] out, and row i depends on row i only: a batch equals its rows computed one at a time."""
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(6, generator=g, dtype=F64) * 5 for _ in range(4))
    for name in PAIRWISE:
        batch = preference_loss(name, c, r, rc, rr, beta=0.3)
        assert batch.shape == (6,), name
        single = torch.cat([preference_loss(name, c[i:i + 1], r[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta=0.3)
                            for i in range(6)])
        assert torch.allclose(batch, single, atol=1e-12, rtol=0), name


# --------------------------------------------------------------------------------------------------
# 2. Listwise check values
# --------------------------------------------------------------------------------------------------
R_THETA = [0.2, 0.0, -0.1, -0.3]
REWARDS = [8.0, 6.0, 5.0, 3.0]


def listwise_check_point(loss_type: str, alpha: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """r_theta = beta * (logps - ref) with beta 0.1, ref 0 and logps = r_theta / 0.1 = [2, 0, -1, -3]."""
    logps = T([[2.0, 0.0, -1.0, -3.0]], dtype=dtype)
    return listwise_loss(loss_type, logps, torch.zeros_like(logps), T([REWARDS], dtype=dtype), beta=0.1,
                         alpha=alpha)


def test_infonca_check_value():
    """p = softmax([8, 6, 5, 3]) = [1, e^-2, e^-3, e^-5] / (1 + 0.135335 + 0.049787 + 0.006738)
    = [0.839025, 0.113550, 0.041773, 0.005653].
    log softmax(r_theta): logsumexp([0.2, 0, -0.1, -0.3]) = log(1.221403 + 1 + 0.904837 + 0.740818)
    = log(3.867058) = 1.352494, so log q = [-1.152494, -1.352494, -1.452494, -1.652494].
    InfoNCA = 0.839025*1.152494 + 0.113550*1.352494 + 0.041773*1.452494 + 0.005653*1.652494
    = 0.966971 + 0.153576 + 0.060675 + 0.009342 = 1.190562 (to rounding)."""
    loss = listwise_check_point("infonca")
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(1.190562, abs=1e-6)


def test_nca_check_value():
    """p as above; log sigma(r_theta) = [-0.598139, -0.693147, -0.744397, -0.854355],
    log sigma(-r_theta) = [-0.798139, -0.693147, -0.644397, -0.554355].
    sum_i p_i (-log sigma(r_i)) = 0.839025*0.598139 + 0.113550*0.693147 + 0.041773*0.744397
    + 0.005653*0.854355 = 0.501854 + 0.078707 + 0.031096 + 0.004830 = 0.616487;
    (1/4) sum_i -log sigma(-r_i) = (0.798139 + 0.693147 + 0.644397 + 0.554355) / 4 = 2.690038 / 4 = 0.672509.
    NCA = 0.616487 + 0.672509 = 1.288996 ~ 1.288995 (notes' value, exact 1.2889945)."""
    loss = listwise_check_point("nca")
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(1.288995, abs=1e-6)


@pytest.mark.parametrize("loss_type", LISTWISE)
def test_listwise_depends_on_log_ratio_only(loss_type):
    """r_theta = beta (logps - ref): shifting logps and ref by the same amounts leaves the loss unchanged."""
    ref = T([[-40.0, -7.0, -123.0, -55.5]], dtype=F64)
    logps = ref + T([[2.0, 0.0, -1.0, -3.0]], dtype=F64)
    loss = listwise_loss(loss_type, logps, ref, T([REWARDS], dtype=F64), beta=0.1)
    expected = {"infonca": 1.1905624602078129, "nca": 1.2889945481633123}[loss_type]  # float64 values of the above
    # 1e-6, not 1e-9, although the inputs are float64: the targets softmax(rewards / alpha) are computed in
    # float32 whatever the input dtype (`rewards.float()` in _targets), which costs ~5e-8.
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_listwise_alpha_limits_and_direction():
    """alpha is the temperature of the targets p = softmax(r / alpha).
    alpha -> 0: p -> one-hot on the best response (r = 8): InfoNCA -> -log q_0 = 1.152494,
    NCA -> -log sigma(0.2) + 0.672509 = 0.598139 + 0.672509 = 1.270648.
    alpha -> inf: p -> uniform: InfoNCA -> mean(-log q) = (1.152494 + 1.352494 + 1.452494 + 1.652494)/4
    = 1.402494; NCA -> (0.598139 + 0.693147 + 0.744397 + 0.854355)/4 + 0.672509 = 0.722510 + 0.672509
    = 1.395019.
    In between the loss is strictly increasing in alpha: d E_p[g] / d(1/alpha) = Cov_p(r, g), and here
    g = log q_i (InfoNCA) and g = log sigma(r_theta_i) (NCA) are both ordered like the rewards, so the
    covariance is > 0 (Chebyshev's sum inequality): a colder target puts more weight on the responses
    the model already ranks highest, and the loss falls."""
    alphas = [1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 1e5]
    for name, cold, hot in [("infonca", 1.152494, 1.402494), ("nca", 1.270648, 1.395019)]:
        values = [listwise_check_point(name, alpha=a, dtype=F64).item() for a in alphas]
        assert all(b > a for a, b in zip(values, values[1:], strict=False)), (name, values)
        assert values[0] == pytest.approx(cold, abs=1e-6), name
        assert values[-1] == pytest.approx(hot, abs=1e-4), name  # alpha = 1e5: p is uniform to ~1e-5


@pytest.mark.parametrize("loss_type", LISTWISE)
@pytest.mark.parametrize("pad", [0.0, 1e4, -1e4, 123.0, float("inf"), float("-inf"), float("nan")])
def test_listwise_mask_ignores_padded_slot(loss_type, pad):
    """A [1, 5] row whose 5th slot is masked out equals the [1, 4] check point (1.190562 / 1.288995), whatever
    sits in the padded slot of logps, ref_logps and rewards (even inf / nan). NCA's 1/K uses the real K = 4
    (with K = 5 the (1/K) sum would be 2.690038/5 + ... != 1.288995)."""
    logps = T([[2.0, 0.0, -1.0, -3.0, pad]])
    ref = T([[0.0, 0.0, 0.0, 0.0, pad / 3]])
    rewards = T([REWARDS + [pad * 7]])
    mask = T([[True, True, True, True, False]])
    loss = listwise_loss(loss_type, logps, ref, rewards, beta=0.1, mask=mask)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(listwise_check_point(loss_type).item(), abs=1e-6)


@pytest.mark.parametrize("loss_type", LISTWISE)
def test_listwise_mask_ragged_batch_and_padding_gets_no_gradient(loss_type):
    """Row 0 has K = 4 (slot 4 padded), row 1 has K = 5: each row equals its own unpadded computation, and the
    padded slot gets an exactly zero gradient (it must not be pushed up or down by training)."""
    g = torch.Generator().manual_seed(1)
    logps = (torch.randn(2, 5, generator=g, dtype=F64) * 10).requires_grad_(True)
    ref = torch.randn(2, 5, generator=g, dtype=F64) * 10
    rewards = torch.randn(2, 5, generator=g, dtype=F64) * 3
    mask = T([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = listwise_loss(loss_type, logps, ref, rewards, beta=0.1, mask=mask)
    row0 = listwise_loss(loss_type, logps[:1, :4], ref[:1, :4], rewards[:1, :4], beta=0.1)
    row1 = listwise_loss(loss_type, logps[1:], ref[1:], rewards[1:], beta=0.1)
    assert torch.allclose(loss, torch.cat([row0, row1]), atol=1e-12, rtol=0)
    loss.sum().backward()
    assert logps.grad[0, 4].item() == 0.0
    assert (logps.grad[:, :4] != 0).all()


def test_listwise_mask_accepts_integer_mask():
    """A 0/1 integer mask means the same as a bool mask."""
    logps = T([[2.0, 0.0, -1.0, -3.0, 9.0]])
    zeros = torch.zeros(1, 5)
    rewards = T([REWARDS + [100.0]])
    loss = listwise_loss("infonca", logps, zeros, rewards, beta=0.1, mask=T([[1, 1, 1, 1, 0]]))
    assert loss.item() == pytest.approx(1.190562, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# 3. Shape properties of the pairwise losses
# --------------------------------------------------------------------------------------------------
def f0_expected(name: str, beta: float) -> float:
    """The loss when rho = 0 (policy = reference; for simpo: chosen = rejected):
    sigmoid, dpop (penalty 0 when policy = reference): -log sigma(0) = ln 2; robust: [(1-eps) ln2 - eps ln2]
    / (1 - 2 eps) = ln 2; hinge max(0, 1) = 1; exponential e^0 = 1; truncated_quadratic 1^2 = 1;
    savage 1/(1 + 1)^2 = 1/4; nca_pair (c = r = 0): -log sigma(0) - 1/2 log sigma(0) - 1/2 log sigma(0)
    = 2 ln 2; ipo (0 - 1/(2 beta))^2 = 1/(4 beta^2); simpo -log sigma(0 - 0.5) = log(1 + e^0.5) = 0.974077."""
    return {"sigmoid": LN2, "dpop": LN2, "robust": LN2, "hinge": 1.0, "exponential": 1.0,
            "truncated_quadratic": 1.0, "savage": 0.25, "nca_pair": 2 * LN2, "ipo": 1 / (4 * beta ** 2),
            "simpo": softplus(0.5)}[name]


def test_f0_table_is_complete():
    assert set(PAIRWISE) == {"sigmoid", "dpop", "robust", "hinge", "exponential", "truncated_quadratic",
                             "savage", "nca_pair", "ipo", "simpo"}
    assert softplus(0.5) == pytest.approx(0.974077, abs=1e-6)


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_rho_zero_gives_f0(name, beta):
    """Policy = reference (random log-probs of realistic size) gives f(0) for every pair, for every beta
    except ipo, whose f(0) = 1/(4 beta^2): 2500, 25, 0.25, 0.0025 for the betas here. SimPO ignores the
    reference: its rho = 0 is chosen = rejected."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(8, generator=g, dtype=F64) * 50 - 100
    b = torch.randn(8, generator=g, dtype=F64) * 50 - 100
    if name == "simpo":
        loss = preference_loss(name, a, a.clone(), b, b.clone(), beta=beta)
    else:
        loss = preference_loss(name, a, b, a.clone(), b.clone(), beta=beta)
    assert torch.allclose(loss, torch.full((8,), f0_expected(name, beta), dtype=F64), atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("name", PAIRWISE)
def test_spec_f0_agrees(name):
    """LossSpec.f0 is the loss at rho = 0 for beta = 1 (ipo: 1/(4*1) = 0.25)."""
    assert LOSSES[name].f0 == pytest.approx(f0_expected(name, 1.0), abs=1e-12)


def test_listwise_spec_f0_is_none():
    for name in LISTWISE:
        assert LOSSES[name].f0 is None


BETA = 0.5
RHO_GRID = torch.linspace(-6.0, 6.0, 49, dtype=F64)  # z = beta * rho in [-3, 3], step 0.125


def pairwise_on_grid(name: str, side: str) -> torch.Tensor:
    """The loss along RHO_GRID in float64, references 0. side 'rejected': chosen = 0 (= its reference, so
    DPOP's penalty is 0 and NCA's chosen term is fixed), rejected = -rho. side 'chosen': rejected = 0,
    chosen = rho (for rho < 0 the chosen falls below the reference and DPOP's penalty is active)."""
    zeros = torch.zeros_like(RHO_GRID)
    if side == "rejected":
        return preference_loss(name, zeros, -RHO_GRID, zeros, zeros, beta=BETA)
    return preference_loss(name, RHO_GRID, zeros, zeros, zeros, beta=BETA)


def strictly_decreasing_region(name: str) -> torch.Tensor:
    """Grid steps (k -> k+1) over which f is strictly decreasing. hinge and truncated_quadratic are
    strictly decreasing while z < 1 (rho < 2 at beta 0.5) and flat at 0 from z = 1 on; ipo is strictly
    decreasing until its minimum rho = 1/(2 beta) = 1; the rest are strictly decreasing everywhere."""
    left = RHO_GRID[:-1]
    right = RHO_GRID[1:]
    if name in ("hinge", "truncated_quadratic"):
        return right <= 1 / BETA
    if name == "ipo":
        return right <= 1 / (2 * BETA)
    return torch.ones_like(left, dtype=torch.bool)


MONOTONE_SIDES = [(n, s) for n in PAIRWISE for s in ("rejected", "chosen") if n not in ("ipo",)
                  and (n, s) != ("nca_pair", "chosen")]


@pytest.mark.parametrize("name,side", MONOTONE_SIDES)
def test_loss_non_increasing_in_rho(name, side):
    """Every monotone pairwise loss is non-increasing in rho over z in [-3, 3], strictly where f is strictly
    decreasing, and flat (exactly 0) where it is not (hinge / truncated_quadratic past z = 1).
    Excluded, with their own tests: ipo (a squared loss, increasing past its minimum) and nca_pair moved
    through the chosen side (not a function of rho alone)."""
    loss = pairwise_on_grid(name, side)
    diffs = loss[1:] - loss[:-1]
    strict = strictly_decreasing_region(name)
    assert (diffs[strict] < 0).all(), (name, side, loss)
    assert (diffs[~strict] == 0).all(), (name, side, loss)
    if (~strict).any():
        assert (loss[1:][~strict] == 0).all()


def test_hinge_and_truncated_quadratic_flat_past_margin():
    """At beta 0.5: z = 1 at rho = 2; both are 0 for every rho >= 2 and positive below (rho = 1.75, the grid
    point before: z = 0.875, hinge 1 - 0.875 = 0.125, truncated 0.125^2 = 0.015625)."""
    i = int((RHO_GRID == 1.75).nonzero())
    for name, below in [("hinge", 0.125), ("truncated_quadratic", 0.015625)]:
        loss = pairwise_on_grid(name, "rejected")
        assert loss[i].item() == pytest.approx(below, abs=1e-12)
        assert (loss[RHO_GRID >= 2.0] == 0).all()


def test_ipo_decreases_then_increases():
    """(rho - 1/(2 beta))^2 with beta 0.5 is (rho - 1)^2: strictly decreasing for rho < 1, 0 at rho = 1,
    strictly increasing after (IPO pulls rho to a target instead of pushing it to infinity)."""
    for side in ("rejected", "chosen"):
        loss = pairwise_on_grid("ipo", side)
        diffs = loss[1:] - loss[:-1]
        right = RHO_GRID[1:]
        assert (diffs[right <= 1] < 0).all()
        assert (diffs[right > 1] > 0).all()
        assert loss[RHO_GRID == 1.0].item() == 0.0
        assert torch.allclose(loss, (RHO_GRID - 1) ** 2, atol=1e-12, rtol=0)


def test_nca_pair_is_not_a_function_of_rho():
    """nca_pair = -log sigma(c) - 1/2 log sigma(-c) - 1/2 log sigma(-r). Along the chosen side (r = 0) its
    derivative in c is -(1 - sigma(c)) + 1/2 sigma(c) = 3/2 sigma(c) - 1: negative for c < ln 2 and positive
    after — NCA does not reward pushing the chosen likelihood without bound. Along the rejected side it is
    strictly decreasing (shown above). Same rho, different loss: c = 1, r = 0 gives
    log(1 + e^-1) + 1/2 log(1 + e^1) + 1/2 ln 2 = 0.313262 + 0.656630 + 0.346574 = 1.316466, while
    c = 0, r = -1 gives ln 2 + 1/2 ln 2 + 1/2 log(1 + e^-1) = 0.693147 + 0.346574 + 0.156631 = 1.196352."""
    loss = pairwise_on_grid("nca_pair", "chosen")
    c = BETA * RHO_GRID
    diffs = loss[1:] - loss[:-1]
    assert (diffs[c[1:] <= LN2] < 0).all()
    assert (diffs[c[:-1] >= LN2] > 0).all()
    zero = T([0.0], dtype=F64)
    a = preference_loss("nca_pair", T([1.0], dtype=F64), zero, zero, zero, beta=1.0).item()
    b = preference_loss("nca_pair", zero, T([-1.0], dtype=F64), zero, zero, beta=1.0).item()
    assert a == pytest.approx(1.316466, abs=1e-6)
    assert b == pytest.approx(1.196352, abs=1e-6)


def test_pairwise_gradients_match_finite_differences():
    """Autograd agrees with central differences (float64, h = 1e-6: error O(h^2) + O(eps/h) ~ 1e-10, checked
    at 1e-6) for every pairwise loss and all four inputs, away from the kinks (hinge / truncated_quadratic
    at z = 1, dpop at chosen = reference). Losses are rowwise, so perturbing input j of every row at once and
    differencing row by row gives d loss_i / d input_j,i for all rows in two calls."""
    g = torch.Generator().manual_seed(3)
    h = 1e-6
    for name in PAIRWISE:
        c, r, rc, rr = (torch.randn(5, generator=g, dtype=F64) for _ in range(4))
        rc = rc + 0.5 * torch.sign(rc - c)  # push rc away from c: |c - rc| >= 0.5, off dpop's kink
        assert ((0.7 * ((c - rc) - (r - rr)) - 1).abs() > 1e-3).all()
        inputs = [x.clone().requires_grad_(True) for x in (c, r, rc, rr)]
        preference_loss(name, *inputs, beta=0.7).sum().backward()
        for j in range(4):
            up = [x + h if k == j else x for k, x in enumerate((c, r, rc, rr))]
            down = [x - h if k == j else x for k, x in enumerate((c, r, rc, rr))]
            numeric = (preference_loss(name, *up, beta=0.7) - preference_loss(name, *down, beta=0.7)) / (2 * h)
            grad = inputs[j].grad
            if grad is None:  # simpo's reference inputs are not in the graph at all
                assert name == "simpo" and j >= 2, (name, j)
                grad = torch.zeros_like(numeric)
            assert torch.allclose(grad, numeric, atol=1e-6, rtol=1e-6), (name, j)


# --------------------------------------------------------------------------------------------------
# 4. InfoNCA with K = 2 and hard labels is DPO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewards,alpha", [([1e4, -1e4], 1.0), ([1.0, 0.0], 1e-3), ([0.7, 0.2], 1e-4)])
def test_infonca_k2_hard_labels_is_dpo(rewards, alpha):
    """p = softmax(r / alpha) = [1, e^-(r0-r1)/alpha] / (1 + ...) = [1, 0] in float32 once (r0 - r1)/alpha
    >= ~104 (here 2e4, 1000, 5000). Then InfoNCA = -log softmax([c, r])_0 = -log(e^c / (e^c + e^r))
    = -log sigma(c - r) = -log sigma(beta rho) = DPO. Checked in float64 (the identity is exact; only the
    roundings of two different computations differ, ~1e-15) at 1e-9, on random pairs of both signs of rho;
    swapping the rewards makes the second response the chosen one."""
    g = torch.Generator().manual_seed(4)
    logps = torch.randn(16, 2, generator=g, dtype=F64) * 30 - 80
    ref = torch.randn(16, 2, generator=g, dtype=F64) * 30 - 80
    rw = T([rewards], dtype=F64).expand(16, 2)
    info = listwise_loss("infonca", logps, ref, rw, beta=0.1, alpha=alpha)
    dpo = preference_loss("sigmoid", logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    assert torch.allclose(info, dpo, atol=1e-9, rtol=0)
    swapped = listwise_loss("infonca", logps, ref, rw.flip(-1), beta=0.1, alpha=alpha)
    dpo_swapped = preference_loss("sigmoid", logps[:, 1], logps[:, 0], ref[:, 1], ref[:, 0], beta=0.1)
    assert torch.allclose(swapped, dpo_swapped, atol=1e-9, rtol=0)


def test_infonca_k2_hard_labels_is_dpo_at_check_point_float32():
    """The check point as a K = 2 list: logps [-10, -12], ref [-11, -11], rewards [1, 0], alpha 1e-3 ->
    p = [1, 0]; InfoNCA = -log sigma(0.2) = 0.598139 = DPO, in float32 to 1e-6."""
    loss = listwise_loss("infonca", T([[-10.0, -12.0]]), T([[-11.0, -11.0]]), T([[1.0, 0.0]]), beta=0.1,
                         alpha=1e-3)
    assert loss.item() == pytest.approx(check_point("sigmoid").item(), abs=1e-6)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# 5. Gradients stay finite at extreme margins
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_at_extreme_margins(name, sign, dtype):
    """|beta * rho| = 1e4 with either sign: beta = 1; (chosen, rejected) = (s*1e4, 0), (0, -s*1e4),
    (s*5e3, -s*5e3), references 0, so z = s*1e4 on every row (bf16 rounds 1e4 to 9984 — same regime).
    Listwise: beta = 0.1, logps = [s*1e5, 0, -s*1e5, s*5e4] -> r_theta = s*[1e4, 0, -1e4, 5e3].
    Loss and gradients must be finite (a mathematically huge but finite loss must not overflow to inf)."""
    s = sign
    if LOSSES[name].listwise:
        logps = T([[s * 1e5, 0.0, -s * 1e5, s * 5e4], [-s * 1e5, s * 1e5, 0.0, 0.0]], dtype=dtype)
        logps.requires_grad_(True)
        ref = torch.zeros_like(logps)
        rewards = T([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], dtype=dtype)
        loss = listwise_loss(name, logps, ref, rewards, beta=0.1)
        leaves = [logps]
    else:
        chosen = T([s * 1e4, 0.0, s * 5e3], dtype=dtype).requires_grad_(True)
        rejected = T([0.0, -s * 1e4, -s * 5e3], dtype=dtype).requires_grad_(True)
        zeros = torch.zeros(3, dtype=dtype)
        loss = preference_loss(name, chosen, rejected, zeros, zeros, beta=1.0)
        leaves = [chosen, rejected]
    assert loss.dtype == dtype
    assert torch.isfinite(loss).all(), (name, loss)
    loss.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all(), (name, leaf.grad)


# --------------------------------------------------------------------------------------------------
# 6. Rewards are targets: no gradient into them
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LISTWISE)
def test_rewards_are_detached(loss_type):
    """rewards with requires_grad: after backward, rewards.grad is None (the graph never reaches them) and
    autograd.grad reports them unused; the logps get a non-zero gradient."""
    logps = T([[2.0, 0.0, -1.0, -3.0]], requires_grad=True)
    rewards = T([REWARDS], requires_grad=True)
    loss = listwise_loss(loss_type, logps, torch.zeros(1, 4), rewards, beta=0.1)
    (g_rewards,) = torch.autograd.grad(loss.sum(), rewards, retain_graph=True, allow_unused=True)
    assert g_rewards is None
    loss.sum().backward()
    assert rewards.grad is None
    assert logps.grad is not None and logps.grad.abs().sum().item() > 0


# --------------------------------------------------------------------------------------------------
# 7. Errors
# --------------------------------------------------------------------------------------------------
def test_unknown_loss_and_option_are_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, gamma=1.0)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'dpo_typo'") as info:
        preference_loss("dpo_typo", T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1)
    for name in LOSSES:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="known losses"):
        listwise_loss("infonce", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=0.1)


@pytest.mark.parametrize("loss_type,option", [("hinge", "label_smoothing"), ("ipo", "label_smoothing"),
                                              ("sigmoid", "dpop_lambda"), ("nca_pair", "simpo_gamma"),
                                              ("simpo", "label_smoothing")])
def test_unknown_option_names_it(loss_type, option):
    with pytest.raises(ValueError, match=option):
        preference_loss(loss_type, T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, **{option: 0.1})


@pytest.mark.parametrize("loss_type,option,value", [
    ("robust", "label_smoothing", 0.5),  # eps < 1/2 (1 - 2 eps = 0 divides by zero)
    ("robust", "label_smoothing", 0.7),
    ("robust", "label_smoothing", -0.1),
    ("sigmoid", "label_smoothing", 0.5),
    ("sigmoid", "label_smoothing", float("nan")),
    ("dpop", "dpop_lambda", -1.0),
    ("dpop", "dpop_lambda", float("inf")),
    ("simpo", "simpo_gamma", -0.5),
    ("sigmoid", "label_smoothing", True),
])
def test_out_of_range_option(loss_type, option, value):
    with pytest.raises(ValueError, match=option):
        preference_loss(loss_type, T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, **{option: value})


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        listwise_loss("nca", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=0.1, alpha=alpha)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        listwise_loss("infonca", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=beta)


@pytest.mark.parametrize("loss_type", LISTWISE)
def test_listwise_name_in_preference_loss(loss_type):
    with pytest.raises(ValueError, match="listwise"):
        preference_loss(loss_type, T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1)


@pytest.mark.parametrize("loss_type", PAIRWISE)
def test_pairwise_name_in_listwise_loss(loss_type):
    with pytest.raises(ValueError, match="pairwise"):
        listwise_loss(loss_type, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=0.1)


@pytest.mark.parametrize("mask", [[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1], [0, 1, 0, 0]]])
def test_mask_row_with_fewer_than_two_responses(mask):
    m = T(mask, dtype=torch.bool)
    shape = m.shape
    with pytest.raises(ValueError, match="at least 2"):
        listwise_loss("infonca", torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), beta=0.1, mask=m)


def test_single_response_list_is_an_error():
    """K = 1 without a mask: nothing to contrast."""
    with pytest.raises(ValueError, match="at least 2"):
        listwise_loss("nca", torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), beta=0.1)


@pytest.mark.parametrize("shapes", [
    ((2, 4), (2, 3), (2, 4)),
    ((2, 4), (2, 4), (2, 3)),
    ((2, 4), (1, 4), (2, 4)),
    ((4,), (4,), (4,)),
    ((2, 2, 2), (2, 2, 2), (2, 2, 2)),
])
def test_listwise_shape_mismatch(shapes):
    a, b, c = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        listwise_loss("infonca", a, b, c, beta=0.1)


def test_listwise_mask_shape_mismatch_is_value_error():
    """The mask is documented as [B, K] like the other inputs; a [B, K-1] mask must be rejected with the
    same kind of error as a mismatched logps/ref/rewards, not a torch broadcasting RuntimeError."""
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        listwise_loss("infonca", z, z, z, beta=0.1, mask=torch.ones(2, 3, dtype=torch.bool))


def test_preference_loss_rejects_mismatched_shapes():
    """Every pairwise input is [B]. A [B, 1] reference next to [B] log-probs silently broadcasts to a [B, B]
    loss (whose mean is a wrong number), and [2] vs [3] fails inside torch; both must be a ValueError."""
    with pytest.raises(ValueError):
        preference_loss("sigmoid", torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError):
        preference_loss("sigmoid", torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3, 1),
                        beta=0.1)


# --------------------------------------------------------------------------------------------------
# 8. Registry
# --------------------------------------------------------------------------------------------------
def test_registry_declares_needs():
    assert LOSSES["sigmoid"].needs_reference and not LOSSES["sigmoid"].mean_logps
    for name, spec in LOSSES.items():
        assert spec.name == name
        assert get_loss(name) is spec
        assert spec.needs_reference == (name != "simpo"), name
        assert spec.listwise == (name in ("infonca", "nca")), name
        assert spec.needs_rewards == (name in ("infonca", "nca")), name
        assert spec.mean_logps == (name in ("ipo", "simpo")), name
        assert isinstance(spec.formula, str) and spec.formula.strip(), name


def test_option_defaults_pass_their_own_bounds():
    for name, spec in LOSSES.items():
        resolved = resolve_options(name, {})
        assert resolved == {k: opt.default for k, opt in spec.options.items()}, name
        for opt_name, opt in spec.options.items():
            assert opt.check(name, opt_name, opt.default) == opt.default


def test_declared_options():
    """The options each loss takes, with their defaults (the ones the check values above rely on)."""
    declared = {name: {k: o.default for k, o in spec.options.items()} for name, spec in LOSSES.items()}
    assert declared == {
        "sigmoid": {"label_smoothing": 0.0}, "hinge": {}, "ipo": {}, "exponential": {},
        "truncated_quadratic": {}, "savage": {}, "robust": {"label_smoothing": 0.1},
        "dpop": {"dpop_lambda": 50.0}, "nca_pair": {}, "simpo": {"simpo_gamma": 0.5},
        "infonca": {"alpha": 1.0}, "nca": {"alpha": 1.0},
    }


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
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
    assert m["logps/chosen"].tolist() == [-10.0, -5.0]
