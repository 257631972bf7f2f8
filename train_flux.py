"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for FLUX.1 (flow matching).

Algorithm 1 of Kang et al. (AAAI 2026) for FLUX.1, top to bottom: flags, models, data, then the loop. With no
arguments this runs the FLUX recipe, LoRA on one GPU [choice: every FLUX setting; the paper trains no FLUX model]:
FLUX.1-dev at 1024 px, Pick-a-Pic v2, a rank-8 LoRA adapter (the reference a second adapter) at lr 1e-5 with
gradient checkpointing, effective batch 32, 2000 steps, β = 5000, the reference updated every τ = 32 steps under
the monitor δ = 0.002, γ = 0.9 over-sampling of the noisy end of FLUX's own σ grid at the training resolution and
the flow version of λ(t). FLUX.1-dev's weights are under a non-commercial licence.

    python train_flux.py                                   # one GPU, LoRA (accumulation 32)
    torchrun --nproc_per_node=8 train_flux.py              # 8 GPUs (accumulation 4 each)
    python train_flux.py --tiny                            # offline CPU demo: tiny FLUX-layout model (~1 min)
    python train_flux.py --resume latest                   # continue the run in --output_dir
    python train_flux.py --lora_rank 0 --optimizer adafactor   # full fine-tune (12B: several GPUs)
    python train_flux.py --pretrained_model black-forest-labs/FLUX.1-schnell --t5_max_length 256  # no guidance input
    python train_flux.py --method plain                    # plain Diffusion-DPO

What differs from train_sd3.py: FluxPipeline's components (CLIP-L's pooled output and T5's sequence states), the
16-channel VAE's (z − shift)·scale latents packed 2×2 into a sequence with (0, row, col) position ids, FLUX.1-dev's
distilled guidance input, and the σ grid shifted as FluxPipeline samples: by the resolution (μ from the image's
sequence length) for FLUX.1-dev, by the scheduler's static shift (1: none) for FLUX.1-schnell. Output:
OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-STEP/ and the adapter in OUTPUT_DIR/final_lora/
(`FluxPipeline.load_lora_weights`), or with --lora_rank 0 the pipeline in OUTPUT_DIR/final/.
"""
import copy
import math
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from einops import rearrange
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import losses
import plot
import reference
import rewards
import schedule
from mechanics import checkpoints, errors, flags, folder, loading, lora, modelcard, runtime, samples, trainlog
from offline import tiny

# [choice: LoRA r8 at lr 1e-5 and effective batch 32; diffusers' Diffusion-DPO LoRA example's settings] τ, δ, β, γ
# as SD3 (the paper's SDXL values); gradient checkpointing: 12B parameters at 4096 image tokens (README, memory).
FAMILY = "flux"  # the model family: its pipeline class, its published β per objective, its log lines
RECIPE = dict(pretrained_model="black-forest-labs/FLUX.1-dev", resolution=1024, lora_rank=8, learning_rate=1e-5,
              scale_lr=False, effective_batch_size=32, warmup_steps=100, max_steps=2000, tau=32, delta=0.002,
              gradient_checkpointing=True, validation_every=100, output_dir="out/flux")
# --tiny: the offline demo's small-scale recipe, on a tiny random FLUX of the real classes (tiny/) and the
# built-in smooth-vs-noise pairs, both made once in the cache; each value a flag's default, which a flag overrides.
TINY_RECIPE = dict(pretrained_model=lambda v: tiny.pipeline_path(FAMILY), dataset=lambda v: tiny.builtin_pairs_path(),
                   resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5, scale_lr=False,
                   warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0, tau=8, delta=0.05,
                   dataloader_workers=0, divergence_every=5, cpu_threads=1, gradient_checkpointing=False,
                   t5_max_length=32, validation_every=30, sample_steps=4)


@dataclass
class Models:
    """FLUX.1: CLIP-L (pooled output only) and T5 (sequence), a 16-channel VAE with a latent shift, and a
    velocity-prediction transformer on 2×2-packed latents, trained by rectified flow on FLUX's σ grid at the
    training resolution (§4); `guidance` is FLUX.1-dev's distilled guidance input (None for FLUX.1-schnell)."""
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: T5TokenizerFast
    text_encoder_2: T5EncoderModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    transformer: FluxTransformer2DModel
    device: torch.device
    dtype: torch.dtype
    sigmas: torch.Tensor
    guidance: float | None
    t5_max_length: int


