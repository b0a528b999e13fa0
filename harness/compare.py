"""Error metrics between our tensors and the reference's, and localisation of the first divergence."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TensorDiff:
    """Errors of one tensor against its reference (computed in fp64)."""

    max_abs: float
    max_rel: float
    ref_max_abs: float
    argmax_pos: tuple[int, ...]

    @property
    def scaled(self) -> float:
        """``max_abs / max(1, max|ref|)``: the activation metric of the tolerance policy."""
        return self.max_abs / max(1.0, self.ref_max_abs)

    def to_json(self) -> dict:
        d = asdict(self)
        d["scaled"] = self.scaled
        d["argmax_pos"] = list(self.argmax_pos)
        return d


def tensor_diff(ours: torch.Tensor, ref: torch.Tensor) -> TensorDiff:
    """Max abs error, max relative error (over elements with ``|ref| >= 1e-3 * rms(ref)``), position of max."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    a = ours.detach().to(torch.float64)
    b = ref.detach().to(torch.float64)
    diff = (a - b).abs()
    if diff.numel() == 0:
        return TensorDiff(0.0, 0.0, 0.0, ())
    if not torch.isfinite(a).all():
        return TensorDiff(float("inf"), float("inf"), float(b.abs().max()), ())
    flat = int(diff.argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    floor = 1e-3 * float(b.pow(2).mean().sqrt())
    sel = b.abs() >= max(floor, 1e-300)
    max_rel = float((diff[sel] / b.abs()[sel]).max()) if bool(sel.any()) else 0.0
    return TensorDiff(float(diff.max()), max_rel, float(b.abs().max()), pos)


@dataclass(frozen=True)
class LogitStats:
    """Distribution-level agreement of logits ``[b, s, V]``."""

    kl_mean: float
    kl_max: float
    argmax_agreement: float
    max_abs_logprob: float


def logit_stats(ours: torch.Tensor, ref: torch.Tensor) -> LogitStats:
    """KL(ref || ours) of the log-probs per token (mean and max), argmax agreement, max |Δ log-prob|."""
    lp_ours = torch.log_softmax(ours.detach().to(torch.float64), dim=-1)
    lp_ref = torch.log_softmax(ref.detach().to(torch.float64), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1).clamp_min(0.0)
    agree = (ours.argmax(-1) == ref.argmax(-1)).to(torch.float64).mean()
    return LogitStats(
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        argmax_agreement=float(agree),
        max_abs_logprob=float((lp_ours - lp_ref).abs().max()),
    )
