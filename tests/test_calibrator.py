"""calibrator.py: slerp / lerp against their closed forms and limits, finite gradients at the singular points,
the identity-like initialisation, and the full PGSQC forward (proposal, gate, regularisers) for known A, B."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from calibrator import QueryCalibrator, lerp, slerp
from config import CalibratorConfig


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def slerp_closed_form(q, p, lam):
    q, p, lam = q.double(), p.double(), lam.double()[:, None]
    omega = torch.acos((q * p).sum(-1, keepdim=True))
    return (torch.sin((1 - lam) * omega) * q + torch.sin(lam * omega) * p) / torch.sin(omega)


def test_slerp_unit_norm_limits_and_closed_form():
    q, p = unit(64, 16, seed=0), unit(64, 16, seed=1)
    lam = torch.rand(64, generator=torch.Generator().manual_seed(2))
    out = slerp(q, p, lam)
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(out.double(), slerp_closed_form(q, p, lam), atol=1e-5)
    assert torch.allclose(slerp(q, p, 0.0), q, atol=1e-5)
    assert torch.allclose(slerp(q, p, 1.0), p, atol=1e-5)
    # The angle to q grows linearly with lambda (constant speed along the great circle).
    omega = torch.acos((q * p).sum(-1))
    angle = torch.acos((slerp(q, p, 0.25) * q).sum(-1).clamp(-1, 1))
    assert torch.allclose(angle, 0.25 * omega, atol=1e-3)


def test_lerp_is_renormalised_linear_interpolation_and_differs_from_slerp():
    q, p = unit(32, 8, seed=3), unit(32, 8, seed=4)
    out = lerp(q, p, 0.25)
    assert torch.allclose(out, F.normalize(0.75 * q + 0.25 * p, dim=-1), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(32), atol=1e-5)
    assert (out - slerp(q, p, 0.25)).abs().max() > 1e-3


def pair_at_angle(theta, n, d=16, seed=5):
    """n unit pairs (q, p) in fp32 at angle theta: p = cos(theta) q + sin(theta) v with v a unit vector orthogonal
    to q; theta = 0 and pi give p = q and p = -q exactly."""
    q = unit(n, d, seed=seed)
    if theta in (0.0, math.pi):
        return q, q.clone() if theta == 0 else -q
    v = unit(n, d, seed=seed + 1).double()
    v = F.normalize(v - (v * q.double()).sum(-1, keepdim=True) * q.double(), dim=-1)
    return q, (math.cos(theta) * q.double() + math.sin(theta) * v).float()


@pytest.mark.parametrize("theta, expected, atol", [
    (0.0, "q", 1e-6), (1e-4, "slerp", 1e-6), (2e-3, "slerp", 1e-6),
    (math.pi - 2e-3, "slerp", 1e-4), (math.pi - 1e-4, "lerp", 1e-3), (math.pi, "antipodal", 1e-6)])
def test_slerp_at_and_near_parallel_and_opposite(theta, expected, atol):
    """Values, unit norm and finite gradients at q.p = +1, -1 and near both, one lambda per sample. Near +1 slerp
    and lerp agree; below sin w = 1.4e-3 near -1 the output is the documented normalized lerp, and for p = -q
    exactly it is q for lambda <= 0.5 and p above. Near -1 the result is ill-conditioned in fp32 (rounding in q + p
    is divided by sin w), hence the looser tolerances there.
    Catches: the fallback decided on the clamped cosine (it never runs: at p = -q the output was cos(lam pi) q,
    the zero vector at lam = 0.5); the vanishing lerp at p = -q, lam = 0.5 not replaced by q; the lerp branch not
    renormalised; w = acos(q.p) in fp32 (off by 1e-2 at w = pi - 2e-3)."""
    lam = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    q, p = pair_at_angle(theta, len(lam))
    q, p, lam = q.requires_grad_(True), p.requires_grad_(True), lam.requires_grad_(True)
    out = slerp(q, p, lam)
    (out * unit(5, 16, seed=7)).sum().backward()
    for t in (q, p, lam):
        assert torch.isfinite(t.grad).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
    q64, p64, lam64 = F.normalize(q.detach().double(), dim=-1), F.normalize(p.detach().double(), dim=-1), lam.detach()
    want = {"q": q64, "slerp": slerp_closed_form(q64, p64, lam64),
            "lerp": F.normalize((1 - lam64.double()[:, None]) * q64 + lam64.double()[:, None] * p64, dim=-1),
            "antipodal": torch.where(lam64[:, None] <= 0.5, q64, p64)}[expected]
    assert torch.allclose(out.double(), want, atol=atol)


def test_slerp_bf16_inputs_computed_in_fp32():
    q = unit(16, 32, seed=8, dtype=torch.bfloat16).requires_grad_(True)
    p = F.normalize(q.detach().float() + 1e-3 * unit(16, 32, seed=9), dim=-1).bfloat16().requires_grad_(True)
    out = slerp(q, p, torch.full((16,), 0.5))
    out.sum().backward()
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()


def small_cfg(**overrides):
    return CalibratorConfig(**{"hidden": 16, "rank": 2, **overrides})


@pytest.mark.parametrize("mode", ["slerp", "lerp"])
def test_initialisation_is_close_to_identity(mode):
    torch.manual_seed(0)
    cal = QueryCalibrator(32, small_cfg(mode=mode))
    h = 10 * torch.randn(6, 32)
    out, gate, fro, orth = cal(h)
    assert (out - F.normalize(h, dim=-1)).abs().max() < 1e-4
    assert torch.allclose(gate, torch.full((6,), 1 / (1 + math.exp(3))), atol=1e-5)
    assert fro.shape == orth.shape == (6,)


def test_hidden_width_and_initial_gate_follow_the_config():
    """calibrator.hidden sets the hypernetwork's width and calibrator.gate_bias_init its first gate, both off their
    defaults here (hidden 24, bias -1): Linear(D, 24), LayerNorm(24), Linear(24, 2 D r + 1) hold D * 24 + 24 +
    2 * 24 + (24 + 1) (2 D r + 1) parameters, and with A, B ~ 0 every query's gate is sigmoid(-1) = 1 / (1 + e).
    The last layer's bias is 0 for the 2 D r entries of A, B and the gate bias for the gate logit alone.
    Catches: the width fixed at the default 512, or the gate bias fixed at the default -3; the gate bias written into
    B's last entry too (`last.bias[-2:]`: at init_std 1e-6 the outputs move by 1e-6 only)."""
    d, r, hidden = 8, 2, 24
    torch.manual_seed(0)
    cal = QueryCalibrator(d, small_cfg(hidden=hidden, rank=r, gate_bias_init=-1.0))
    assert sum(p.numel() for p in cal.parameters()) == d * hidden + hidden + 2 * hidden + (hidden + 1) * (2 * d * r + 1)
    assert torch.equal(cal.hyper[-1].bias.detach(), torch.tensor([0.0] * (2 * d * r) + [-1.0]))
    _, gate, _, _ = cal(torch.randn(5, d))
    assert torch.allclose(gate, torch.full((5,), 1 / (1 + math.e)), atol=1e-5)


