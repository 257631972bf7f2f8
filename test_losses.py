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
    # β = 10: r = −5·(e_θ − e_ref): r_w = (0.25, −0.25), r_l = (−0.25, 0.25); batch mean 0 → Q = 0
    # losses: 1−σ(0.25), 1−σ(−0.25), 1−σ(0.25), 1−σ(−0.25) → mean 0.5
    loss, metrics = kto_loss(MW, ML, RW, RL, beta=10.0)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["kl_baseline"].item() == 0.0
    # shift every policy error down by 0.02: r += 0.1 for all, Q = 0.1, utilities unchanged
    shifted, metrics = kto_loss(MW - 0.02, ML - 0.02, RW, RL, beta=10.0)
    assert metrics["kl_baseline"].item() == pytest.approx(0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert shifted.item() == pytest.approx(0.5)
    # a positive-only shift of the winners changes the loss as the formula says
    loss_w, _ = kto_loss(MW - 0.02, ML, RW, RL, beta=10.0)
    q = max(0.0, (0.35 + -0.15 + -0.25 + 0.25) / 4)
    expected = ((1 - sig(0.35 - q)) + (1 - sig(-0.15 - q)) + (1 - sig(q + 0.25)) + (1 - sig(q - 0.25))) / 4
    assert loss_w.item() == pytest.approx(expected)


def test_mapo_by_hand():
    # f(e) = e / (exp(e) − 1) with s = 1; loss = mean(e_w − β·log σ(f(e_w) − f(e_l)))
    f = lambda e: e / math.expm1(e)
    logsig = lambda x: -math.log1p(math.exp(-x))
    beta = 0.1
    expected = ((0.10 - beta * logsig(f(0.10) - f(0.20))) + (0.20 - beta * logsig(f(0.20) - f(0.10)))) / 2
    loss, metrics = mapo_loss(MW, ML, None, None, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["accuracy"].item() == 0.5


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
        loss, metrics = objective.fn(mw, ml, rw, rl, objective.default_beta, torch.ones(4), **extra)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert all(v.dim() == 0 for v in metrics.values()), name
        if not objective.needs_predictions:
            (grad_w,) = torch.autograd.grad(loss, mw)
            assert grad_w.abs().sum() > 0, name
    assert LOSSES["sft"].needs_reference is False and LOSSES["sft"].needs_loser is False
    assert LOSSES["mapo"].needs_reference is False
    assert LOSSES["dpo"].default_beta == 5000.0
