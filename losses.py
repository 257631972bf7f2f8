"""Preference objectives on per-sample denoising errors (PAPER.md §1 and §7). Torch only.

Every objective takes the same four per-pair errors (policy and reference, winner and loser, each a
Tensor[B] from `per_sample_error`), a β, and a per-pair `scale` — the reward-scale schedule λ(t) of §3 —
so the timestep schedule and the reference update (reference.py) plug into every one of them.
Each returns `(loss, metrics)`: a 0-dim loss and a dict of 0-dim tensors for the log (call `.item()` once
per logging step, not per micro-batch, to avoid host-device syncs).
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e(x) = mean over C·H·W of (pred − target)² for each sample (§1), in float32 whatever the input dtype.

    The mean (not the sum) over elements is the Diffusion-DPO convention that β = 5000 is calibrated for.
    """
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l) -> torch.Tensor:
    """−Δ per pair (§1): r_t(w) − r_t(l) with the implicit reward r_t(x) = −(e_θ(x) − e_ref(x))."""
    return (ref_err_w - model_err_w) - (ref_err_l - model_err_l)


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Share of pairs the implicit reward ranks correctly: mean(z > 0), a tie z == 0 counting 1/2 (§1)."""
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()


def _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits):
    return {
        "accuracy": implicit_accuracy(logits),
        "reward_margin": margin.mean(),
        "model_err_w": model_err_w.mean(),
        "model_err_l": model_err_l.mean(),
        "ref_err_w": ref_err_w.mean(),
        "ref_err_l": ref_err_l.mean(),
    }


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0):
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14; PAPER.md §1), with the reward scale λ(t) of §3.

        Δ = (e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l)),   z = −(β/2)·λ(t)·Δ,   loss = −log σ(z)

    With policy = reference, Δ = 0 and the loss is log 2.
    """
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    logits = 0.5 * beta * scale * margin
    loss = -F.logsigmoid(logits).mean()
    return loss, _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits)


def hinge_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0):
    """Hinge (SLiC; Zhao et al. 2023, Eq. 2) on the Diffusion-DPO logit of §1: relu(1 − z)."""
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    logits = 0.5 * beta * scale * margin
    loss = F.relu(1.0 - logits).mean()
    return loss, _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits)


def ipo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0):
    """IPO (Azar et al. 2023, Eq. 17): (h − 1/(2β))², h the log-likelihood-ratio margin.

    In DPO the logit is z = β·h; here z = (β/2)·λ·(−Δ), so h = λ·(−Δ)/2 and the regression target
    1/(2β) uses the same β. [choice: h = z/β keeps one β convention for every objective of this file]
    """
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    log_ratio_margin = 0.5 * scale * margin
    loss = (log_ratio_margin - 1.0 / (2.0 * beta)).pow(2).mean()
    logits = beta * log_ratio_margin
    return loss, _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits)


def sft_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=None, scale=1.0):
    """Supervised fine-tuning on the winners only (the SFT baseline of PAPER.md §6): mean e_θ(w).

    Needs neither the losers nor a reference; the trainer passes None for what it does not compute.
    """
    loss = model_err_w.mean()
    return loss, {"model_err_w": model_err_w.mean()}


def kto_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0):
    """Diffusion-KTO (Li et al. 2024, Eq. 8), unpaired: winners are "desirable", losers "undesirable".

    Each image has its own implicit reward r(x) = −(β/2)·λ(t)·(e_θ(x) − e_ref(x)) (the §1 convention);
    the reference point is the batch-mean KL estimate Q = max(0, mean r) over all 2B images, detached,
    as in KTO (Ethayarajh et al. 2024). Utility: σ(r_w − Q) for winners, σ(Q − r_l) for losers;
    loss = mean(1 − utility).
    """
    reward_w = -0.5 * beta * scale * (model_err_w - ref_err_w)
    reward_l = -0.5 * beta * scale * (model_err_l - ref_err_l)
    kl = torch.cat([reward_w, reward_l]).mean().clamp(min=0).detach()
    loss = torch.cat([1 - torch.sigmoid(reward_w - kl), 1 - torch.sigmoid(kl - reward_l)]).mean()
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    metrics = _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, reward_w - reward_l)
    metrics["kl_baseline"] = kl
    return loss, metrics


def mapo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0, s=1.0):
    """MaPO (Hong et al. 2024, Eq. 9), reference-free: e_θ(w) − β·log σ(λ(t)·(f(e_θ(w)) − f(e_θ(l)))).

    f(e) = s·e / (exp(s·e) − 1) is MaPO's likelihood proxy: decreasing in the error, so the margin term
    pushes the winner's error down relative to the loser's. β here weighs the margin term (MaPO's
    β ≈ 0.1), it is not the DPO temperature; λ(t) scales the margin inside the sigmoid as in §3.
    """
    def likelihood_proxy(err):
        return s * err / torch.expm1(s * err).clamp(min=1e-12)

    margin_term = scale * (likelihood_proxy(model_err_w) - likelihood_proxy(model_err_l))
    loss = (model_err_w - beta * F.logsigmoid(margin_term)).mean()
    return loss, {
        "accuracy": implicit_accuracy(model_err_l - model_err_w),
        "model_err_w": model_err_w.mean(),
        "model_err_l": model_err_l.mean(),
        "mapo_margin": margin_term.mean(),
    }


def dspo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0, *,
              model_pred_w, ref_pred_w, target_w):
    """DSPO (Zhu et al. 2025, score-matching form of Eq. 12), on the winner.

        loss = mean_CHW ((ε_θ(w) − ε) − β·(1 − σ(z))·(ε_θ(w) − ε_ref(w)))²,   z the §1 logit

    The winner's denoising target is shifted along the policy−reference direction by how badly the
    pair is still ranked, 1 − σ(z). This needs the raw predictions, not only the per-sample errors:
    the trainer passes them because `LOSSES["dspo"].needs_predictions` is set.
    """
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    logits = 0.5 * beta * scale * margin
    weight = (1 - torch.sigmoid(logits)).view(-1, *([1] * (model_pred_w.dim() - 1)))
    residual = (model_pred_w.float() - target_w.float()) - beta * weight * (model_pred_w.float() - ref_pred_w.float())
    loss = residual.pow(2).flatten(1).mean(dim=1).mean()
    return loss, _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits)


@dataclass(frozen=True)
class Objective:
    """A loss of this file and what the trainer must compute for it (it skips the rest)."""
    fn: Callable
    default_beta: float | None
    needs_reference: bool = True
    needs_loser: bool = True
    needs_predictions: bool = False


# name → objective, for the trainers' --loss flag. β defaults: 5000 is Diffusion-DPO's SD1.5 value under
# the §1 convention; MaPO's β weighs a margin term instead (0.1 in its recipes); DSPO's β both sets the
# logit and multiplies a prediction difference, so public SD1.5 DSPO recipes use 0.001.
LOSSES = {
    "dpo": Objective(dpo_loss, 5000.0),
    "hinge": Objective(hinge_loss, 5000.0),
    "ipo": Objective(ipo_loss, 5000.0),
    "kto": Objective(kto_loss, 5000.0),
    "sft": Objective(sft_loss, None, needs_reference=False, needs_loser=False),
    "mapo": Objective(mapo_loss, 0.1, needs_reference=False),
    "dspo": Objective(dspo_loss, 0.001, needs_predictions=True),
}
