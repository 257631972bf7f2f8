"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SDXL.

With no arguments this runs the paper's SDXL recipe (PAPER.md §5): stable-diffusion-xl-base-1.0 weights at
1024 px, Pick-a-Pic v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 200 warm-up steps, 2000
steps, Adafactor, reference update every τ = 32 steps with monitor δ = 0.002, γ = 0.9 over-sampling and λ(t).

    python train_sdxl.py                                   # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sdxl.py              # 8 GPUs (accumulation 256 each)
    python train_sdxl.py --tiny                            # offline CPU demo: tiny SDXL-layout model (~1 min)
    python train_sdxl.py --resume latest                   # continue the run in --output_dir
    python train_sdxl.py --gradient_checkpointing --optimizer adamw8bit   # less memory (needs bitsandbytes)
    python train_sdxl.py --vae madebyollin/sdxl-vae-fp16-fix   # encode with the fp16-safe VAE
    python train_sdxl.py --tau 0 --gamma 1 --no_reward_scale   # plain Diffusion-DPO (Wallace et al. 2023)

Memory: the reference stays on the accelerator next to the policy (no CPU offload: that is what makes the
official SDXL Diffusion-DPO recipe slow); only the initial weights, needed by the monitor alone, wait in
CPU memory (reference.py). Output: OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-STEP/ and the trained
pipeline in OUTPUT_DIR/final/ (StableDiffusionXLPipeline.from_pretrained loads it; it keeps the base
pipeline's VAE). The loop and every other flag are shared with the SD1.5 and SD3 trainers (trainer.py);
this file holds what is SDXL's own.
"""
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import lora
import schedule
import trainer
from train_sd15 import DDPMNoising

RECIPE = dict(pretrained_model="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024,
              effective_batch_size=2048, warmup_steps=200, max_steps=2000, tau=32, delta=0.002,
              optimizer="adafactor", output_dir="out/sdxl")


class SDXL(DDPMNoising, trainer.VAEImages):
    """SDXL: two CLIP text encoders, micro-conditioning on image sizes, 4-channel VAE latents, an
    ε-prediction UNet trained on the same scaled-linear DDPM schedule as SD1.5 (so the same λ(t), §3)."""

    name = "sdxl"
    tiny_kind = "sdxl"

    @staticmethod
    def add_flags(parser):
        parser.add_argument("--vae", default=None,
                            help="hub id or folder of another VAE to encode with, e.g. the fp16-safe "
                                 "madebyollin/sdxl-vae-fp16-fix (default: the pipeline's own, kept in fp32)")

    def __init__(self, args, runtime):
        self.path = trainer.resolve_model(args.pretrained_model)
        self.device, self.dtype = runtime.device, runtime.weight_dtype
        load = trainer.load_component
        self.tokenizers = [load(CLIPTokenizer, self.path, "tokenizer"), load(CLIPTokenizer, self.path, "tokenizer_2")]
        self.text_encoders = [trainer.frozen(load(CLIPTextModel, self.path, "text_encoder"), self.device, self.dtype),
                              trainer.frozen(load(CLIPTextModelWithProjection, self.path, "text_encoder_2"),
                                             self.device, self.dtype)]
        for tokenizer, encoder, name in zip(self.tokenizers, self.text_encoders, ("tokenizer", "tokenizer_2")):
            trainer.check_tokenizer(tokenizer, encoder, name)
        vae = (load(AutoencoderKL, self.path, "vae") if args.vae is None
               else load(AutoencoderKL, trainer.resolve_model(args.vae, "--vae")))
        # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in fp32, and the latents
        # are then cast to the training dtype. An fp16-safe VAE (force_upcast false) runs in that dtype.
        self.vae = trainer.frozen(vae, self.device, torch.float32 if vae.config.force_upcast else self.dtype)
        # The saved pipeline samples with Euler; training noises with the DDPM schedule of the same config.
        self.scheduler = load(DDPMScheduler, self.path, "scheduler")
        self.policy = load(UNet2DConditionModel, self.path, "unet")  # fp32 master weights, trained
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.reward_scale = schedule.reward_scale(self.scheduler.alphas_cumprod).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, captions):
        """As StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both encoders,
        concatenated on the channel axis, and the pooled (projected) embedding of the second one."""
        outputs = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            outputs.append(encoder(ids.to(self.device), output_hidden_states=True))
        states = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        return states, outputs[1].text_embeds

    @torch.no_grad()
    def encode_captions(self, captions):
        states, pooled = self.encode_prompts(captions)
        return {"encoder_hidden_states": states, "text_embeds": pooled}

    @torch.no_grad()
    def encode(self, batch, generator):
        """Pixels [2B] (winners then losers) → latents; captions [B] → text states, repeated per pair;
        per image, the micro-conditioning time ids (original h, w, crop top, left, target h, w)."""
        moments, prompts = trainer.encoder_outputs(self, batch)
        latents = DiagonalGaussianDistribution(moments).sample(generator) * self.vae.config.scaling_factor
        # Each image's true size before resizing and its crop offset (data.py), not constants: the two
        # images of a pair may differ in size (PAPER.md §5). The target size is the latents' times the
        # VAE's downsampling (a cached batch has no pixels). Float32, so that sizes such as 1023 stay exact.
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        target = torch.tensor(latents.shape[-2:]).mul(vae_scale).expand(latents.shape[0], 2)
        time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)
        return latents.to(self.dtype), {"encoder_hidden_states": prompts["encoder_hidden_states"].repeat(2, 1, 1),
                                        "text_embeds": prompts["text_embeds"].repeat(2, 1),
                                        "time_ids": time_ids.to(self.device, torch.float32)}

    def offload_encoders(self):
        """Once everything is cached the VAE and the text encoders never run again: free their memory."""
        for module in (self.vae, *self.text_encoders):
            module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def predict(self, forward, noisy, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return forward(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                       added_cond_kwargs=added).sample

    def save_pipeline(self, policy, out_dir):
        pipeline = StableDiffusionXLPipeline.from_pretrained(self.path, unet=policy)
        pipeline.save_pretrained(out_dir)

    def save_lora(self, policy, out_dir):
        """--lora_rank: the trained adapter only, in the format `pipe.load_lora_weights(out_dir)` reads."""
        StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=lora.adapter_state_dict(policy),
                                                    unet_lora_adapter_metadata=lora.adapter_metadata(policy))


if __name__ == "__main__":
    trainer.main(__doc__.split("\n")[0], RECIPE, SDXL)
