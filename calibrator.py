"""Proposal-Guided Spherical Query Calibrator, PGSQC (paper section IV-C; docs/method.md#pgsqc).

For each query readout h a hypernetwork writes a low-rank map (A, B) and a gate logit l. The map proposes a
task-aligned point p = normalize(q + q A B) on the unit sphere, and the calibrated query moves from q = h / |h|
towards p along the great circle by lambda = sigmoid(l). Targets are never calibrated.

Variants (CalibratorConfig): mode "slerp" (the method), "lerp" (renormalised linear interpolation, ablation),
"none" (no calibrator: the output is q); gate "learned" or "fixed" (lambda = cfg.fixed_gate).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Where |q.p| > 1 - PARALLEL_EPS (sin w < 1.4e-3), q and p are (anti)parallel to fp32 precision and the slerp
# weights are 0/0 or ill-conditioned: normalized lerp is used instead (for parallel inputs it agrees with slerp
# to O(w^2)). In bf16 1 - 1e-6 rounds to 1, which is why slerp always runs in fp32 (paper section IV-C).
PARALLEL_EPS = 1e-6
# Exactly opposite inputs have no great circle between them and their lerp vanishes at lambda = 0.5: where the
# lerp is shorter than this (rounding noise) the output is q.
LERP_EPS = 1e-6


def unit_fp32(x):
    # Renormalised after the cast: bf16 rounding alone moves a unit vector's norm by up to ~1e-3.
    return F.normalize(x.float(), dim=-1)


def lerp(q, p, lam):
    """Normalized linear interpolation between unit vectors q, p [B, D] with weights lam ([B] or a float)."""
    q, p = unit_fp32(q), unit_fp32(p)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=q.device).reshape(-1, 1)
    return F.normalize((1 - lam) * q + lam * p, dim=-1)


def slerp(q, p, lam):
    """Spherical interpolation sin((1-lam) w)/sin w * q + sin(lam w)/sin w * p, w = acos(q.p) (paper section IV-C,
    docs/method.md#pgsqc), in fp32 whatever the input dtype; always a unit vector with finite gradients.

    Where |q.p| > 1 - PARALLEL_EPS it falls back to normalized lerp: for near-parallel inputs that is slerp to
    O(w^2); for near-opposite ones the great circle is ill-conditioned (undefined at q.p = -1) and the output
    goes from q to p through their lerp, which for p = -q exactly is q for lam <= 0.5 and p above."""
    q, p = unit_fp32(q), unit_fp32(p)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=q.device).reshape(-1, 1)
    # Decided on the unclamped cosine (the release clamped it first, so sin w stayed above its threshold).
    fallback = (q * p).sum(-1, keepdim=True).abs() > 1 - PARALLEL_EPS
    # w from atan2 rather than acos(q.p): acos of an fp32 cosine near -1 is off by percents, which the 1 / sin w
    # weights amplify; atan2 has finite derivatives everywhere, so the unused branch's gradient stays finite.
    omega = 2 * torch.atan2((q - p).norm(dim=-1, keepdim=True), (q + p).norm(dim=-1, keepdim=True))
    sin = torch.where(fallback, torch.ones_like(omega), torch.sin(omega))
    spherical = (torch.sin((1 - lam) * omega) * q + torch.sin(lam * omega) * p) / sin
    linear = (1 - lam) * q + lam * p
    linear = torch.where(linear.norm(dim=-1, keepdim=True) < LERP_EPS, q, linear)
    return F.normalize(torch.where(fallback, linear, spherical), dim=-1)


class QueryCalibrator(nn.Module):
    """forward(h [B, D]) -> (calibrated unit queries [B, D] fp32, gate [B], fro [B], orth [B]).

    fro = |A|_F + |B|_F and orth = |A^T A - I_r|_F are per-sample and unweighted; the trainer weights them
    (cfg.fro_weight, cfg.orth_weight) and averages over the batch. With mode "none" the module has no
    parameters and returns (q, None, None, None)."""

    def __init__(self, dim, cfg):
        super().__init__()
        # config.CHOICES' words, spelt out: config.py imported here would join the gallery-cache fingerprint
        # (encoding.embedding_sources), and every edit of it would encode the galleries again.
        if cfg.mode not in ("slerp", "lerp", "none") or cfg.gate not in ("learned", "fixed"):
            raise ValueError(f"calibrator mode {cfg.mode!r} / gate {cfg.gate!r}: expected slerp|lerp|none, "
                             f"learned|fixed")
        self.dim, self.rank, self.mode = dim, cfg.rank, cfg.mode
        self.learned_gate, self.fixed_gate = cfg.gate == "learned", cfg.fixed_gate
        if cfg.mode == "none":
            return
        # Hypernetwork H (paper section IV-C): Linear(D, 512), LayerNorm, GELU, Linear(512, 2 D r + 1). A fixed gate
        # has no gate logit, so no output unit is left without a gradient (DDP would need find_unused_parameters).
        out = 2 * dim * cfg.rank + int(self.learned_gate)
        self.hyper = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.GELU(),
                                   nn.Linear(cfg.hidden, out))
        # Identity-like start: A, B ~ 0 so p ~ q, and lambda = sigmoid(-3) ~ 0.05.
        last = self.hyper[-1]
        nn.init.normal_(last.weight, std=cfg.init_std)
        nn.init.zeros_(last.bias)
        if self.learned_gate:
            nn.init.constant_(last.bias[-1:], cfg.gate_bias_init)

    def forward(self, h):
        # Outside any caller's autocast: H in its parameters' dtype, the rest in fp32 (an autocast would run the
        # proposal's products in bf16).
        with torch.autocast(h.device.type, enabled=False):
            return self.calibrate(h)

    def calibrate(self, h):
        q = F.normalize(h.float(), dim=-1)
        if self.mode == "none":
            return q, None, None, None
        d, r = self.dim, self.rank
        # H reads the raw readout h (paper section IV-C) in its parameters' dtype (fp32, or bf16 in the
        # release-compatible setting); everything after it runs in fp32.
        weight = self.hyper[0].weight
        params = self.hyper(h.to(weight.dtype)).float()
        a = params[:, :d * r].reshape(-1, d, r)
        b = params[:, d * r:2 * d * r].reshape(-1, r, d)
        if self.learned_gate:
            gate = torch.sigmoid(params[:, -1])
        else:
            gate = torch.full((q.shape[0],), self.fixed_gate, device=q.device)
        # Per-query proposal p = normalize(q + q A B) (paper section IV-C).
        qab = torch.einsum("br,brd->bd", torch.einsum("bd,bdr->br", q, a), b)
        p = F.normalize(q + qab, dim=-1)
        out = (slerp if self.mode == "slerp" else lerp)(q, p, gate)
        # Regularisers from the same hypernetwork output (the release ran H a second time for them).
        fro = a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)
        eye = torch.eye(r, device=q.device)
        orth = (a.transpose(1, 2) @ a - eye).flatten(1).norm(dim=1)
        return out, gate, fro, orth
