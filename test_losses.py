"""The equations of losses.py (PAPER.md §1, §7) with numbers, each objective against its authors' code."""
import math

import pytest
import torch

from losses import (LOSSES, dpo_loss, dspo_loss, hinge_loss, implicit_accuracy, ipo_loss, kto_loss,
                    mapo_loss, per_sample_error, reward_margin, sft_loss)


def random_errors(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) * 0.2 + 0.05 for _ in range(4)]


def log1p_exp(x):
    return math.log1p(math.exp(x)) if x < 30 else x


def test_per_sample_error_is_float32_mean_over_non_batch_dims():
    pred = torch.arange(2 * 3 * 2 * 2, dtype=torch.bfloat16).view(2, 3, 2, 2) / 8
    target = torch.zeros_like(pred)
    err = per_sample_error(pred, target)
    assert err.dtype == torch.float32 and err.shape == (2,)
    expected = [sum((i / 8) ** 2 for i in range(12)) / 12, sum((i / 8) ** 2 for i in range(12, 24)) / 12]
    assert err.tolist() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    err_w, err_l, _, _ = random_errors()
    loss, metrics = dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["accuracy"].item() == 0.5  # every pair is a tie: 1/2 each
    assert metrics["reward_margin"].item() == 0.0


def test_dpo_loss_matches_closed_form_on_random_inputs():
    mw, ml, rw, rl = random_errors(seed=1)
    beta = 5000.0
    scale = torch.linspace(1.0, 2.0, 16, dtype=torch.float64)
    loss, metrics = dpo_loss(mw, ml, rw, rl, beta, scale)
    logits = [-0.5 * beta * s * ((a - b) - (c - d)) for a, b, c, d, s in
              zip(mw.tolist(), ml.tolist(), rw.tolist(), rl.tolist(), scale.tolist())]
    expected = sum(log1p_exp(-z) for z in logits) / len(logits)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["accuracy"].item() == pytest.approx(sum(z > 0 for z in logits) / len(logits))
    margins = [(c - a) - (d - b) for a, b, c, d in zip(mw.tolist(), ml.tolist(), rw.tolist(), rl.tolist())]
    assert metrics["reward_margin"].item() == pytest.approx(sum(margins) / len(margins), rel=1e-9)
    assert metrics["model_err_w"].item() == pytest.approx(mw.mean().item())
    assert metrics["ref_err_l"].item() == pytest.approx(rl.mean().item())


def test_lowering_the_winner_error_lowers_the_loss_and_raises_accuracy():
    mw, ml, rw, rl = random_errors(seed=2)
    base_loss, base_metrics = dpo_loss(mw, ml, rw, rl, beta=5000.0)
    better_loss, better_metrics = dpo_loss(mw - 0.1, ml, rw, rl, beta=5000.0)
    assert better_loss.item() < base_loss.item()
    assert better_metrics["accuracy"].item() > base_metrics["accuracy"].item()
    assert better_metrics["reward_margin"].item() == pytest.approx(base_metrics["reward_margin"].item() + 0.1)


