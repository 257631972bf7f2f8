"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SD1.5.

Algorithm 1 of Kang et al. (AAAI 2026) for Stable Diffusion 1.5, top to bottom: flags, models, data, then
the loop. With no arguments this runs the paper's SD1.5 recipe (PAPER.md §5): stable-diffusion-v1-5,
Pick-a-Pic v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 500 warm-up steps, 2000 steps, the
reference updated every τ = 32 steps under the monitor δ = 0.005, γ = 0.9 over-sampling and λ(t).

    python train_sd15.py                                   # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sd15.py              # 8 GPUs (accumulation 256 each)
    python train_sd15.py --tiny                            # offline CPU demo: the toy model and its pairs (~2 min)
    python train_sd15.py --resume latest                   # continue the run in --output_dir
    python train_sd15.py --method plain                    # plain Diffusion-DPO (Wallace et al. 2023)
    python train_sd15.py --loss kto --method plain         # another objective, "X"; without --method: "X + ours"
    python train_sd15.py --tiny --help                     # every flag with the value the run will take
    python train_sd15.py --dataset /data/pickapic_parquet  # a local copy of Pick-a-Pic v2

Output: OUTPUT_DIR/log.jsonl (one JSON line per optimizer step), OUTPUT_DIR/checkpoint-STEP/ and the trained
pipeline in OUTPUT_DIR/final/ (StableDiffusionPipeline.from_pretrained loads it). The equations are in
losses.py (§1), schedule.py (§3) and reference.py (§2); the run's mechanics in mechanics/.
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
from transformers import CLIPTextModel, CLIPTokenizer

import losses
import plot
import reference
import schedule
import tiny
from mechanics import checkpoints, flags, loading, runtime, trainlog
from miniature import toy

RECIPE = dict(pretrained_model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
              effective_batch_size=2048, warmup_steps=500, max_steps=2000, tau=32, delta=0.005,
              output_dir="out/sd15")
# --tiny: the offline demo, the pretrained toy model (miniature/) on TOY_DEMO_PAIRS of its own samples labelled by
# the toy reward (the study's 1000 pairs). TINY_RECIPE is the small scale of every trainer's demo; TOY_RECIPE, the
# miniature's, applies to the toy model only (not with --pretrained_model): its steps, batch, lr, probe and δ are
# the study's (miniature/README.md); τ = 20 and β = 100 are the demo's own, chosen on the calibration prompts so
# that a reader sees the loss fall below log 2 and the accuracy rise before the first reference update (with the
# study's τ = 2 the reference trails the policy by two steps and the loss sits at log 2 until the freeze; at
# β = 500 a few large wrong-way margins keep the mean loss above log 2 at accuracy 0.7). One CPU thread: two
# spinning OpenMP threads on a busy 2-core laptop were ~5x slower.
TOY_DEMO_PAIRS = 1000
TINY_RECIPE = dict(pretrained_model=lambda v: str(toy.TOY_MODEL),
                   dataset=lambda v: str(toy.pairs_path(v["pretrained_model"], TOY_DEMO_PAIRS)),
                   resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5, scale_lr=False,
                   warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0, tau=8, delta=0.05,
                   dataloader_workers=0, divergence_every=5, cpu_threads=1)
TOY_RECIPE = dict(train_batch_size=8, effective_batch_size=8, max_steps=100, learning_rate=6e-5,
                  warmup_steps=5, beta=100.0, tau=20, delta=0.045, monitor_samples=32, checkpoint_every=50)


@dataclass
class Models:
    """SD1.5: one CLIP text encoder, a 4-channel VAE and an ε-prediction UNet on a DDPM schedule."""
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    unet: UNet2DConditionModel
    device: torch.device


def load_models(path: str, device, dtype) -> Models:
    """The pipeline's components: the frozen ones in the training dtype, the UNet in fp32 (it is trained)."""
    text_encoder = loading.frozen(loading.load(CLIPTextModel, path, "text_encoder"), device, dtype)
    tokenizer = loading.load(CLIPTokenizer, path, "tokenizer")
    loading.check_tokenizer(tokenizer, text_encoder, "tokenizer")
    return Models(tokenizer, text_encoder, loading.frozen(loading.load(AutoencoderKL, path, "vae"), device, dtype),
                  loading.load(DDPMScheduler, path, "scheduler"), loading.load(UNet2DConditionModel, path, "unet"),
                  torch.device(device))


