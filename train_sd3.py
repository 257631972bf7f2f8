"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SD3 (flow matching).

Algorithm 1 of Kang et al. (AAAI 2026) for Stable Diffusion 3, top to bottom: flags, models, data, then the
loop. With no arguments this runs the SD3 recipe (PAPER.md §4–§5): stable-diffusion-3-medium (diffusers
format) at 1024 px, Pick-a-Pic v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 200 warm-up steps,
2000 steps, Adafactor, the reference updated every τ = 32 steps under the monitor δ = 0.002, γ = 0.9
over-sampling of the noisy end of the shifted σ grid and the flow version of λ(t) [choice: SDXL's settings;
the paper gives no SD3 recipe (PAPER.md §5)].

    python train_sd3.py                                    # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sd3.py               # 8 GPUs (accumulation 256 each)
    python train_sd3.py --tiny                             # offline CPU demo: tiny SD3-layout model (~1 min)
    python train_sd3.py --resume latest                    # continue the run in --output_dir
    python train_sd3.py --drop_t5                          # no T5 encoder: 256 zero tokens in its place, ~9 GB less
    python train_sd3.py --gradient_checkpointing --optimizer adamw8bit   # less memory (needs bitsandbytes)
    python train_sd3.py --method plain --beta 2000         # plain Diffusion-DPO

