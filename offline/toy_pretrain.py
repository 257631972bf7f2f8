"""Pretrain the toy base model: a tiny SD1.5-layout pipeline (tiny.py) taught the toy world (toy.py).

    python -m offline.toy_pretrain --output_dir offline/toy_model --seed 0

Three stages, all on CPU:
1. Autoencoder: a random VAE decodes garbage, so the tiny AutoencoderKL is first fitted to toy images
   (reconstruction MSE plus a small KL term, as the SD VAE was trained), and its `scaling_factor` is set
   to 1 / std of the latents, the rule that gave SD1.5 its 0.18215.
2. Dataset: `--num_images` toy images (toy.sample_specs, all 270 captions), `--defect_rate` of them drawn with
   one of toy.DEFECTS (tinted background, stray shapes, blur) under the same caption as a clean picture
   (toy.with_defects), encoded once into their latent posteriors; each step draws a fresh latent sample.
3. UNet and text encoder together, with the standard ε-prediction loss on uniformly drawn timesteps of
   the SD1.5 schedule. The text encoder is trained too: the tiny CLIP is random, and a random encoder of
   byte-level tokens left frozen made prompt following (colour in particular) much slower to learn.
   Captions are dropped (replaced by "") with probability `--caption_dropout`, so that classifier-free
   guidance works at sampling time.

The base model so learns a mixture of good and bad modes that no caption selects, as SD1.5 learned from the
web: its samples are clean or flawed by chance, its pairs often differ a lot in reward, and preference learning
has a mode to re-weight rather than a capacity to grow (miniature/README.md, "Design history").

The result is saved in the hub layout, with a DDIM sampling scheduler, and loads with
StableDiffusionPipeline.from_pretrained. The project commits it as toy_model/ (with its README.md) rather
than building it on first use: the pretraining takes longer than a demo should wait (about 13 minutes on
one core of the development machine), and everyone then starts from the same weights. With
`--save_dtype float16` (default) the safetensors files hold float16 tensors to halve the folder (the
committed toy_model/ must stay under 5 MB); the configs still say float32, so loaders upcast on load.
A README.md with the command, seed, time taken and final losses is written beside the weights.
"""
import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from offline import tiny
from offline import toy
LOSS_WINDOW = 50  # the reported final losses are means over this many last steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="toy_model", help="where the pipeline folder (hub layout) is written")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the toy data and the noise")
    p.add_argument("--num_images", type=int, default=8192, help="toy images in the pretraining set")
    p.add_argument("--defect_rate", type=float, default=toy.DEFECT_RATE,
                   help="share of the pretraining pictures that carry a defect mode (toy.DEFECTS), with the same "
                        "captions as the clean ones: the base model's samples then mix good and bad modes")
    p.add_argument("--defects", nargs="*", choices=toy.DEFECTS, default=list(toy.PRETRAIN_DEFECTS),
                   help="the defect modes of the mixture, drawn uniformly")
    p.add_argument("--vae_steps", type=int, default=800, help="optimizer steps of the autoencoder fit")
    p.add_argument("--vae_batch_size", type=int, default=4,
                   help="images per autoencoder step (small batches, many steps: fastest per CPU-second here)")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="autoencoder learning rate (AdamW, cosine decay)")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the VAE's KL term (SD: 1e-6)")
    p.add_argument("--unet_steps", type=int, default=2800, help="optimizer steps of the UNet/text-encoder stage")
    p.add_argument("--batch_size", type=int, default=32, help="images per UNet step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the UNet stage (AdamW, cosine decay)")
    p.add_argument("--warmup_steps", type=int, default=20, help="linear warm-up steps of the UNet stage")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-γ loss weighting (Hang et al. 2023): weight min(SNR, γ) / SNR per sample; "
                        "unset: the plain ε-prediction MSE")
    p.add_argument("--caption_dropout", type=float, default=0.1,
                   help="probability of training on the empty caption (for classifier-free guidance)")
    p.add_argument("--freeze_text_encoder", action="store_true",
                   help="keep the random tiny CLIP text encoder frozen instead of training it with the UNet")
    p.add_argument("--unet_block_out_channels", type=int, nargs=2, default=[32, 64],
                   help="UNet widths, passed to tiny.build_tiny_sd15 (the tiny default is 32 64)")
    p.add_argument("--attention_resolution", type=int, choices=[16, 8], default=8,
                   help="latent resolution of the UNet's attention blocks: 16 is tiny.py's SD1.5 default (attention "
                        "on the full 16x16 latent, like SD1.5's first level); 8 puts it one level down (like "
                        "SDXL), which halves the CPU time of a step and so doubles the steps the budget buys")
    p.add_argument("--max_caption_tokens", type=int, default=16,
                   help="the tokenizer's model_max_length, which the pipeline and the trainers pad every caption to. "
                        "The longest toy caption is 12 tokens; at CLIP's 77, some 70 padding tokens (which see the "
                        "words only through the causal text encoder) drown the words in the UNet's cross-attention, "
                        "and in the budget the model learned colour from them but not shape or position")
    p.add_argument("--global_text_conditioning", action=argparse.BooleanOptionalAction, default=False,
                   help="also add an attention-pooled caption embedding to the UNet's time embedding (diffusers' "
                        "addition_embed_type='text', as in DeepFloyd IF), so that every ResNet block sees the "
                        "caption; SD1.5 itself conditions through cross-attention only")
    p.add_argument("--save_dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the stored tensors (configs stay float32; float16 halves the folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 because on the shared 2-core development "
                        "machine a 2-thread step ran 5-20x slower than a 1-thread one whenever another process "
                        "was busy (the threads wait on each other); on an idle machine 2 threads are faster")
    return p.parse_args(argv)


