"""Timestep-aware training (PAPER.md §3): the reward-scale schedule λ(t) and early-step over-sampling.

Torch only. Convention: a larger training timestep t (or flow σ) is noisier; "early generation steps"
are the noisiest ones, where the paper measures the lowest implicit-reward scale and accuracy.
"""
import torch

# 1/√SNR at the two ends of SD1.5/SDXL's scaled-linear schedule (β 0.00085 → 0.012, T = 1000): the flow
# version of λ clamps to this range so that it is the same function of the noise level (see below).
SD15_INV_SQRT_SNR_MIN = 0.029167
SD15_INV_SQRT_SNR_MAX = 14.6146


def _minmax_to_reward_scale(inv_sqrt_snr: torch.Tensor, lo, hi) -> torch.Tensor:
    return 1.0 + (inv_sqrt_snr - lo) / (hi - lo)


def reward_scale(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ(t) = 1 + minmax(1/√SNR(t)), SNR(t) = ᾱ_t / (1 − ᾱ_t), min–max over t ∈ {0 … T−1} (§3, item 2).

    Returns a float32 Tensor[T] in [1, 2], 1 at the cleanest step and 2 at the noisiest. Index it with the
    sampled timesteps to get the per-pair `scale` of losses.py.
    """
    alphas_cumprod = alphas_cumprod.double()
    inv_sqrt_snr = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return _minmax_to_reward_scale(inv_sqrt_snr, inv_sqrt_snr.min(), inv_sqrt_snr.max()).float()


def reward_scale_flow(sigmas: torch.Tensor, inv_sqrt_snr_min: float = SD15_INV_SQRT_SNR_MIN,
                      inv_sqrt_snr_max: float = SD15_INV_SQRT_SNR_MAX) -> torch.Tensor:
    """λ(σ) for flow matching (§3–§4), x_σ = (1 − σ)x0 + σε, where 1/√SNR = σ / (1 − σ).

    That ratio is unbounded at σ = 1, so min–max over the grid is undefined. [choice: the ratio is
    clamped to the range it spans on SD1.5's schedule, [0.0292, 14.61], and min–max normalised over that
    fixed range; PAPER.md §3] λ is then the same function of the noise level (SNR) as on SD1.5: 2 for
    σ ≥ 0.936, 1 for σ ≤ 0.028, finite everywhere, and independent of which σ happen to be in a batch.
    """
    sigmas = sigmas.double()
    inv_sqrt_snr = (sigmas / (1 - sigmas).clamp(min=1e-12)).clamp(inv_sqrt_snr_min, inv_sqrt_snr_max)
    return _minmax_to_reward_scale(inv_sqrt_snr, inv_sqrt_snr_min, inv_sqrt_snr_max).float()


def sd15_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ_t of SD1.5's (and SDXL's) scaled-linear schedule: β_t from √0.00085 to √0.012, squared."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def reward_scale_by_step(num_train_timesteps: int = 1000) -> torch.Tensor:
    """λ for flow matching by generation step rather than by noise level [choice: --flow_lambda step; the paper
    frames §3 over generation steps]: the i-th
    point of a flow model's σ grid gets the λ(t) that SD1.5's schedule gives its i-th timestep.

    λ(σ) of `reward_scale_flow` matches noise levels, and a shifted flow grid spends most of its steps at noise
    SD1.5 reaches only in its last few, so ~60 % of the pairs under γ = 0.9 sit at λ = 2 (mean λ 1.80 on SD3,
    against 1.50 on SD1.5). Matching by step keeps §3's shape over the *generation steps*, the paper's framing of
    λ, and with it SD1.5's distribution of λ under the sampler (mean 1.50).
    """
    return reward_scale(sd15_alphas_cumprod(num_train_timesteps))


def bin_probabilities(gamma: float | None, num_bins: int) -> torch.Tensor:
    """P(k) = γ^k / Σ_j γ^j over bins k = 0 … K−1 in generation order, k = 0 the noisiest (§3, item 1)."""
    if gamma is None or gamma == 1.0:
        return torch.full((num_bins,), 1.0 / num_bins, dtype=torch.float64)
    weights = torch.tensor(gamma, dtype=torch.float64) ** torch.arange(num_bins, dtype=torch.float64)
    return weights / weights.sum()


def sample_timesteps(n: int, num_train_timesteps: int = 1000, gamma: float | None = 0.9,
                     num_bins: int = 50, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """Draw n training timesteps with the early steps over-sampled (§3, item 1): k ~ Cat(γ^k), then t
    uniform inside bin k.

    [choice: K = `num_bins` intervals of T/K timesteps, bin k = 0 holding the largest t; Yang et al. 2024's
    grid is the 50 sampler steps (PAPER.md §3)] `gamma=None` or 1.0 gives uniform t, as
    in plain Diffusion-DPO. Deterministic under a seeded CPU `generator`; the result is moved to `device`.
    """
    if not 1 <= num_bins <= num_train_timesteps:
        raise ValueError(f"num_bins must be in [1, {num_train_timesteps}], got {num_bins}")
    if gamma is None or gamma == 1.0:
        timesteps = torch.randint(0, num_train_timesteps, (n,), generator=generator)
        return timesteps.to(device)
    if not 0.0 < gamma:
        raise ValueError(f"gamma must be positive, got {gamma}")
    edges = torch.linspace(0, num_train_timesteps, num_bins + 1).round().long()
    k = torch.multinomial(bin_probabilities(gamma, num_bins), n, replacement=True, generator=generator)
    low, high = edges[num_bins - 1 - k], edges[num_bins - k]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    timesteps = low + (u * (high - low)).long().clamp(max=(high - low - 1))
    return timesteps.to(device)


def sampler_mean(values: torch.Tensor, gamma: float | None, num_bins: int) -> float:
    """E[values[t]] when t is drawn by `sample_timesteps(gamma, num_bins)`, exactly: each bin's probability
    spread evenly over its timesteps. values: Tensor[T], e.g. λ(t) of `reward_scale`.

    For the λ(t) ablation of the trainers' --reward_scale_norm: λ(t)/E[λ] keeps the schedule's shape over t
    but sets its mean under the active sampler to 1 (λ alone raises the effective β: E[λ] ≈ 1.50 under
    γ = 0.9 with 50 bins, ≈ 1.21 under uniform t, on SD1.5's schedule).
    """
    num_train_timesteps = len(values)
    edges = torch.linspace(0, num_train_timesteps, num_bins + 1).round().long()
    weights = torch.empty(num_train_timesteps, dtype=torch.float64)
    for k, p in enumerate(bin_probabilities(gamma, num_bins).tolist()):  # bin k = 0 holds the largest t
        low, high = edges[num_bins - 1 - k], edges[num_bins - k]
        weights[low:high] = p / (high - low)
    if gamma is None or gamma == 1.0:
        weights.fill_(1.0 / num_train_timesteps)
    return float((weights * values.double()).sum())