def set_constant_output(cal, a, b, gate_logit=None):
    """Make the hypernetwork output the same (A, B, l) for every input: last layer weight 0, bias = values."""
    last = cal.hyper[-1]
    values = [a.reshape(-1), b.reshape(-1)] + ([torch.tensor([gate_logit])] if gate_logit is not None else [])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.cat(values))


def test_forward_and_regularisers_match_hand_computation():
    d, r = 4, 2
    cal = QueryCalibrator(d, small_cfg(rank=r))
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])   # A^T A = [[2, 0], [0, 4]]
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]])
    set_constant_output(cal, a, b, gate_logit=0.4)
    h = torch.tensor([[3.0, 0.0, 0.0, 4.0], [0.0, 1.0, 0.0, 0.0]])
    out, gate, fro, orth = cal(h)
    # |A|_F = sqrt(6), |B|_F = sqrt(1.25); |A^T A - I|_F = |diag(1, 3)|_F = sqrt(10)
    assert torch.allclose(fro, torch.full((2,), math.sqrt(6) + math.sqrt(1.25)))
    assert torch.allclose(orth, torch.full((2,), math.sqrt(10)))
    assert torch.allclose(gate, torch.full((2,), 1 / (1 + math.exp(-0.4))))
    q = F.normalize(h, dim=-1)
    p = F.normalize(q + q @ a @ b, dim=-1)
    assert torch.allclose(out.double(), slerp_closed_form(q, p, gate), atol=1e-5)


