"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SD1.5.

With no arguments this runs the paper's SD1.5 recipe (PAPER.md §5): stable-diffusion-v1-5 weights,
Pick-a-Pic v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 500 warm-up steps, 2000 steps,
reference update every τ = 32 steps with monitor δ = 0.005, γ = 0.9 over-sampling and λ(t).

    python train_sd15.py                                   # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sd15.py              # 8 GPUs (accumulation 256 each)
    python train_sd15.py --tiny                            # offline CPU demo: the toy model and its pairs (~2 min)
    python train_sd15.py --resume latest                   # continue the run in --output_dir
    python train_sd15.py --tau 0 --gamma 1 --no_reward_scale   # plain Diffusion-DPO (Wallace et al. 2023)
    python train_sd15.py --loss sft                        # the SFT baseline (winners only)
    python train_sd15.py --dataset /data/pickapic_parquet  # a local copy of Pick-a-Pic v2

Output: OUTPUT_DIR/log.jsonl (one JSON line per optimizer step), OUTPUT_DIR/checkpoint-STEP/ and the
trained pipeline in OUTPUT_DIR/final/ (StableDiffusionPipeline.from_pretrained loads it). The loop and
every flag are shared with the SDXL and SD3 trainers (trainer.py); this file holds what is SD1.5's own.
"""
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTokenizer

import lora
import schedule
import trainer

RECIPE = dict(pretrained_model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
              effective_batch_size=2048, warmup_steps=500, max_steps=2000, tau=32, delta=0.005,
              output_dir="out/sd15")


class DDPMNoising:
    """Noising of the ε-prediction (or v-prediction) DDPM models, SD1.5 and SDXL (PAPER.md §1, §3)."""

    def sample_noise_level(self, n, generator, gamma, num_bins):
        """One training timestep per pair, early steps over-sampled by Cat(γ^k); λ(t) per pair."""
        timesteps = schedule.sample_timesteps(n, self.num_train_timesteps, gamma, num_bins, generator=generator)
        timesteps = timesteps.to(self.device)
        return timesteps, self.reward_scale[timesteps]

    def add_noise(self, latents, noise, timesteps):
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, and the target the model predicts (ε, or v for v-prediction)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise


class SD15(DDPMNoising, trainer.VAEImages):
    """Stable Diffusion 1.5: one CLIP text encoder, 4-channel VAE latents, an ε-prediction UNet."""

    name = "sd15"
    tiny_kind = "sd15"
    toy_demo = True  # --tiny trains the pretrained toy model on its preference pairs (toy.py)
    # ... with reproduce.py's recipe: β, lr and the pair budget there, τ and δ from its calibration (README).
    toy_recipe = dict(train_batch_size=8, effective_batch_size=8, max_steps=200, learning_rate=3e-5,
                      warmup_steps=10, beta=5000.0, tau=8, delta=0.025, checkpoint_every=100)

    def __init__(self, args, runtime):
        self.path = trainer.resolve_model(args.pretrained_model)
        self.device, dtype = runtime.device, runtime.weight_dtype
        load = trainer.load_component
        self.tokenizer = load(CLIPTokenizer, self.path, "tokenizer")
        self.text_encoder = trainer.frozen(load(CLIPTextModel, self.path, "text_encoder"), self.device, dtype)
        trainer.check_tokenizer(self.tokenizer, self.text_encoder, "tokenizer")
        self.vae = trainer.frozen(load(AutoencoderKL, self.path, "vae"), self.device, dtype)
        self.scheduler = load(DDPMScheduler, self.path, "scheduler")
        self.policy = load(UNet2DConditionModel, self.path, "unet")  # fp32 master weights, trained
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.reward_scale = schedule.reward_scale(self.scheduler.alphas_cumprod).to(self.device)

    @torch.no_grad()
    def encode_captions(self, captions):
        """Captions [n] → {"encoder_hidden_states": CLIP last hidden states [n, 77, D]}."""
        ids = self.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.text_encoder(ids.to(self.device))[0]}

    @torch.no_grad()
    def encode(self, batch, generator):
        """Pixels [2B] (winners then losers) → VAE latents; captions [B] → CLIP states, repeated per pair.
        The latent is drawn from the VAE posterior with the micro-batch's generator, cached or not."""
        moments, prompts = trainer.encoder_outputs(self, batch)
        latents = DiagonalGaussianDistribution(moments).sample(generator) * self.vae.config.scaling_factor
        return latents, {"encoder_hidden_states": prompts["encoder_hidden_states"].repeat(2, 1, 1)}

    def offload_encoders(self):
        """Once everything is cached the VAE and the text encoder never run again: free their memory."""
        self.vae.to("cpu")
        self.text_encoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def predict(self, forward, noisy, timesteps, cond):
        return forward(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def save_pipeline(self, policy, out_dir):
        pipeline = StableDiffusionPipeline.from_pretrained(self.path, unet=policy)
        pipeline.save_pretrained(out_dir)

    def save_lora(self, policy, out_dir):
        """--lora_rank: the trained adapter only, in the format `pipe.load_lora_weights(out_dir)` reads."""
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora.adapter_state_dict(policy),
                                                  unet_lora_adapter_metadata=lora.adapter_metadata(policy))


if __name__ == "__main__":
    trainer.main(__doc__.split("\n")[0], RECIPE, SD15)