def sigma_grid(scheduler, image_seq_len: int) -> torch.Tensor:
    """FLUX's training grid at this resolution, indexed like a DDPM timestep (σ grows with the index): s = i/T for
    i = 1 … T shifted as FlowMatchEulerDiscreteScheduler.set_timesteps shifts FluxPipeline's sampling σ. With
    `use_dynamic_shifting` (FLUX.1-dev), σ = e^μ / (e^μ + 1/s − 1), with μ interpolated between base_shift at
    256 image tokens and max_shift at 4096 (μ = 1.15 at 1024 px, 0.63 at 512 px); without it (FLUX.1-schnell),
    the config's static σ = shift·s / (1 + (shift − 1)·s), whatever the resolution (shift 1: s itself). The
    Cat(γ^k) sampler of schedule.py then over-samples the noisy end, the early generation steps (§3)."""
    c = scheduler.config
    s = torch.arange(1, c.num_train_timesteps + 1, dtype=torch.float64) / c.num_train_timesteps
    if not c.use_dynamic_shifting:
        return (c.shift * s / (1 + (c.shift - 1) * s)).float()
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = c.base_shift + slope * (image_seq_len - c.base_image_seq_len)
    return scheduler.time_shift(mu, 1.0, s).float()


def load_models(path: str, device, dtype, resolution: int, guidance_scale: float, t5_max_length: int) -> Models:
    """The pipeline's components: the frozen ones in the training dtype, the transformer in fp32 (trained)."""
    tokenizer = loading.load(CLIPTokenizer, path, "tokenizer")
    text_encoder = loading.frozen(loading.load(CLIPTextModel, path, "text_encoder"), device, dtype)
    loading.check_tokenizer(tokenizer, text_encoder, "tokenizer")
    tokenizer_2 = loading.load(T5TokenizerFast, path, "tokenizer_2")
    text_encoder_2 = loading.frozen(loading.load(T5EncoderModel, path, "text_encoder_2"), device, dtype)
    loading.check_tokenizer(tokenizer_2, text_encoder_2, "tokenizer_2")
    # FLUX is a bf16 model end to end: its VAE runs in the training dtype, as FluxPipeline runs it.
    vae = loading.frozen(loading.load(AutoencoderKL, path, "vae"), device, dtype)
    transformer = loading.load(FluxTransformer2DModel, path, "transformer")
    scheduler = loading.load(FlowMatchEulerDiscreteScheduler, path, "scheduler")
    latent_size = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    guidance = guidance_scale if transformer.config.guidance_embeds else None
    return Models(tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, scheduler, transformer,
                  torch.device(device), dtype, sigma_grid(scheduler, (latent_size // 2) ** 2).to(device), guidance,
                  t5_max_length)


@torch.no_grad()
def encode_images(m: Models, pixels):
    """Pixels → the VAE posterior's parameters (mean, log-variance); --cache_latents stores these."""
    return loading.vae_moments(m.vae, pixels, m.device)


@torch.no_grad()
def encode_captions(m: Models, captions):
    """As FluxPipeline.encode_prompt: T5's last hidden states [n, L, D] are the sequence the transformer attends
    to; CLIP-L's pooled output [n, P] goes into the timestep embedding."""
    ids = m.tokenizer(captions, padding="max_length", truncation=True, max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    pooled = m.text_encoder(ids.to(m.device)).pooler_output
    ids = m.tokenizer_2(captions, padding="max_length", truncation=True, max_length=m.t5_max_length,
                        return_tensors="pt").input_ids
    return {"encoder_hidden_states": m.text_encoder_2(ids.to(m.device))[0], "pooled_projections": pooled}


def encode(m: Models, batch, generator):
    """A batch → latents (z − shift)·scale [2B] (winners then losers; §4), sampled from the VAE posterior with
    the micro-batch's generator, and per image its prompt states, pooled projection and (FLUX.1-dev) guidance."""
    moments = batch["latent_moments"] if "latent_moments" in batch else encode_images(m, batch["pixel_values"])
    prompts = batch.get("prompt_embeds") or encode_captions(m, batch["captions"])
    z = DiagonalGaussianDistribution(moments.to(m.device)).sample(generator)
    latents = (z - m.vae.config.shift_factor) * m.vae.config.scaling_factor
    cond = {"encoder_hidden_states": prompts["encoder_hidden_states"].to(m.device).repeat(2, 1, 1),
            "pooled_projections": prompts["pooled_projections"].to(m.device).repeat(2, 1)}
    if m.guidance is not None:
        cond["guidance"] = torch.full((latents.shape[0],), m.guidance, device=m.device)
    return latents.to(m.dtype), cond


def add_noise(m: Models, latents, noise, index):
    """x_σ = (1 − σ)·x0 + σ·ε at σ = m.sigmas[index], and the velocity target v = ε − x0 the model predicts
    (PAPER.md §4)."""
    sigma = m.sigmas[index].view(-1, 1, 1, 1)  # fp32, whatever the latents' dtype
    return ((1 - sigma) * latents + sigma * noise).to(latents.dtype), noise - latents


def pack(latents):
    """[n, C, H, W] → [n, (H/2)(W/2), 4C]: each 2×2 patch of the latent image one token, row by row."""
    return rearrange(latents, "n c (h ph) (w pw) -> n (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens, h: int, w: int):
    """The inverse of `pack` for an [H, W] latent image."""
    return rearrange(tokens, "n (h w) (c ph pw) -> n c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def image_ids(h: int, w: int, device, dtype):
    """The 3-axis RoPE position of each packed token: (0, row, column); the text tokens' ids are all 0."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device, dtype)


def predict(transformer, noisy, t, cond):
    """The transformer reads the packed latents with their ids and the timestep σ = t / 1000 (as FluxPipeline
    passes it); its packed velocity prediction is unpacked to the latents' shape."""
    h, w = noisy.shape[-2:]
    text = cond["encoder_hidden_states"]
    out = transformer(hidden_states=pack(noisy), timestep=t / 1000, guidance=cond.get("guidance"),
                      pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                      txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                      img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
    return unpack(out, h, w)


def monitor_probe(m: Models, batch, num_samples, generators, run, chunk) -> reference.Probe:
    """The inputs of §2's monitor: num_samples of the batch's winners (cycling through them), each noised at
    one σ ~ U(grid) with one ε, drawn once so that p_init, the reference and the policy see the same inputs."""
    latents, cond = encode(m, batch, generators[1])
    index = torch.arange(num_samples, device=m.device) % (latents.shape[0] // 2)  # winners come first
    latents, cond = latents[index], {k: v[index] for k, v in cond.items()}
    num_train_timesteps = m.scheduler.config.num_train_timesteps
    at = schedule.sample_timesteps(num_samples, num_train_timesteps, gamma=None, generator=generators[0]).to(m.device)
    noise = torch.randn(latents.shape, generator=generators[1], device=m.device, dtype=latents.dtype)
    noisy, target = add_noise(m, latents, noise, at)
    return reference.Probe(predict, noisy, m.sigmas[at] * num_train_timesteps, cond, target, chunk, run.autocast)


def model_flags(parser):
    parser.add_argument("--guidance_scale", type=float, default=3.5,
                        help="FLUX.1-dev's distilled guidance input during training [choice: 3.5; diffusers' FLUX training "
                             "scripts' and FluxPipeline's sampling default, so that the preference is learnt in the "
                             "mode the model samples in (SimpleTuner trains at 1.0)]; ignored by FLUX.1-schnell")
    parser.add_argument("--t5_max_length", type=int, default=512,
                        help="T5 tokens per prompt (FluxPipeline: 512 for FLUX.1-dev, 256 for FLUX.1-schnell)")
    parser.add_argument("--flow_lambda", default="snr", choices=["snr", "step"],
                        help="λ for flow matching [choice: snr; §3 defines λ by the noise level]: 'snr' = §3's "
                             "1 + minmax(1/√SNR) by noise level (1/√SNR = σ/(1 − σ) clamped to SD1.5's range); "
                             "'step' = by generation step, the i-th grid point taking SD1.5's λ of its i-th timestep "
                             "(the same mean λ as SD1.5)")


def train(argv=None) -> int:
    """Algorithm 1 for this model: returns the exit code (0 done, 3 diverged, 128 + N stopped by signal N)."""
    args, defaults = flags.resolve(argv, __doc__, FAMILY, RECIPE, TINY_RECIPE, losses.LOSSES, reference.METHODS,
                                   resolution_multiple=16, model_flags=model_flags)
    run = runtime.start(args, FAMILY)
    heldout_reward = rewards.load(args.eval_reward, run.device) if args.eval_every and run.is_main else None
    if args.tiny:  # the demo's model and pairs, made once and cached
        loading.ensure_tiny(args, run)
    model_path = loading.pipeline_folder(args, FAMILY)
    m = load_models(model_path, run.device, run.weight_dtype, args.resolution, args.guidance_scale,
                    args.t5_max_length)
    encoders = partial(encode_images, m), partial(encode_captions, m)
    loader = loading.pair_loader(args, run, *encoders)
    # §2's monitor measures D(p_ref, p_init) on a probe: --monitor_samples winners of the data, each with a grid
    # point drawn uniformly and an ε, drawn once and kept in the checkpoint (--monitor batch: the last micro-batch).
    probe_pairs = next(iter(loading.pair_loader(args, run, *encoders, batch_size=args.monitor_samples, num_workers=0,
                                                seed=args.seed + reference.PROBE_SEED, caption_dropout=0.0,
                                                announce=False)))
    probe = monitor_probe(m, probe_pairs, args.monitor_samples,
                          runtime.micro_generators(args.seed, 0, reference.MONITOR_STREAM, run.device), run,
                          chunk=2 * args.train_batch_size)
    if args.cache_latents:
        loading.to_cpu(m.vae, m.text_encoder, m.text_encoder_2, device=run.device)  # never run again
    num_train_timesteps = m.scheduler.config.num_train_timesteps
    sigmas = m.sigmas  # [T], σ grows with the index: FLUX's grid at --resolution
    timesteps = sigmas * num_train_timesteps  # σ·T of each grid point (predict hands the transformer σ = t / T)
    reward_scale = (schedule.reward_scale_flow(sigmas) if args.flow_lambda == "snr"  # λ(σ) of §3 for flow matching
                    else schedule.reward_scale_by_step(num_train_timesteps).to(run.device))
    if args.no_reward_scale:
        reward_scale = torch.ones_like(reward_scale)
    elif args.reward_scale_norm:  # ablation: the same shape over t, mean 1 under the sampler
        reward_scale = reward_scale / schedule.sampler_mean(reward_scale, args.gamma, args.num_bins)

    transformer = m.transformer.to(run.device).train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    # The reference starts as the pretrained weights, which are also p_init (§2); with LoRA it is a second
    # adapter (or, for τ = 0, the adapters switched off) of the same transformer.
    if args.lora_rank:
        lora.add_lora(transformer, args.lora_rank, args.lora_alpha, reference_adapter=args.tau > 0,
                      base_dtype=run.weight_dtype, seed=args.seed)
        ref_source, ref_view = lora.views(transformer, args.tau)
        ref = reference.Reference(ref_source, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge,
                                  model=ref_view)
    elif args.fsdp:  # policy and reference sharded alike: the τ copy and p_init's restore stay shard to shard
        ref_model = runtime.shard(copy.deepcopy(transformer).requires_grad_(False), run)
        transformer = runtime.shard(transformer, run)
        ref = reference.Reference(transformer, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge, model=ref_model)
        ref_source = transformer
    else:
        ref = reference.Reference(transformer, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge,
                                  dtype=run.autocast_dtype)
        ref_source = transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, lr_schedule = runtime.optimizer(args, params)
    scaler = run.grad_scaler()
    log = trainlog.TrainLog(args, run, num_train_timesteps, desc=f"{FAMILY} {args.loss}")
    ckpt = checkpoints.Checkpoints(args, run, model_path, defaults, policy=transformer, reference=ref, optimizer=optimizer,
                                   lr_schedule=lr_schedule, loader=loader, scaler=scaler, monitor_probe=probe, log=log)
    step = ckpt.resume()  # refuses a checkpoint of another run (README, "Checkpoints and resume")
    log.begin(step)
    # What the run shows while it trains: the base pipeline's sampler around the policy (mechanics/samples.py).
    sampler = samples.Sampler(args, run, model_path, dict(
        tokenizer=m.tokenizer, text_encoder=m.text_encoder, tokenizer_2=m.tokenizer_2,
        text_encoder_2=m.text_encoder_2, vae=m.vae, transformer=transformer), "transformer",
        offloaded=(m.vae, m.text_encoder, m.text_encoder_2) if args.cache_latents else (), reward=heldout_reward)
    ddp_transformer = runtime.ddp(transformer, run)
    transformer_forward = runtime.maybe_compile(ddp_transformer, args.compile)
    ref_forward = runtime.maybe_compile(ref.model, args.compile and not args.lora_rank)  # LoRA: eager
    objective = losses.LOSSES[args.loss]
    accumulation = args.gradient_accumulation_steps
    batches = iter(loader)
    kto_point = 0.0  # Diffusion-KTO's reference point (losses.Objective.inputs: the last step's mean reward)

    with log:  # closed however the loop ends (a return, an error): its progress bar and tracker
        if step == 0 and args.eval_every:  # the base model: what the held-out curve starts from
            log.record(0, **sampler.heldout(0))
        if step == 0 and args.validation_every:
            log.image(0, "validation", sampler.validation(0))
        while step < args.max_steps:
            step_loss = step_reward = 0.0
            for micro in range(accumulation):
                batch = next(batches, None)
                if batch is None:  # a signal stopped the loader while no pair would decode: exit, no checkpoint
                    return 128 + run.signals.signum
                micro_index = micro * run.world_size + run.rank  # the global micro-batch: seeds its draws
                generators = runtime.micro_generators(args.seed, step, micro_index, run.device)
                latents, cond = encode(m, batch, generators[1])  # [2B]: winners, then losers
                n = latents.shape[0] // 2
                # §3: one grid point per pair, the early (noisy) steps over-sampled by Cat(γ^k); its timestep
                # and its reward scale λ(t).
                index = schedule.sample_timesteps(n, num_train_timesteps, args.gamma, args.num_bins,
                                                  generator=generators[0]).to(run.device)
                t, scale = timesteps[index], reward_scale[index]
                # §1: one ε per pair, shared by its winner and loser; SFT needs the winners only.
                noise = torch.randn(latents[:n].shape, generator=generators[1], device=run.device,
                                    dtype=latents.dtype)
                k = 2 if objective.needs_loser else 1
                noisy, target = add_noise(m, latents[:k * n], noise.repeat(k, 1, 1, 1), index.repeat(k))
                cond_k = {name: c[:k * n] for name, c in cond.items()}
                if run.world_size > 1:  # DDP averages the gradients once, on the step's last micro-batch
                    ddp_transformer.require_backward_grad_sync = micro == accumulation - 1
                with run.autocast():
                    pred = predict(transformer_forward, noisy, t.repeat(k), cond_k)
                model_err, ref_pred = losses.per_sample_error(pred, target), None
                ref_err = torch.zeros_like(model_err)
                if objective.needs_reference:
                    with torch.no_grad(), run.autocast():
                        ref_pred = predict(ref_forward, noisy, t.repeat(k), cond_k)
                    ref_err = losses.per_sample_error(ref_pred, target)
                extra = objective.inputs(FAMILY, pred, ref_pred, target, kto_point)  # DSPO's predictions, KTO's point
                loss, metrics = objective.fn(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], args.beta,
                                             scale, **extra)
                scaler.scale(loss / accumulation).backward()
                step_loss += loss.detach() / accumulation
                step_reward += metrics.get("kto_mean_reward", 0.0) / accumulation
                log.add(loss, metrics, batch["num_skipped"], t, scale, losses.pair_margin(model_err, ref_err, n),
                        model_err)

            scaler.unscale_(optimizer)
            grad_norm = runtime.clip_grad_norm(params, args.max_grad_norm or math.inf)  # 0: no clipping
            # A non-finite loss or gradient norm on any rank skips the step (fp16: the scaler skips overflows).
            finite = run.all_finite(step_loss, *([] if scaler.is_enabled() else [grad_norm]))
            if finite:
                scaler.step(optimizer)
            scaler.update()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if objective.needs_reference_point:
                kto_point = run.mean_over_ranks(step_reward)

            # §2: every τ steps the reference becomes a copy of the policy, unless the monitor has frozen it.
            if args.monitor == "batch":
                probe = monitor_probe(m, batch, args.monitor_samples, runtime.micro_generators(
                    args.seed, step, reference.MONITOR_STREAM, run.device), run, chunk=2 * args.train_batch_size)
            ref_info = ref.step(step, ref_source, probe, probe.target)
            if args.divergence_every and step % args.divergence_every == 0:
                divergence = ref.divergence(ref_source, probe, probe.target)  # D(p_θ, p_init), for Fig. 1b
                ref_info["policy_divergence"], ref_info["policy_distance"] = divergence
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
                ref_info.update(sampler.heldout(step))  # held-out reward and win rate over the base model
            if args.validation_every and (step % args.validation_every == 0 or step == args.max_steps):
                log.image(step, "validation", sampler.validation(step))  # its time counts in the step's seconds
            log.write(step, skipped_step=not finite, grad_norm=grad_norm, lr=lr_schedule.get_last_lr()[0], **ref_info)
            if log.nonfinite_in_a_row >= args.max_nonfinite_steps:  # diverged: stop, no final model
                log.close()
                trainlog.report_diverged(args, run, log, step, checkpoints.checkpoint_dirs(args.output_dir))
                return errors.EXIT_DIVERGED

            signum = run.stop_requested()  # SIGTERM / Ctrl-C: checkpoint, then exit with 128 + N
            if step % args.checkpoint_every == 0 or (signum and step < args.max_steps):
                log.note(f"saved {ckpt.save(step)}")
            if signum:
                log.close()
                trainlog.report_stop(args, run, step, f"stopped at step {step}")
                return 128 + signum

    if step % args.checkpoint_every and step > args.checkpoint_every:  # a checkpointing run keeps its last steps
        ckpt.save(step)  # even if writing final/ fails
    final_dir = checkpoints.save_final(args, run, model_path, "FluxPipeline", transformer=transformer)
    modelcard.write(final_dir, args, run, log, argv, loader)  # its README.md: what it is, how it was made
    curves = (plot.draw({os.path.basename(os.path.normpath(args.output_dir)): [args.output_dir]},
                        os.path.join(args.output_dir, "curves.png")) if args.plot and run.is_main else None)
    trainlog.report(args, run, log, final_dir, step, curves, baseline=args.pretrained_model)
    return 0


def main(argv=None) -> int:
    """The entry point: what the mechanics raise (a flag, folder, model or data that cannot be used, a full
    disk) ends here as one `error:` line and its exit code (README, "Exit codes"); the folder's lock goes."""
    try:
        return train(argv)
    except errors.RunError as error:
        return errors.report(error)
    finally:
        folder.release()


if __name__ == "__main__":
    sys.exit(main())
