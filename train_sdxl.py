"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SDXL.

Algorithm 1 of Kang et al. (AAAI 2026) for SDXL, top to bottom: flags, models, data, then the loop. With no
arguments this runs the paper's SDXL recipe (PAPER.md §5): stable-diffusion-xl-base-1.0 at 1024 px, Pick-a-Pic
v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 200 warm-up steps, 2000 steps, Adafactor, the
reference updated every τ = 32 steps under the monitor δ = 0.002, γ = 0.9 over-sampling and λ(t).

    python train_sdxl.py                                   # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sdxl.py              # 8 GPUs (accumulation 256 each)
    python train_sdxl.py --tiny                            # offline CPU demo: tiny SDXL-layout model (~1 min)
    python train_sdxl.py --resume latest                   # continue the run in --output_dir
    python train_sdxl.py --gradient_checkpointing --optimizer adamw8bit   # less memory (needs bitsandbytes)
    python train_sdxl.py --vae madebyollin/sdxl-vae-fp16-fix   # encode with the fp16-safe VAE
    python train_sdxl.py --method plain                    # plain Diffusion-DPO (Wallace et al. 2023)

What differs from train_sd15.py: two text encoders (penultimate states concatenated, the second one's pooled
embedding), the size/crop micro-conditioning of every image, and the VAE kept in fp32. Memory: the reference
stays on the accelerator next to the policy (no CPU offload: that is what makes the official SDXL
Diffusion-DPO recipe slow); only the initial weights, needed by the monitor alone, wait in CPU memory
(reference.py). Output: OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-STEP/ and the trained pipeline in
OUTPUT_DIR/final/ (StableDiffusionXLPipeline.from_pretrained loads it; it keeps the base pipeline's VAE).
"""
import copy
import math
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import losses
import plot
import reference
import rewards
import schedule
from mechanics import checkpoints, errors, flags, folder, loading, lora, modelcard, runtime, samples, trainlog
from offline import tiny

FAMILY = "sdxl"  # the model family: its pipeline class, its published β per objective, its log lines
RECIPE = dict(pretrained_model="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024,
              effective_batch_size=2048, warmup_steps=200, max_steps=2000, tau=32, delta=0.002,
              optimizer="adafactor", validation_every=100, output_dir="out/sdxl")
# --tiny: the offline demo's small-scale recipe, on a tiny random SDXL of the real classes (tiny/) and the
# built-in smooth-vs-noise pairs, both made once in the cache; each value a flag's default, which a flag overrides.
TINY_RECIPE = dict(pretrained_model=lambda v: tiny.pipeline_path(FAMILY), dataset=lambda v: tiny.builtin_pairs_path(),
                   resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5, scale_lr=False,
                   warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0, tau=8, delta=0.05,
                   dataloader_workers=0, divergence_every=5, cpu_threads=1, validation_every=30, sample_steps=4)


@dataclass
class Models:
    """SDXL: two CLIP text encoders, a 4-channel VAE and an ε-prediction UNet conditioned on image sizes,
    trained on the same scaled-linear DDPM schedule as SD1.5 (so the same λ(t), §3)."""
    tokenizers: list
    text_encoders: list
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    unet: UNet2DConditionModel
    device: torch.device
    dtype: torch.dtype


def load_models(path: str, device, dtype, vae: str | None = None) -> Models:
    """The pipeline's components: the frozen ones in the training dtype, the UNet in fp32 (it is trained).
    The saved pipeline samples with Euler; training noises with the DDPM schedule of the same config."""
    tokenizers = [loading.load(CLIPTokenizer, path, "tokenizer"), loading.load(CLIPTokenizer, path, "tokenizer_2")]
    text_encoders = [loading.frozen(loading.load(CLIPTextModel, path, "text_encoder"), device, dtype),
                     loading.frozen(loading.load(CLIPTextModelWithProjection, path, "text_encoder_2"), device, dtype)]
    for tokenizer, encoder, name in zip(tokenizers, text_encoders, ("tokenizer", "tokenizer_2")):
        loading.check_tokenizer(tokenizer, encoder, name)
    vae = (loading.load(AutoencoderKL, path, "vae") if vae is None
           else loading.load(AutoencoderKL, loading.resolve_model(vae, "--vae")))
    # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in fp32, and the latents are
    # then cast to the training dtype. An fp16-safe VAE (force_upcast false) runs in that dtype.
    vae = loading.frozen(vae, device, torch.float32 if vae.config.force_upcast else dtype)
    return Models(tokenizers, text_encoders, vae, loading.load(DDPMScheduler, path, "scheduler"),
                  loading.load(UNet2DConditionModel, path, "unet"), torch.device(device), dtype)


@torch.no_grad()
def encode_images(m: Models, pixels):
    """Pixels → the VAE posterior's parameters (mean, log-variance); --cache_latents stores these."""
    return loading.vae_moments(m.vae, pixels, m.device)


@torch.no_grad()
def encode_prompts(m: Models, captions):
    """As StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both encoders,
    concatenated on the channel axis, and the pooled (projected) embedding of the second one."""
    outputs = []
    for tokenizer, encoder in zip(m.tokenizers, m.text_encoders):
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        outputs.append(encoder(ids.to(m.device), output_hidden_states=True))
    return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1), outputs[1].text_embeds