@torch.no_grad()
def encode_images(m: Models, pixels):
    """Pixels → the VAE posterior's parameters (mean, log-variance); --cache_latents stores these."""
    return m.vae.encode(pixels.to(m.device, m.vae.dtype)).latent_dist.parameters


@torch.no_grad()
def encode_captions(m: Models, captions):
    """Captions [n] → {"encoder_hidden_states": CLIP last hidden states [n, 77, D]}."""
    ids = m.tokenizer(captions, padding="max_length", truncation=True, max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    return {"encoder_hidden_states": m.text_encoder(ids.to(m.device))[0]}


def encode(m: Models, batch, generator):
    """A batch → latents [2B] (winners then losers), sampled from the VAE posterior with the micro-batch's
    generator, and the prompt states [2B] (each caption once per image); cached or encoded now."""
    moments = batch["latent_moments"] if "latent_moments" in batch else encode_images(m, batch["pixel_values"])
    prompts = batch.get("prompt_embeds") or encode_captions(m, batch["captions"])
    latents = DiagonalGaussianDistribution(moments.to(m.device)).sample(generator) * m.vae.config.scaling_factor
    return latents, {"encoder_hidden_states": prompts["encoder_hidden_states"].to(m.device).repeat(2, 1, 1)}


def add_noise(scheduler, latents, noise, t):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, and the target the model predicts: ε (or v for a v-prediction model)."""
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, t)
    return noisy, noise


def predict(unet, noisy, t, cond):
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def monitor_probe(m: Models, batch, num_samples, generators, run, chunk) -> reference.Probe:
    """The inputs of §2's monitor: num_samples of the batch's winners (cycling through them), each noised at
    one t ~ U with one ε, drawn once so that p_init, the reference and the policy see the same inputs."""
    latents, cond = encode(m, batch, generators[1])
    index = torch.arange(num_samples, device=m.device) % (latents.shape[0] // 2)  # winners come first
    latents, cond = latents[index], {k: v[index] for k, v in cond.items()}
    t = schedule.sample_timesteps(num_samples, m.scheduler.config.num_train_timesteps, gamma=None,
                                  generator=generators[0]).to(m.device)
    noise = torch.randn(latents.shape, generator=generators[1], device=m.device, dtype=latents.dtype)
    noisy, target = add_noise(m.scheduler, latents, noise, t)
    return reference.Probe(predict, noisy, t, cond, target, chunk, run.autocast)


def main(argv=None) -> int:
    args, defaults = flags.resolve(argv, __doc__, "sd15", RECIPE, losses.LOSSES, TINY_RECIPE, TOY_RECIPE)
    run = runtime.start(args, "sd15")
    if args.tiny:  # the demo's model and pairs, made once and cached (rank 0 first)
        with run.main_first():
            tiny.ensure(args.pretrained_model, args.dataset, toy_pairs=TOY_DEMO_PAIRS)
    model_path = loading.pipeline_folder(args, "sd15")
    m = load_models(model_path, run.device, run.weight_dtype)
    encoders = partial(encode_images, m), partial(encode_captions, m)
    loader = loading.pair_loader(args, run, *encoders)
    # §2's monitor measures D(p_ref, p_init) on a probe: --monitor_samples winners of the data with their
    # t ~ U and ε, drawn once and kept in the checkpoint (or, with --monitor batch, the last micro-batch's).
    probe = monitor_probe(m, loading.probe_pairs(args, run, *encoders),
                          args.monitor_samples, runtime.micro_generators(args.seed, 0, runtime.MONITOR_STREAM, run.device),
                          run, chunk=2 * args.train_batch_size)
    if args.cache_latents:
        loading.to_cpu(m.vae, m.text_encoder, device=run.device)  # never run again
    num_train_timesteps = m.scheduler.config.num_train_timesteps
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
        from speed import lora
        lora.add_lora(unet, args.lora_rank, args.lora_alpha, reference_adapter=args.tau > 0,
                      base_dtype=run.weight_dtype, seed=args.seed)
        ref, ref_source = lora.make_reference(unet, args.tau, args.delta, args.on_diverge)
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
    log = trainlog.TrainLog(args, run, num_train_timesteps, desc=f"sd15 {args.loss}")
    ckpt = checkpoints.Checkpoints(args, run, model_path, defaults, policy=unet, reference=ref, optimizer=optimizer,
                                   lr_schedule=lr_schedule, loader=loader, scaler=scaler, monitor_probe=probe, log=log)
    step = ckpt.resume()  # refuses a checkpoint of another run (README, "Checkpoints and resume")
    log.begin(step)
    ddp_unet = runtime.ddp(unet, run)
    unet_forward = runtime.maybe_compile(ddp_unet, args.compile)
    ref_forward = runtime.maybe_compile(ref.model, args.compile and not args.lora_rank)  # LoRA: eager
    objective = losses.LOSSES[args.loss]
    accumulation = args.gradient_accumulation_steps
    batches = iter(loader)
    record = {}

    while step < args.max_steps:
        step_loss = 0.0
        for micro in range(accumulation):
            batch = next(batches, None)
            if batch is None:  # a signal stopped the loader while no pair would decode: exit, no checkpoint
                log.close()
                return 128 + run.signals.signum
            generators = runtime.micro_generators(args.seed, step, micro * run.world_size + run.rank, run.device)
            latents, cond = encode(m, batch, generators[1])  # [2B]: winners, then losers
            n = latents.shape[0] // 2
            # §3: one t per pair, the early (noisy) steps over-sampled by Cat(γ^k), and its reward scale λ(t).
            t = schedule.sample_timesteps(n, num_train_timesteps, args.gamma, args.num_bins,
                                          generator=generators[0]).to(run.device)
            scale = reward_scale[t]
            # §1: one ε per pair, shared by its winner and loser; SFT needs the winners only.
            noise = torch.randn(latents[:n].shape, generator=generators[1], device=run.device, dtype=latents.dtype)
            k = 2 if objective.needs_loser else 1
            noisy, target = add_noise(m.scheduler, latents[:k * n], noise.repeat(k, 1, 1, 1), t.repeat(k))
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
            extra = objective.inputs("sd15", pred, ref_pred, target, record.get("kto_mean_reward", 0.0))  # DSPO, KTO
            loss, metrics = objective.fn(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], args.beta,
                                         scale, **extra)
            scaler.scale(loss / accumulation).backward()
            step_loss += loss.detach() / accumulation
            log.add(loss, metrics, batch["num_skipped"], t, scale, losses.pair_margin(model_err, ref_err, n), model_err)

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

        # §2: every τ steps the reference becomes a copy of the policy, unless the monitor has frozen it.
        if args.monitor == "batch":
            probe = monitor_probe(m, batch, args.monitor_samples, runtime.micro_generators(
                args.seed, step, runtime.MONITOR_STREAM, run.device), run, chunk=2 * args.train_batch_size)
        ref_info = ref.step(step, ref_source, probe, probe.target)
        if args.divergence_every and step % args.divergence_every == 0:
            ref_info["policy_divergence"], ref_info["policy_distance"] = ref.divergence(ref_source, probe, probe.target)
        record = log.write(step, skipped_step=not finite, grad_norm=grad_norm, lr=lr_schedule.get_last_lr()[0],
                           **ref_info)
        if log.nonfinite_in_a_row >= args.max_nonfinite_steps:  # diverged: stop, no final model
            log.close()
            trainlog.report_diverged(args, run, log, step, checkpoints.checkpoint_dirs(args.output_dir))
            return flags.EXIT_DIVERGED

        signum = run.stop_requested()  # SIGTERM / Ctrl-C: checkpoint, then exit with 128 + N
        if step % args.checkpoint_every == 0 or (signum and step < args.max_steps):
            log.note(f"saved {ckpt.save(step)}")
        if signum:
            log.close()
            trainlog.report_stop(args, run, step, f"stopped at step {step}")
            return 128 + signum
    log.close()

    final_dir = checkpoints.save_final(args, run, model_path, "StableDiffusionPipeline", unet=unet)
    curves = (plot.draw({os.path.basename(os.path.normpath(args.output_dir)): [args.output_dir]},
                        os.path.join(args.output_dir, "curves.png")) if args.plot and run.is_main else None)
    toy_demo = args.tiny and args.pretrained_model == str(toy.TOY_MODEL)  # eval.py --tiny compares with it
    trainlog.report(args, run, log, final_dir, step, curves, baseline=None if toy_demo else args.pretrained_model)
    if toy_demo and run.is_main:  # the demo ends with what it did to held-out prompts: eval.py --tiny's comparison
        import eval as evaluation
        print("\n".join(evaluation.tiny_report(final_dir, os.path.join(args.output_dir, "heldout"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