def test_forward_per_sample_matches_a_loop_over_the_batch():
    """Distinct A, B and gate for every sample (a random hypernetwork), checked one sample at a time with plain
    matrix maths on that sample's rows of the hypernetwork output.
    Catches: another sample's A or B used (e.g. `.flip(0)` on b in forward), which the constant-A/B test passes."""
    d, r, n = 6, 3, 5
    torch.manual_seed(0)
    cal = QueryCalibrator(d, small_cfg(rank=r, init_std=0.3))
    h = torch.randn(n, d)
    out, gate, fro, orth = cal(h)
    with torch.no_grad():
        rows = cal.hyper(h).double()      # per sample: A (d x r, row-major), B (r x d), gate logit
    assert (rows[1:] - rows[:1]).abs().min() > 1e-4          # every sample has its own A, B, l
    for i in range(n):
        a, b = rows[i, :d * r].reshape(d, r), rows[i, d * r:2 * d * r].reshape(r, d)
        q = h[i].double() / h[i].double().norm()
        p = F.normalize(q + q @ a @ b, dim=0)
        assert (q @ p) < 0.99                                   # the proposal really moves the query
        lam = torch.sigmoid(rows[i, -1])
        assert gate[i].item() == pytest.approx(lam.item(), abs=1e-6)
        assert torch.allclose(out[i].double(), slerp_closed_form(q[None], p[None], lam[None])[0], atol=1e-5)
        assert fro[i].item() == pytest.approx((a.norm() + b.norm()).item(), rel=1e-5)
        assert orth[i].item() == pytest.approx((a.T @ a - torch.eye(r, dtype=torch.float64)).norm().item(), rel=1e-5)


