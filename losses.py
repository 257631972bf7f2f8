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


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l) -> torch.Tensor:
    """−Δ per pair (§1): r_t(w) − r_t(l) with the implicit reward r_t(x) = −(e_θ(x) − e_ref(x))."""
    return (ref_err_w - model_err_w) - (ref_err_l - model_err_l)


def pair_margin(model_err: torch.Tensor, ref_err: torch.Tensor, n: int) -> torch.Tensor | None:
    """−Δ of n pairs from errors [2n] (winners, then losers), for the log's per-t statistics; None when the
    objective computed the winners' errors only [n] (SFT)."""
    if len(model_err) != 2 * n:
        return None
    return reward_margin(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:])


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
    1/(2β) uses the same β [choice: h = z/β; TRL's DPOTrainer does so, its IPO τ being its DPO β]. So IPO
    regresses each pair's DPO logit z = β·h to 1/2: with β = 5000 the target margin is −Δ = 2e-4/λ, and a
    pair past it is pushed back (IPO's bounded margin, unlike DPO's ever-growing one).
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


def kto_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0, reference_point=None):
    """Diffusion-KTO (Li et al. 2024, Eq. 8; jacklishufan/diffusion-kto), unpaired: winners are "desirable",
    losers "undesirable".

    Each image has its own implicit reward r(x) = β·λ(t)·(e_ref(x) − e_θ(x)): the authors' β (their
    --beta_dpo, default 1000), not the β/2 of §1. The reference point is the KL estimate Q = max(0, mean r),
    detached: over all 2B images of this batch, as the official code does per batch, unless the caller passes
    `reference_point` (the trainers pass the mean over a whole optimizer step's pairs and ranks).
    Utility (sigmoid value function): σ(r_w − Q) for winners, σ(Q − r_l) for losers; loss = mean(1 − utility).
    """
    reward_w = beta * scale * (ref_err_w - model_err_w)
    reward_l = beta * scale * (ref_err_l - model_err_l)
    rewards = torch.cat([reward_w, reward_l])
    kl = rewards.mean() if reference_point is None else torch.as_tensor(reference_point, dtype=rewards.dtype)
    kl = kl.clamp(min=0).detach()
    loss = torch.cat([1 - torch.sigmoid(reward_w - kl), 1 - torch.sigmoid(kl - reward_l)]).mean()
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    metrics = _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, reward_w - reward_l)
    metrics.update(kl_baseline=kl, kto_mean_reward=rewards.mean().detach())
    return loss, metrics


MAPO_SNR = 0.5           # mapo-t2i/mapo args.py --snr_value: the constant s of the likelihood proxy
MAPO_TIMESTEPS = 1000    # their num_train_timesteps: the log-odds margin is scaled by T inside the sigmoid


def mapo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0, s=MAPO_SNR,
              num_train_timesteps=MAPO_TIMESTEPS):
    """MaPO (Hong et al. 2024, Eq. 9; mapo-t2i/mapo utils.py), reference-free:

        loss = mean e_θ(w) − β·mean log σ(T·λ(t)·(f(e_θ(w)) − f(e_θ(l)))),   f(e) = s·e / (exp(s·e) − 1)

    f is MaPO's likelihood proxy, decreasing in the error, so the margin term pushes the winner's error down
    relative to the loser's; T (the number of training timesteps) scales the log-odds margin over the whole
    denoising process, as the authors' code does. β weighs the margin term (their --beta_mapo, 0.1), it is not
    the DPO temperature; λ(t) scales the margin inside the sigmoid as in §3.
    """
    def likelihood_proxy(err):
        return s * err / torch.expm1(s * err).clamp(min=1e-12)

    margin_term = num_train_timesteps * scale * (likelihood_proxy(model_err_w) - likelihood_proxy(model_err_l))
    loss = (model_err_w - beta * F.logsigmoid(margin_term)).mean()
    return loss, {
        "accuracy": implicit_accuracy(model_err_l - model_err_w),
        "model_err_w": model_err_w.mean(),
        "model_err_l": model_err_l.mean(),
        "mapo_margin": margin_term.mean(),
    }