def encode_captions(m: Models, captions):
    states, pooled = encode_prompts(m, captions)
    return {"encoder_hidden_states": states, "text_embeds": pooled}


def encode(m: Models, batch, generator):
    """A batch → latents [2B] (winners then losers), sampled from the VAE posterior with the micro-batch's
    generator, and the conditioning [2B]: prompt states and pooled embedding (each caption once per image)
    and per image the micro-conditioning time ids (original h, w, crop top, left, target h, w)."""
    moments = batch["latent_moments"] if "latent_moments" in batch else encode_images(m, batch["pixel_values"])
    prompts = batch.get("prompt_embeds") or encode_captions(m, batch["captions"])
    latents = DiagonalGaussianDistribution(moments.to(m.device)).sample(generator) * m.vae.config.scaling_factor
    # Each image's true size before resizing and its crop offset (data.py), not constants: the two images of
    # a pair may differ in size (PAPER.md §5). The target size is the latents' times the VAE's downsampling (a
    # cached batch has no pixels). Float32, so that sizes such as 1023 stay exact.
    vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    target = torch.tensor(latents.shape[-2:]).mul(vae_scale).expand(latents.shape[0], 2)
    time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)
    return latents.to(m.dtype), {"encoder_hidden_states": prompts["encoder_hidden_states"].to(m.device).repeat(2, 1, 1),
                                 "text_embeds": prompts["text_embeds"].to(m.device).repeat(2, 1),
                                 "time_ids": time_ids.to(m.device, torch.float32)}