def test_scale_multiplies_the_logit():
    mw, ml, rw, rl = random_errors(seed=3)
    scale = torch.full_like(mw, 1.7)
    scaled, _ = dpo_loss(mw, ml, rw, rl, beta=100.0, scale=scale)
    same_as_larger_beta, _ = dpo_loss(mw, ml, rw, rl, beta=170.0)
    assert scaled.item() == pytest.approx(same_as_larger_beta.item(), rel=1e-12)
    per_pair = torch.tensor([1.0, 2.0], dtype=torch.float64)
    loss, _ = dpo_loss(mw[:2], ml[:2], rw[:2], rl[:2], beta=100.0, scale=per_pair)
    margin = reward_margin(mw[:2], ml[:2], rw[:2], rl[:2]).tolist()
    expected = (log1p_exp(-50.0 * margin[0]) + log1p_exp(-100.0 * margin[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_implicit_accuracy_counts_ties_half():
    assert implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx(0.625)


# A two-pair example computed by hand: pair 0 already prefers the winner, pair 1 prefers the loser.
MW, ML, RW, RL = (torch.tensor(v, dtype=torch.float64) for v in
                  ([0.10, 0.20], [0.20, 0.10], [0.15, 0.15], [0.15, 0.15]))
# margins −Δ: pair 0: (0.15−0.10) − (0.15−0.20) = 0.10; pair 1: (0.15−0.20) − (0.15−0.10) = −0.10


def test_hinge_by_hand():
    # z = (β/2)·margin with β = 10: z = (0.5, −0.5) → relu(1 − z) = (0.5, 1.5)
    loss, metrics = hinge_loss(MW, ML, RW, RL, beta=10.0)
    assert loss.item() == pytest.approx(1.0)
    assert metrics["accuracy"].item() == 0.5


def test_ipo_by_hand():
    # h = margin/2 = (0.05, −0.05); target 1/(2β) = 0.05 with β = 10 → ((0)², (−0.1)²) → mean 0.005
    loss, _ = ipo_loss(MW, ML, RW, RL, beta=10.0)
    assert loss.item() == pytest.approx(0.005)


def test_sft_by_hand():
    loss, _ = sft_loss(MW, None, None, None)
    assert loss.item() == pytest.approx(0.15)


def test_kto_by_hand():
    # β = 10 (the authors' convention, no 1/2): r = 10·(e_ref − e_θ): r_w = (0.5, −0.5), r_l = (−0.5, 0.5);
    # batch mean 0 → Q = 0; losses 1−σ(0.5), 1−σ(−0.5), 1−σ(0.5), 1−σ(−0.5) → mean 0.5
    loss, metrics = kto_loss(MW, ML, RW, RL, beta=10.0)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["kl_baseline"].item() == 0.0
    # shift every policy error down by 0.02: r += 0.2 for all, Q = 0.2, utilities unchanged
    shifted, metrics = kto_loss(MW - 0.02, ML - 0.02, RW, RL, beta=10.0)
    assert metrics["kl_baseline"].item() == pytest.approx(0.2)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert shifted.item() == pytest.approx(0.5)
    # a positive-only shift of the winners changes the loss as the formula says
    loss_w, _ = kto_loss(MW - 0.02, ML, RW, RL, beta=10.0)
    q = max(0.0, (0.7 + -0.3 + -0.5 + 0.5) / 4)
    expected = ((1 - sig(0.7 - q)) + (1 - sig(-0.3 - q)) + (1 - sig(q + 0.5)) + (1 - sig(q - 0.5))) / 4
    assert loss_w.item() == pytest.approx(expected)
    # a reference point given by the caller (a whole step's) replaces the batch's own, clamped at 0
    given, metrics = kto_loss(MW, ML, RW, RL, beta=10.0, reference_point=0.3)
    expected = ((1 - sig(0.5 - 0.3)) + (1 - sig(-0.5 - 0.3)) + (1 - sig(0.3 + 0.5)) + (1 - sig(0.3 - 0.5))) / 4
    assert given.item() == pytest.approx(expected) and metrics["kl_baseline"].item() == pytest.approx(0.3)
    assert kto_loss(MW, ML, RW, RL, beta=10.0, reference_point=-1.0)[1]["kl_baseline"].item() == 0.0


def test_mapo_by_hand():
    # f(e) = s·e / (exp(s·e) − 1) with s = 0.5; loss = mean(e_w − β·log σ(T·(f(e_w) − f(e_l)))), T = 1000
    f = lambda e: 0.5 * e / math.expm1(0.5 * e)
    logsig = lambda x: -math.log1p(math.exp(-x)) if x > -30 else x
    beta = 0.1
    expected = ((0.10 - beta * logsig(1000 * (f(0.10) - f(0.20)))) +
                (0.20 - beta * logsig(1000 * (f(0.20) - f(0.10))))) / 2
    loss, metrics = mapo_loss(MW, ML, None, None, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["accuracy"].item() == 0.5


# The authors' losses, written out from their code (not from losses.py): each takes the raw predictions of a
# [winners; losers] batch as their training loops do.

def mapo_official(model_pred, target, beta_mapo=0.1, snr_value=0.5, num_train_timesteps=1000):
    """mapo-t2i/mapo utils.py compute_loss (args.py defaults: --beta_mapo 0.1, --snr_value 0.5); their .float()
    casts are left out to compare in float64."""
    model_losses = torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = torch.nn.functional.logsigmoid(log_odds * num_train_timesteps)
    return model_losses_w.mean() - (beta_mapo * ratio).mean()


def kto_official(model_pred, ref_pred, target, labels, beta_dpo=1000):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py, --loss kto --halo sigmoid --bce_offset none, one
    process: per-image errors, a detached batch-mean KL clamped at 0, λ_d = λ_u = 1."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_loss = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    g_term = -model_losses - (-ref_loss)
    kl = g_term.mean().detach().clamp(min=0).detach()
    label_scale_g = (2 * labels - 1) * beta_dpo * (g_term - kl)
    return (1 - torch.sigmoid(label_scale_g)).mean()


def dspo_official(model_pred, ref_pred, target, beta_dpo, sdxl):
    """huaishengzhu/DSPO train.py, the DSPO branch for SD1.5 (--beta_dpo 0.001) and SDXL (--sdxl, 5000)."""
    model_diff_w, model_diff_l = (model_pred - target).chunk(2)
    model_losses_w = model_diff_w.pow(2).mean(dim=[1, 2, 3])
    model_losses_l = model_diff_l.pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = (ref_pred - target).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    inside_term = -0.5 * beta_dpo * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    pred2, _ = (model_pred - ref_pred).chunk(2)
    weight = (1 - torch.sigmoid(inside_term))[:, None, None, None]
    if sdxl:
        if pred2.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
            return (weight * pred2).pow(2).mean(dim=[1, 2, 3]).mean()
        return weight.pow(2).mean(dim=[1, 2, 3]).mean()
    return (model_diff_w - beta_dpo * weight * pred2).pow(2).mean(dim=[1, 2, 3]).mean()


def pair_batch(seed, scale_ref=0.01):
    """A [winners; losers] batch of 3 pairs: predictions of a policy, of a reference near it, and targets."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    model_pred = target + 0.3 * torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    ref_pred = model_pred + scale_ref * torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    return model_pred.requires_grad_(), ref_pred, target


def errors(model_pred, ref_pred, target):
    """Per-sample errors as per_sample_error computes them, kept in float64 (it rounds to float32, and β up to
    5000 or MaPO's T = 1000 would then amplify the rounding past the comparison's tolerance)."""
    model_err, ref_err = ((p - target).pow(2).flatten(1).mean(1) for p in (model_pred, ref_pred))
    return model_err[:3], model_err[3:], ref_err[:3], ref_err[3:]


def test_mapo_is_the_authors_loss_value_and_gradient():
    model_pred, ref_pred, target = pair_batch(0)
    ours, _ = mapo_loss(*errors(model_pred, ref_pred, target)[:2], None, None, beta=0.1)
    theirs = mapo_official(model_pred, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    (g_ours,), (g_theirs,) = (torch.autograd.grad(x, model_pred) for x in (ours, theirs))
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-9)


def test_kto_is_the_authors_loss_with_their_beta():
    model_pred, ref_pred, target = pair_batch(1, scale_ref=0.02)
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    ours, _ = kto_loss(*errors(model_pred, ref_pred, target), beta=LOSSES["kto"].default_beta("sd15"))
    theirs = kto_official(model_pred, ref_pred, target, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    (g_ours,), (g_theirs,) = (torch.autograd.grad(x, model_pred) for x in (ours, theirs))
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family,sdxl", [("sd15", False), ("sdxl", True)])
@pytest.mark.parametrize("scale_ref", [0.01, 0.5])  # the SDXL branch switches at a distance of 0.1
def test_dspo_is_the_authors_loss_for_each_branch_and_recipe_beta(family, sdxl, scale_ref):
    model_pred, ref_pred, target = pair_batch(2, scale_ref=scale_ref)
    beta = LOSSES["dspo"].default_beta(family)
    assert beta == (5000.0 if sdxl else 0.001)  # launchers/sdxl.sh and launchers/sd15.sh
    ours, _ = dspo_loss(*errors(model_pred, ref_pred, target), beta=beta, model_pred_w=model_pred[:3],
                        ref_pred_w=ref_pred[:3], target_w=target[:3], sdxl=sdxl)
    theirs = dspo_official(model_pred, ref_pred, target, beta, sdxl)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    (g_ours,), (g_theirs,) = (torch.autograd.grad(x, model_pred) for x in (ours, theirs))
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-12)


def test_mapo_preference_gradient_is_the_authors_not_500_times_weaker():
    """Relative to the winner term (gradient 1/N), the authors' T·(·) inside the log-sigmoid and s = 0.5 make
    the margin term's gradient about 500× that of the earlier form, log σ(f(e_w) − f(e_l)) with s = 1."""
    e_w = torch.tensor([0.1], dtype=torch.float64)
    e_l = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(mapo_loss(e_w, e_l, None, None, beta=0.1)[0], e_l)
    (earlier,) = torch.autograd.grad(mapo_loss(e_w, e_l, None, None, beta=0.1, s=1.0, num_train_timesteps=1)[0], e_l)
    assert 450 < (ours / earlier).item() < 550


def test_dspo_by_hand():
    # one pair, one element: ε = 0, ε_θ(w) = 0.3, ε_ref(w) = 0.1 → e_θ(w) = 0.09, e_ref(w) = 0.01;
    # loser errors equal: margin = 0.01 − 0.09 = −0.08; β = 1: z = −0.04
    target = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    pred_w = torch.full_like(target, 0.3)
    ref_w = torch.full_like(target, 0.1)
    e = lambda x: torch.tensor([x], dtype=torch.float64)
    loss, _ = dspo_loss(e(0.09), e(0.05), e(0.01), e(0.05), beta=1.0,
                        model_pred_w=pred_w, ref_pred_w=ref_w, target_w=target)
    weight = 1 - 1 / (1 + math.exp(0.04))
    assert loss.item() == pytest.approx((0.3 - weight * 0.2) ** 2, rel=1e-6)


def test_every_objective_runs_through_the_table_and_backpropagates():
    mw, ml, rw, rl = (e.float().requires_grad_(i < 2) for i, e in enumerate(random_errors(n=4, seed=5)))
    preds = {"model_pred_w": torch.randn(4, 2, 3, 3), "ref_pred_w": torch.randn(4, 2, 3, 3),
             "target_w": torch.randn(4, 2, 3, 3)}
    for name, objective in LOSSES.items():
        extra = preds if objective.needs_predictions else {}
        loss, metrics = objective.fn(mw, ml, rw, rl, objective.default_beta("sd15"), torch.ones(4), **extra)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert all(v.dim() == 0 for v in metrics.values()), name
        if not objective.needs_predictions:
            (grad_w,) = torch.autograd.grad(loss, mw)
            assert grad_w.abs().sum() > 0, name
    assert LOSSES["sft"].needs_reference is False and LOSSES["sft"].needs_loser is False
    assert LOSSES["mapo"].needs_reference is False
    assert LOSSES["dpo"].default_beta("sd15") == 5000.0 and LOSSES["kto"].default_beta("sdxl") == 1000.0