def unet_overrides(args) -> dict:
    """UNet config entries that differ from tiny.build_tiny_sd15's defaults."""
    overrides = {"block_out_channels": tuple(args.unet_block_out_channels)}
    if args.attention_resolution == 8:
        overrides["down_block_types"] = ("DownBlock2D", "CrossAttnDownBlock2D")
        overrides["up_block_types"] = ("CrossAttnUpBlock2D", "UpBlock2D")
    if args.global_text_conditioning:
        overrides["addition_embed_type"] = "text"
        overrides["addition_embed_type_num_heads"] = 4  # must divide the text width (32)
    return overrides


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1], the SD pixel convention."""
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images]))
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def fit_vae(vae, pixels: torch.Tensor, args, gen: torch.Generator) -> float:
    """Stage 1: fit the autoencoder; returns the mean reconstruction MSE over the last LOSS_WINDOW steps."""
    # The encoder's last conv outputs [mean, log-variance]; a fresh one gives log-variance ≈ 0, i.e. latent
    # samples that are mostly noise, and a short fit would spend its first hundreds of steps shrinking it.
    # Start it at −6 (std 0.05) instead; the KL term still pulls it wherever it wants to go.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -6.0
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 20))
    recent = []
    bar = tqdm(range(args.vae_steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        x = pixels[torch.randint(len(pixels), (args.vae_batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [mse.item()])[-LOSS_WINDOW:]
        bar.set_postfix(mse=f"{np.mean(recent):.4f}")
    vae.eval().requires_grad_(False)
    return float(np.mean(recent))


@torch.no_grad()
def encode_posteriors(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tokenizer, scheduler, latent_mean, latent_std, scaling_factor, captions,
               args, gen: torch.Generator) -> float:
    """Stage 3: ε-prediction on noised latents, caption-conditioned; returns the mean loss of the last LOSS_WINDOW steps."""
    prompts = sorted(set(captions)) + [""]
    index = {p: i for i, p in enumerate(prompts)}
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    caption_idx = torch.tensor([index[c] for c in captions])
    empty = index[""]

    train_text = not args.freeze_text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train(train_text).requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.unet_steps, args.warmup_steps))
    alphas_cumprod = scheduler.alphas_cumprod
    recent = []
    bar = tqdm(range(args.unet_steps), desc="unet", dynamic_ncols=True)
    for _ in bar:
        pick = torch.randint(len(latent_mean), (args.batch_size,), generator=gen)
        noise = torch.randn(latent_mean[pick].shape, generator=gen)
        latents = latent_mean[pick] + latent_std[pick] * torch.randn(latent_mean[pick].shape, generator=gen)
        latents = latents * scaling_factor
        t = torch.randint(0, len(alphas_cumprod), (args.batch_size,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        prompt_idx = torch.where(drop, torch.full_like(pick, empty), caption_idx[pick])
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(ids[prompt_idx])[0]
        per_sample = F.mse_loss(unet(noisy, t, cond).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        if args.snr_gamma:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            objective = (per_sample * snr.clamp(max=args.snr_gamma) / snr).mean()
        else:
            objective = loss
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-LOSS_WINDOW:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return float(np.mean(recent))


def write_tokenizer(folder: Path, max_length: int) -> None:
    """tiny.py's CLIP tokenizer in the hub form (vocab.json + merges.txt), padding to `max_length` tokens.

    (save_pretrained would write transformers-5's tokenizer.json instead of the hub's files.)"""
    if folder.exists():
        shutil.rmtree(folder)
    tiny.build_clip_tokenizer(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_max_length"] = max_length
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def store_as(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file of the pipeline folder with floating tensors in `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for f in sorted(glob.glob(str(folder / "*" / "*.safetensors"))):
        with safe_open(f, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(f)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, f, metadata=metadata)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_readme(out: Path, args, report: dict) -> None:
    command = "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    lines = [
        "# toy_model: the toy base model",
        "",
        "A tiny SD1.5-layout pipeline (tiny.py's classes and hub layout) pretrained on the toy world of toy.py",
        "by toy_pretrain.py. It is the \"pretrained model\" of the toy miniature: preference pairs are sampled",
        "from it (`python toy.py pairs`) and Diffusion-DPO and the paper's method start from it.",
        "Load it with `StableDiffusionPipeline.from_pretrained(\"toy_model\")`; it samples 32 px images.",
        "",
        "Reproduce (CPU, the numbers below are from this run):",
        "",
        "```",
        command,
        "```",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report.items()]
    lines += [
        "",
        "All flags (`python toy_pretrain.py --help`):",
        "",
        "```",
        json.dumps(vars(args), indent=2),
        "```",
        "",
        f"Tensors are stored as {args.save_dtype}; the configs say float32, so from_pretrained upcasts on load.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    start, cpu_start, load_start = time.time(), time.process_time(), os.getloadavg()[0]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.output_dir)
    with tempfile.TemporaryDirectory(prefix="toy-pretrain-") as tmp:
        tiny.build_tiny_sd15(tmp, seed=args.seed, **unet_overrides(args))
        pipe = StableDiffusionPipeline.from_pretrained(tmp)

    pipe.tokenizer.model_max_length = args.max_caption_tokens
    specs = toy.with_defects(toy.sample_specs(args.num_images, seed=args.seed), args.seed, args.defect_rate,
                             tuple(args.defects))
    captions = [s.caption for s in specs]
    pixels = to_tensor([toy.render(s) for s in specs])

    t0 = time.time()
    vae_mse = fit_vae(pipe.vae, pixels, args, gen)
    vae_time = time.time() - t0
    latent_mean, latent_std = encode_posteriors(pipe.vae, pixels)
    latent_sample = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=gen)
    scaling_factor = float(1.0 / latent_sample.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)

    t0 = time.time()
    unet_loss = train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, latent_mean, latent_std,
                           scaling_factor, captions, args, gen)
    unet_time = time.time() - t0

    if out.exists():
        shutil.rmtree(out)
    # The sampling scheduler the pipeline ships with, as SD1.5 ships PNDM: DDIM, with which toy.py samples the
    # pairs and the evaluation (the trainers read the same config into their DDPMScheduler).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer", args.max_caption_tokens)
    store_as(out, getattr(torch, args.save_dtype))
    total = time.time() - start
    report = {
        "seed": args.seed,
        "total time (s)": f"{total:.0f}",
        "CPU time (s, all threads)": f"{time.process_time() - cpu_start:.0f}",
        # Other jobs on the machine slow this down; the 1-minute load average says how busy it was.
        "load average at start / end": f"{load_start:.1f} / {os.getloadavg()[0]:.1f}",
        "autoencoder fit (s)": f"{vae_time:.0f}",
        "UNet + text encoder (s)": f"{unet_time:.0f}",
        f"final VAE reconstruction MSE (pixels in [-1, 1], last {LOSS_WINDOW} steps)": f"{vae_mse:.4f}",
        f"final ε-prediction loss (last {LOSS_WINDOW} steps)": f"{unet_loss:.4f}",
        "VAE scaling_factor (1 / latent std)": f"{scaling_factor:.4f}",
        "text encoder": "frozen (random)" if args.freeze_text_encoder else "trained with the UNet",
        "torch threads": torch.get_num_threads(),
        "folder size (bytes, before this README)": folder_size(out),
    }
    write_readme(out, args, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