def dspo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, scale=1.0, *,
              model_pred_w, ref_pred_w, target_w, sdxl=False):
    """DSPO (Zhu et al. 2025, score-matching form of Eq. 12; huaishengzhu/DSPO train.py), on the winner.

    SD1.5 branch (β = 0.001 in the authors' launchers/sd15.sh):
        loss = mean_CHW ((ε_θ(w) − ε) − β·(1 − σ(z))·(ε_θ(w) − ε_ref(w)))²,   z the §1 logit
    The winner's denoising target is shifted along the policy−reference direction by how badly the pair
    is still ranked, 1 − σ(z).
    SDXL branch (`sdxl=True`; β = 5000 in launchers/sdxl.sh), as the authors' code has it, with no
    denoising term: loss = mean (1 − σ(z))²·d if the batch's mean d = mean_CHW (ε_θ(w) − ε_ref(w))² is at
    least 0.1, else mean (1 − σ(z))².
    Both need the raw predictions, not only the per-sample errors: the trainers pass them because
    `LOSSES["dspo"].needs_predictions` is set.
    """
    margin = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    logits = 0.5 * beta * scale * margin
    weight = 1 - torch.sigmoid(logits)
    model_pred_w, ref_pred_w, target_w = (_at_least_fp32(x) for x in (model_pred_w, ref_pred_w, target_w))
    to_reference = model_pred_w - ref_pred_w
    if sdxl:
        distance = to_reference.pow(2).flatten(1).mean(dim=1)
        loss = (weight.pow(2) * distance).mean() if distance.mean() >= 0.1 else weight.pow(2).mean()
    else:
        weight = weight.view(-1, *([1] * (model_pred_w.dim() - 1)))
        residual = (model_pred_w - target_w) - beta * weight * to_reference
        loss = residual.pow(2).flatten(1).mean(dim=1).mean()
    return loss, _metrics(model_err_w, model_err_l, ref_err_w, ref_err_l, margin, logits)


# DSPO's authors compute the SDXL branch of their loss for SDXL only (launchers/sdxl.sh); every other model
# takes the SD1.5 branch [choice: SD3 and FLUX take the SD1.5 branch; its β is the per-element scale of the
# errors, which the flow models share].
DSPO_SDXL_BRANCH = {"sdxl"}


@dataclass(frozen=True)
class Objective:
    """A loss of this file and what the trainer must compute for it (it skips the rest).

    betas: the default β per model family ("sd15", "sdxl", "sd3"), from the authors' published recipe where
    there is one; "*" for the others. beta_help: what β means for this objective, for the --beta flag."""
    fn: Callable
    betas: dict
    beta_help: str = ""
    needs_reference: bool = True
    needs_loser: bool = True
    needs_predictions: bool = False
    needs_reference_point: bool = False

    def default_beta(self, family: str) -> float | None:
        return self.betas.get(family, self.betas.get("*"))

    def inputs(self, family: str, pred, ref_pred, target, reference_point: float = 0.0) -> dict:
        """What this objective takes beyond the per-sample errors: DSPO the winners' raw predictions (and its
        branch for the model family), KTO its reference point. For KTO the trainers pass [choice: the mean
        implicit reward of the previous optimizer step's pairs over all ranks, 0 at step 1 where policy =
        reference; the official code takes each micro-batch's, which at 1 pair per device is the pair itself]
        (the log's `kto_mean_reward`)."""
        extra = {}
        if self.needs_predictions:
            n = len(pred) // 2
            extra = dict(model_pred_w=pred[:n], ref_pred_w=ref_pred[:n], target_w=target[:n],
                         sdxl=family in DSPO_SDXL_BRANCH)
        if self.needs_reference_point:
            extra["reference_point"] = reference_point
        return extra


# name → objective, for the trainers' --loss flag.
LOSSES = {
    "dpo": Objective(dpo_loss, {"*": 5000.0}, "logit z = (β/2)·λ(t)·(−Δ) (PAPER.md §1; Diffusion-DPO's 5000 for "
                                              "SD1.5 and SDXL; [choice: the same for SD3 and FLUX; no published "
                                              "value])"),
    "hinge": Objective(hinge_loss, {"*": 5000.0}, "on the §1 logit, relu(1 − z) [choice: DPO's 5000; TRL uses its "
                                                  "DPO β]"),
    "ipo": Objective(ipo_loss, {"*": 5000.0}, "IPO's τ = the §1 β as in TRL: each pair's logit is regressed to "
                                              "1/2, i.e. the margin −Δ to 1/(βλ) = 2e-4 at β = 5000"),
    "kto": Objective(kto_loss, {"*": 1000.0}, "Diffusion-KTO's --beta_dpo: reward β·λ(t)·(e_ref − e_θ), no 1/2 "
                                              "(their default 1000; [choice: the same for SDXL, SD3, FLUX; no "
                                              "published value])",
                     needs_reference_point=True),
    "sft": Objective(sft_loss, {"*": None}, "unused", needs_reference=False, needs_loser=False),
    "mapo": Objective(mapo_loss, {"*": 0.1}, "MaPO's --beta_mapo, the weight of the margin term (0.1)",
                      needs_reference=False),
    "dspo": Objective(dspo_loss, {"*": 0.001, "sdxl": 5000.0},
                      "DSPO's --beta_dpo: 0.001 with the SD1.5 branch, 5000 with the SDXL branch (launchers/)",
                      needs_predictions=True),
}