What differs from train_sd15.py: rectified flow (x_σ = (1 − σ)x0 + σε, velocity target) on the scheduler's
shifted σ grid, two CLIP encoders with pooled projections and T5, and latents (z − shift)·scale. β does not
transfer from the ε-prediction models (ε̂ − ε = (1 − σ)(v̂ − v), PAPER.md §4): watch the logged errors and
accuracy. Output: OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-STEP/ and the trained pipeline in
OUTPUT_DIR/final/ (StableDiffusion3Pipeline.from_pretrained loads it; it keeps T5 even after --drop_t5, and
`text_encoder_3=None, tokenizer_3=None` there samples as the model was trained).
"""
import copy
import math
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import losses
import plot
import reference
import rewards
import schedule
from mechanics import checkpoints, errors, flags, folder, loading, lora, modelcard, runtime, samples, trainlog
from offline import tiny

FAMILY = "sd3"  # the model family: its pipeline class, its published β per objective, its log lines
RECIPE = dict(pretrained_model="stabilityai/stable-diffusion-3-medium-diffusers", resolution=1024,
              effective_batch_size=2048, warmup_steps=200, max_steps=2000, tau=32, delta=0.002,
              optimizer="adafactor", validation_every=100, output_dir="out/sd3")
# --tiny: the offline demo's small-scale recipe, on a tiny random SD3 of the real classes (tiny/) and the
# built-in smooth-vs-noise pairs, both made once in the cache; each value a flag's default, which a flag overrides.
TINY_RECIPE = dict(pretrained_model=lambda v: tiny.pipeline_path(FAMILY), dataset=lambda v: tiny.builtin_pairs_path(),
                   resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5, scale_lr=False,
                   warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0, tau=8, delta=0.05,
                   dataloader_workers=0, divergence_every=5, cpu_threads=1, validation_every=30, sample_steps=4)
# T5 tokens per prompt [choice: 77, as diffusers' SD3 training scripts; the pipeline samples with 256]
T5_MAX_LENGTH = 77
# With --drop_t5, T5's zero block has StableDiffusion3Pipeline's length without T5 (its max_sequence_length default,
# 256) unless --t5_max_length is given [choice: the pipeline's 256, not the 77 tokens of a run with T5; the zeros are
# not inert (the context embedder's bias makes each a token the image attends to), so their count changes attention,
# and a model trained without T5 is meant to sample as `text_encoder_3=None` samples]
PIPELINE_T5_LENGTH = 256


def t5_length(drop_t5: bool, t5_max_length: int | None = None) -> int:
    """T5 tokens per prompt: t5_max_length when given, else 256 zero tokens without T5 (the pipeline's), 77 with
    it (the --t5_max_length flag's default)."""
    if t5_max_length is not None:
        return t5_max_length
    return PIPELINE_T5_LENGTH if drop_t5 else T5_MAX_LENGTH


@dataclass
class Models:
    """SD3: two CLIP encoders with pooled projections and T5 (or None: --drop_t5), a 16-channel VAE with a
    latent shift, and a velocity-prediction MMDiT trained by rectified flow on a shifted σ grid (§4)."""
    tokenizers: list
    text_encoders: list
    tokenizer_3: T5TokenizerFast | None
    text_encoder_3: T5EncoderModel | None
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    transformer: SD3Transformer2DModel
    device: torch.device
    dtype: torch.dtype
    sigmas: torch.Tensor  # [T] the training grid, σ growing with the index (sigma_grid)
    t5_max_length: int


def load_models(path: str, device, dtype, drop_t5: bool = False, t5_max_length: int | None = None) -> Models:
    """The pipeline's components: the frozen ones in the training dtype, the transformer in fp32 (trained); without
    T5 (drop_t5), prompts get T5's zero block of t5_length(drop_t5, t5_max_length) tokens."""
    tokenizers = [loading.load(CLIPTokenizer, path, "tokenizer"), loading.load(CLIPTokenizer, path, "tokenizer_2")]
    text_encoders = [loading.frozen(loading.load(CLIPTextModelWithProjection, path, folder), device, dtype)
                     for folder in ("text_encoder", "text_encoder_2")]
    for tokenizer, encoder, name in zip(tokenizers, text_encoders, ("tokenizer", "tokenizer_2")):
        loading.check_tokenizer(tokenizer, encoder, name)
    tokenizer_3 = text_encoder_3 = None
    if not drop_t5:
        tokenizer_3 = loading.load(T5TokenizerFast, path, "tokenizer_3")
        text_encoder_3 = loading.frozen(loading.load(T5EncoderModel, path, "text_encoder_3"), device, dtype)
        loading.check_tokenizer(tokenizer_3, text_encoder_3, "tokenizer_3")
    vae = loading.load(AutoencoderKL, path, "vae")
    # As the pipeline decodes: in fp32 if the VAE's config asks for it (SD3's does), then cast.
    vae = loading.frozen(vae, device, torch.float32 if vae.config.force_upcast else dtype)
    scheduler = loading.load(FlowMatchEulerDiscreteScheduler, path, "scheduler")
    return Models(tokenizers, text_encoders, tokenizer_3, text_encoder_3, vae, scheduler,
                  loading.load(SD3Transformer2DModel, path, "transformer"), torch.device(device), dtype,
                  sigma_grid(scheduler).to(device), t5_length(drop_t5, t5_max_length))


@torch.no_grad()
def encode_images(m: Models, pixels):
    """Pixels → the VAE posterior's parameters (mean, log-variance); --cache_latents stores these."""
    return loading.vae_moments(m.vae, pixels, m.device)


@torch.no_grad()
def encode_prompts(m: Models, captions):
    """As StableDiffusion3Pipeline.encode_prompt: the CLIP penultimate states concatenated on the channel
    axis and zero-padded to T5's width, followed on the sequence axis by the T5 states (without T5, m.t5_max_length
    zero tokens, as the pipeline's `_get_t5_prompt_embeds` with text_encoder_3=None); pooled = both CLIP
    projections concatenated."""
    states, pooled = [], []
    for tokenizer, encoder in zip(m.tokenizers, m.text_encoders):
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(m.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    if m.text_encoder_3 is None:
        t5 = torch.zeros(len(captions), m.t5_max_length, m.transformer.config.joint_attention_dim,
                         device=m.device, dtype=m.dtype)
    else:
        ids = m.tokenizer_3(captions, padding="max_length", truncation=True, max_length=m.t5_max_length,
                            add_special_tokens=True, return_tensors="pt").input_ids
        t5 = m.text_encoder_3(ids.to(m.device))[0]
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def encode_captions(m: Models, captions):
    states, pooled = encode_prompts(m, captions)
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def encode(m: Models, batch, generator):
    """A batch → latents (z − shift)·scale [2B] (winners then losers; §4), sampled from the VAE posterior with
    the micro-batch's generator, and the prompt states and pooled projections [2B] (each caption per image)."""
    moments = batch["latent_moments"] if "latent_moments" in batch else encode_images(m, batch["pixel_values"])
    prompts = batch.get("prompt_embeds") or encode_captions(m, batch["captions"])
    z = DiagonalGaussianDistribution(moments.to(m.device)).sample(generator)
    latents = (z - m.vae.config.shift_factor) * m.vae.config.scaling_factor
    return latents.to(m.dtype), {"encoder_hidden_states": prompts["encoder_hidden_states"].to(m.device).repeat(2, 1, 1),
                                 "pooled_projections": prompts["pooled_projections"].to(m.device).repeat(2, 1)}


def sigma_grid(scheduler) -> torch.Tensor:
    """The scheduler's training grid σ_i = shift·s / (1 + (shift − 1)·s), s = i/T, listed noisiest first;
    reversed, it is indexed like a DDPM timestep: sigmas[t] grows with t, so the Cat(γ^k) sampler of
    schedule.py over-samples high σ, the early generation steps (§3)."""
    return scheduler.sigmas.flip(0)


def add_noise(m: Models, latents, noise, index):
    """x_σ = (1 − σ)·x0 + σ·ε at σ = m.sigmas[index], and the velocity target v = ε − x0 the model predicts
    (PAPER.md §4)."""
    sigma = m.sigmas[index].view(-1, 1, 1, 1)  # fp32, whatever the latents' dtype
    return ((1 - sigma) * latents + sigma * noise).to(latents.dtype), noise - latents


def predict(transformer, noisy, t, cond):
    """The transformer takes the timestep σ·T, as the pipeline passes it."""
    return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


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
    parser.add_argument("--drop_t5", action="store_true",
                        help="do not load T5: zeros in place of its states, as StableDiffusion3Pipeline with "
                             "text_encoder_3=None (saves ~9 GB; prompts are read by CLIP only), 256 zero tokens as "
                             "that pipeline's unless --t5_max_length is given")
    parser.add_argument("--t5_max_length", type=int, default=lambda v: t5_length(v["drop_t5"]),
                        help="T5 tokens per prompt [choice: 77, as diffusers' SD3 training scripts; "
                             "StableDiffusion3Pipeline samples with 256]; with --drop_t5: 256 zero tokens "
                             "[choice: the pipeline's without T5]")
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
    m = load_models(model_path, run.device, run.weight_dtype, args.drop_t5, args.t5_max_length)
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
        loading.to_cpu(m.vae, *m.text_encoders, m.text_encoder_3, device=run.device)  # never run again
    num_train_timesteps = m.scheduler.config.num_train_timesteps
    sigmas = m.sigmas  # [T], σ grows with the index
    timesteps = sigmas * num_train_timesteps  # the transformer's timestep σ·T of each grid point, as the pipeline's
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
        tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1], tokenizer_3=m.tokenizer_3, text_encoder_3=m.text_encoder_3, vae=m.vae,
        transformer=transformer), "transformer",
        offloaded=(m.vae, *m.text_encoders, *filter(None, [m.text_encoder_3])) if args.cache_latents else (), reward=heldout_reward)
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
    final_dir = checkpoints.save_final(args, run, model_path, "StableDiffusion3Pipeline", transformer=transformer)
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