def test_a_callers_autocast_leaves_the_calibrator_in_fp32():
    """Called inside a bf16 autocast (as a caller embedding under autocast would), the calibrator gives exactly
    its fp32 outputs: H in its parameters' dtype, the proposal, slerp and regularisers in fp32.
    Catches: only H kept out of autocast (the proposal's einsums and A^T A then run in bf16: here out differs by 8e-5
    and orth by 0.06)."""
    torch.manual_seed(0)
    cal = QueryCalibrator(6, small_cfg(rank=3, init_std=0.3))
    h = torch.randn(5, 6)
    expected = cal(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cal(h)
    for name, e, g in zip(("out", "gate", "fro", "orth"), expected, got):
        assert g.dtype == torch.float32 and torch.equal(g, e), name


def test_readouts_of_either_dtype_give_the_calibrators_own_dtype_result():
    """H reads h in its parameters' dtype whatever the readout's: a bf16 calibrator (model.fp32_trainable=false) given
    fp32 readouts and an fp32 one given bf16 readouts (a bf16 backbone's) give exactly what they give for the same
    values in their own dtype (h holds bf16 values, which fp32 holds exactly).
    Catches: h handed to H as it is (`self.hyper(h)`: "mat1 and mat2 must have the same dtype")."""
    torch.manual_seed(0)
    cal = QueryCalibrator(6, small_cfg(rank=3, init_std=0.3))
    h = torch.randn(5, 6).bfloat16()
    for calibrator, own, other in ((cal, h.float(), h), (copy.deepcopy(cal).bfloat16(), h, h.float())):
        for name, expected, got in zip(("out", "gate", "fro", "orth"), calibrator(own), calibrator(other)):
            assert torch.equal(got, expected), name


def test_fixed_gate_lerp_and_none_variants():
    """A fixed gate, mode lerp at lambda 0.5 and mode none, on known A, B; an unknown mode or gate is refused.
    Catches: the gate left unchecked (`or cfg.gate not in ...` dropped: "sigmoid" ran as a fixed gate of 0.5)."""
    d, r = 4, 2
    a, b = torch.randn(d, r), torch.randn(r, d)
    h = torch.randn(3, d)
    q = F.normalize(h, dim=-1)
    p = F.normalize(q + q @ a @ b, dim=-1)

    fixed = QueryCalibrator(d, small_cfg(rank=r, gate="fixed", fixed_gate=0.7))
    assert fixed.hyper[-1].out_features == 2 * d * r        # no gate logit to leave without gradient
    set_constant_output(fixed, a, b)
    out, gate, _, _ = fixed(h)
    assert torch.equal(gate, torch.full((3,), 0.7))
    assert torch.allclose(out, slerp(q, p, 0.7), atol=1e-6)

    linear = QueryCalibrator(d, small_cfg(rank=r, mode="lerp"))
    set_constant_output(linear, a, b, gate_logit=0.0)
    assert torch.allclose(linear(h)[0], F.normalize(q + p, dim=-1), atol=1e-6)

    none = QueryCalibrator(d, small_cfg(mode="none"))
    assert not list(none.parameters())
    out, gate, fro, orth = none(h)
    assert torch.allclose(out, q) and gate is None and fro is None and orth is None

    with pytest.raises(ValueError, match="mode"):
        QueryCalibrator(d, small_cfg(mode="cosine"))
    with pytest.raises(ValueError, match="gate 'sigmoid'"):
        QueryCalibrator(d, small_cfg(gate="sigmoid"))


def test_lerp_mode_interpolates_linearly_off_the_midpoint():
    """calibrator.mode=lerp (the ablation, docs/method.md#pgsqc): out = normalize((1 - lambda) q + lambda p), computed
    here in float64 from the known A, B and a gate away from 0.5 (at lambda = 0.5 slerp and lerp coincide, which is
    all test_fixed_gate_lerp_and_none_variants checks), and distinct from slerp's point by far more than rounding.
    Catches: mode lerp running slerp (`slerp if self.mode != "none" else lerp` in forward)."""
    d, r = 4, 2
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, -1.0]])
    b = torch.tensor([[0.0, 2.0, 0.0, 1.0], [1.0, 0.0, -1.0, 0.0]])
    h = torch.tensor([[3.0, 0.0, 0.0, 4.0], [1.0, 2.0, 2.0, 0.0]])
    cal = QueryCalibrator(d, small_cfg(rank=r, mode="lerp"))
    set_constant_output(cal, a, b, gate_logit=math.log(0.2 / 0.8))      # lambda = 0.2
    out, gate, _, _ = cal(h)
    q = F.normalize(h.double(), dim=-1)
    p = F.normalize(q + q @ a.double() @ b.double(), dim=-1)
    want = F.normalize(0.8 * q + 0.2 * p, dim=-1)
    assert torch.allclose(gate, torch.full((2,), 0.2))
    assert torch.allclose(out.double(), want, atol=1e-6)
    assert (slerp_closed_form(q, p, torch.full((2,), 0.2)) - want).abs().max() > 1e-2


@pytest.mark.parametrize("interpolate", [slerp, lerp])
def test_slerp_and_lerp_of_bf16_inputs_interpolate_their_renormalised_values(interpolate):
    """bf16 rounding moves a unit vector's norm by up to ~1e-3; slerp and lerp renormalise after the fp32 cast, so
    their outputs are the float64 closed forms on the renormalised inputs (unit_fp32).
    Catches: unit_fp32 without its F.normalize (the angle is then taken between vectors of norm 1 +- 1e-3); lerp
    weighting the inputs as given (`q.float(), p.float()` for unit_fp32 in lerp: off by 3e-4 here)."""
    q = unit(64, 32, seed=10, dtype=torch.bfloat16)
    p = unit(64, 32, seed=11, dtype=torch.bfloat16)
    assert (q.double().norm(dim=-1) - 1).abs().max() > 5e-4                    # the rounding this is about
    lam = torch.rand(64, generator=torch.Generator().manual_seed(12))
    q64, p64 = F.normalize(q.double(), dim=-1), F.normalize(p.double(), dim=-1)
    want = (slerp_closed_form(q64, p64, lam) if interpolate is slerp else
            F.normalize((1 - lam.double()[:, None]) * q64 + lam.double()[:, None] * p64, dim=-1))
    assert torch.allclose(interpolate(q, p, lam).double(), want, atol=1e-5)
