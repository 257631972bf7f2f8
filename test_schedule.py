"""The equations of schedule.py (PAPER.md §3) with numbers: λ(t), its flow forms, the Cat(γ^k) sampler."""
import math

import pytest
import torch

import schedule
from schedule import bin_probabilities, reward_scale, reward_scale_flow, sample_timesteps, sampler_mean


def sd15_alphas_cumprod():
    # scaled_linear: betas are squares of a linear ramp in √β (diffusers' "scaled_linear")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


PAPER_TABLE = {0: 1.000, 200: 1.037, 400: 1.078, 500: 1.109, 600: 1.155, 700: 1.227,
               800: 1.348, 900: 1.570, 950: 1.750, 999: 2.000}


def test_reward_scale_reproduces_the_paper_table():
    lam = reward_scale(sd15_alphas_cumprod())
    assert lam.shape == (1000,)
    for t, expected in PAPER_TABLE.items():
        assert round(lam[t].item(), 3) == expected, t
    assert torch.all(lam[1:] >= lam[:-1])


def sd3_training_sigmas(shift=3.0, steps=1000):
    sigmas = torch.linspace(1, steps, steps, dtype=torch.float64) / steps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def test_reward_scale_flow_is_finite_bounded_and_increasing_on_the_sd3_grid():
    sigmas = sd3_training_sigmas()
    lam = reward_scale_flow(sigmas)
    assert torch.isfinite(lam).all()
    assert lam.min().item() >= 1.0 and lam.max().item() <= 2.0
    assert lam[0].item() == pytest.approx(1.0) and lam[-1].item() == pytest.approx(2.0)  # σ=1 clamps to 2
    assert torch.all(lam[1:] >= lam[:-1])
    assert lam[500].item() > lam[100].item()


def test_reward_scale_flow_is_the_sd15_function_of_snr():
    # A flow σ with the same SNR as SD1.5's timestep t gets the same λ: σ/(1−σ) = √((1−ᾱ)/ᾱ).
    alphas_cumprod = sd15_alphas_cumprod()
    lam = reward_scale(alphas_cumprod)
    for t in (100, 500, 900):
        ratio = math.sqrt((1 - alphas_cumprod[t].item()) / alphas_cumprod[t].item())
        sigma = torch.tensor([ratio / (1 + ratio)])
        assert reward_scale_flow(sigma).item() == pytest.approx(lam[t].item(), abs=2e-3)


def test_bin_probabilities_are_geometric_and_normalised():
    p = bin_probabilities(0.9, 50)
    assert p.sum().item() == pytest.approx(1.0)
    assert (p[1:] / p[:-1]).tolist() == pytest.approx([0.9] * 49)
    assert bin_probabilities(None, 10).tolist() == pytest.approx([0.1] * 10)


def test_sampler_bin_frequencies_follow_gamma_power_k():
    n, num_bins, gamma = 200_000, 50, 0.9
    t = sample_timesteps(n, 1000, gamma, num_bins, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    k = (999 - t) // 20  # generation-order bin: k = 0 holds t ∈ [980, 999]
    counts = torch.bincount(k, minlength=num_bins).double()
    p = bin_probabilities(gamma, num_bins)
    expected = n * p
    # Pearson χ² with 49 degrees of freedom: the 0.999 quantile is ≈ 85.4
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 85.4
    # and inside a bin t is uniform: bin 0's 20 timesteps each get ≈ 1/20 of it (5 σ binomial bound)
    inside = torch.bincount(t[k == 0] - 980, minlength=20).double()
    per_t = counts[0] / 20
    assert (inside - per_t).abs().max().item() < 5 * math.sqrt(per_t)


def test_sampler_is_deterministic_and_uniform_without_gamma():
    a = sample_timesteps(64, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    uniform = sample_timesteps(100_000, gamma=None, generator=torch.Generator().manual_seed(1))
    deciles = torch.bincount(uniform // 100, minlength=10).double()
    assert (deciles - 10_000).abs().max().item() < 5 * math.sqrt(100_000 * 0.1 * 0.9)
    assert torch.equal(sample_timesteps(8, gamma=1.0, generator=torch.Generator().manual_seed(2)),
                       sample_timesteps(8, gamma=None, generator=torch.Generator().manual_seed(2)))


def test_sampler_rejects_bad_bins():
    with pytest.raises(ValueError, match="num_bins"):
        sample_timesteps(4, num_train_timesteps=10, num_bins=20)


@pytest.mark.parametrize("gamma,num_bins,expected", [(0.9, 50, 1.50), (0.9, 10, 1.27), (None, 50, 1.21)])
def test_sampler_mean_is_the_mean_of_sampled_lambda(gamma, num_bins, expected):
    lam = reward_scale(sd15_alphas_cumprod())
    exact = sampler_mean(lam, gamma, num_bins)
    t = sample_timesteps(400_000, 1000, gamma, num_bins, generator=torch.Generator().manual_seed(0))
    assert lam[t].double().mean().item() == pytest.approx(exact, abs=3e-3)  # ±4 standard errors
    assert exact == pytest.approx(expected, abs=0.005)


def test_normalised_lambda_has_mean_one_under_gamma_09_and_keeps_its_shape():
    lam = reward_scale(sd15_alphas_cumprod())
    normed = lam / sampler_mean(lam, 0.9, 50)  # what --reward_scale_norm trains with
    t = sample_timesteps(400_000, 1000, 0.9, 50, generator=torch.Generator().manual_seed(1))
    assert normed[t].double().mean().item() == pytest.approx(1.0, abs=2e-3)
    assert sampler_mean(normed, 0.9, 50) == pytest.approx(1.0, abs=1e-6)  # λ is float32
    assert (normed[999] / normed[0]).item() == pytest.approx(2.0, rel=1e-6)  # λ(999)/λ(0) as before



def test_lambda_by_step_is_sd15s_lambda_at_each_step():
    from diffusers import DDPMScheduler
    sd15 = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(schedule.sd15_alphas_cumprod(1000).float(), sd15.alphas_cumprod, rtol=1e-5)
    by_step = schedule.reward_scale_by_step(1000)
    assert torch.allclose(by_step, schedule.reward_scale(sd15.alphas_cumprod), atol=1e-5)
    assert by_step[0] == 1.0 and by_step[-1] == pytest.approx(2.0)