def add_noise(m: Models, latents, noise, t):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε at grid points t (on the DDPM grid a point's index is its timestep), and the
    target the model predicts: ε (or v for a v-prediction model)."""
    noisy = m.scheduler.add_noise(latents, noise, t)
    if m.scheduler.config.prediction_type == "v_prediction":
        return noisy, m.scheduler.get_velocity(latents, noise, t)
    return noisy, noise


def predict(unet, noisy, t, cond):
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


def monitor_probe(m: Models, batch, num_samples, generators, run, chunk) -> reference.Probe:
    """The inputs of §2's monitor: num_samples of the batch's winners (cycling through them), each noised at
    one t ~ U with one ε, drawn once so that p_init, the reference and the policy see the same inputs."""
    latents, cond = encode(m, batch, generators[1])
    index = torch.arange(num_samples, device=m.device) % (latents.shape[0] // 2)  # winners come first
    latents, cond = latents[index], {k: v[index] for k, v in cond.items()}
    t = schedule.sample_timesteps(num_samples, m.scheduler.config.num_train_timesteps, gamma=None,
                                  generator=generators[0]).to(m.device)
    noise = torch.randn(latents.shape, generator=generators[1], device=m.device, dtype=latents.dtype)
    noisy, target = add_noise(m, latents, noise, t)
    return reference.Probe(predict, noisy, t, cond, target, chunk, run.autocast)


def model_flags(parser):
    parser.add_argument("--vae", default=None,
                        help="hub id or folder of another VAE to encode with, e.g. the fp16-safe "
                             "madebyollin/sdxl-vae-fp16-fix (None: the pipeline's own, kept in fp32)")


def train(argv=None) -> int:
    """Algorithm 1 for this model: returns the exit code (0 done, 3 diverged, 128 + N stopped by signal N)."""
    args, defaults = flags.resolve(argv, __doc__, FAMILY, RECIPE, TINY_RECIPE, losses.LOSSES, reference.METHODS,
                                   model_flags=model_flags)
    run = runtime.start(args, FAMILY)
    heldout_reward = rewards.load(args.eval_reward, run.device) if args.eval_every and run.is_main else None
    if args.tiny:  # the demo's model and pairs, made once and cached
        loading.ensure_tiny(args, run)
    model_path = loading.pipeline_folder(args, FAMILY)
    m = load_models(model_path, run.device, run.weight_dtype, args.vae)
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
        loading.to_cpu(m.vae, *m.text_encoders, device=run.device)  # never run again
    num_train_timesteps = m.scheduler.config.num_train_timesteps
    timesteps = torch.arange(num_train_timesteps, device=run.device)  # the DDPM grid: index = timestep
    reward_scale = schedule.reward_scale(m.scheduler.alphas_cumprod).to(run.device)  # λ(t) of §3
    if args.no_reward_scale:
        reward_scale = torch.ones_like(reward_scale)
    elif args.reward_scale_norm:  # ablation: the same shape over t, mean 1 under the sampler
        reward_scale = reward_scale / schedule.sampler_mean(reward_scale, args.gamma, args.num_bins)

    unet = m.unet.to(run.device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # The reference starts as the pretrained weights, which are also p_init (§2); with LoRA it is a second
    # adapter (or, for τ = 0, the adapters switched off) of the same UNet.
    if args.lora_rank:
        lora.add_lora(unet, args.lora_rank, args.lora_alpha, reference_adapter=args.tau > 0,
                      base_dtype=run.weight_dtype, seed=args.seed)
        ref_source, ref_view = lora.views(unet, args.tau)
        ref = reference.Reference(ref_source, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge,
                                  model=ref_view)
    elif args.fsdp:  # policy and reference sharded alike: the τ copy and p_init's restore stay shard to shard
        ref_model = runtime.shard(copy.deepcopy(unet).requires_grad_(False), run)
        unet = runtime.shard(unet, run)
        ref = reference.Reference(unet, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge, model=ref_model)
        ref_source = unet
    else:
        ref = reference.Reference(unet, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge,
                                  dtype=run.autocast_dtype)
        ref_source = unet
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_schedule = runtime.optimizer(args, params)
    scaler = run.grad_scaler()
    log = trainlog.TrainLog(args, run, num_train_timesteps, desc=f"{FAMILY} {args.loss}")
    ckpt = checkpoints.Checkpoints(args, run, model_path, defaults, policy=unet, reference=ref, optimizer=optimizer,
                                   lr_schedule=lr_schedule, loader=loader, scaler=scaler, monitor_probe=probe, log=log)
    step = ckpt.resume()  # refuses a checkpoint of another run (README, "Checkpoints and resume")
    log.begin(step)
    # What the run shows while it trains: the base pipeline's sampler around the policy (mechanics/samples.py).
    sampler = samples.Sampler(args, run, model_path, dict(
        tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], text_encoder=m.text_encoders[0],
        text_encoder_2=m.text_encoders[1], vae=m.vae, unet=unet), "unet",
        offloaded=(m.vae, *m.text_encoders) if args.cache_latents else (), reward=heldout_reward)
    ddp_unet = runtime.ddp(unet, run)
    unet_forward = runtime.maybe_compile(ddp_unet, args.compile)
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
                    ddp_unet.require_backward_grad_sync = micro == accumulation - 1
                with run.autocast():
                    pred = predict(unet_forward, noisy, t.repeat(k), cond_k)
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
    final_dir = checkpoints.save_final(args, run, model_path, "StableDiffusionXLPipeline", unet=unet)
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
