"""Diffusion-DPO with the paper's stable reference update and timestep-aware training, for SD3 (flow matching).

With no arguments this runs the SD3 recipe (PAPER.md §4–§5): stable-diffusion-3-medium (diffusers format)
at 1024 px, Pick-a-Pic v2, β = 5000, effective batch 2048, lr 1e-8 × 2048 after 200 warm-up steps, 2000
steps, Adafactor, reference update every τ = 32 steps with monitor δ = 0.002, γ = 0.9 over-sampling of the
noisy end of the shifted σ grid and the flow version of λ(t). [choice, PAPER.md §5: the paper gives no SD3
recipe; these are SDXL's settings.]

    python train_sd3.py                                    # one GPU (accumulation 2048)
    torchrun --nproc_per_node=8 train_sd3.py               # 8 GPUs (accumulation 256 each)
    python train_sd3.py --tiny                             # offline CPU demo: tiny SD3-layout model (~1 min)
    python train_sd3.py --resume latest                    # continue the run in --output_dir
    python train_sd3.py --drop_t5                          # no T5 encoder: zeros in its place, ~9 GB less
    python train_sd3.py --gradient_checkpointing --optimizer adamw8bit   # less memory (needs bitsandbytes)
    python train_sd3.py --tau 0 --gamma 1 --no_reward_scale --beta 2000  # plain Diffusion-DPO

β does not transfer from the ε-prediction models (ε̂ − ε = (1 − σ)(v̂ − v), PAPER.md §4): watch the logged
errors and accuracy. Output: OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-STEP/ and the trained pipeline in
OUTPUT_DIR/final/ (StableDiffusion3Pipeline.from_pretrained loads it; it keeps T5 even after --drop_t5, and
`text_encoder_3=None, tokenizer_3=None` there samples as the model was trained). The loop and every other
flag are shared with the SD1.5 and SDXL trainers (trainer.py); this file holds what is SD3's own.
"""
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import lora
import schedule
import trainer

RECIPE = dict(pretrained_model="stabilityai/stable-diffusion-3-medium-diffusers", resolution=1024,
              effective_batch_size=2048, warmup_steps=200, max_steps=2000, tau=32, delta=0.002,
              optimizer="adafactor", output_dir="out/sd3")


class SD3(trainer.VAEImages):
    """Stable Diffusion 3: two CLIP encoders with pooled projections and T5, 16-channel VAE latents with
    a shift, a velocity-prediction MMDiT trained by rectified flow on a shifted σ grid (PAPER.md §4)."""

    name = "sd3"
    tiny_kind = "sd3"
    # [choice] T5 tokens per prompt, as diffusers' SD3 training scripts (the pipeline samples with 256).
    t5_max_length = 77

    @staticmethod
    def add_flags(parser):
        parser.add_argument("--drop_t5", action="store_true",
                            help="do not load T5: zeros in place of its states, as StableDiffusion3Pipeline "
                                 "with text_encoder_3=None (saves ~9 GB; prompts are read by CLIP only)")

    def __init__(self, args, runtime):
        self.path = trainer.resolve_model(args.pretrained_model)
        self.device, self.dtype = runtime.device, runtime.weight_dtype
        load = trainer.load_component
        self.tokenizers = [load(CLIPTokenizer, self.path, "tokenizer"), load(CLIPTokenizer, self.path, "tokenizer_2")]
        self.text_encoders = [trainer.frozen(load(CLIPTextModelWithProjection, self.path, folder), self.device,
                                             self.dtype) for folder in ("text_encoder", "text_encoder_2")]
        for tokenizer, encoder, name in zip(self.tokenizers, self.text_encoders, ("tokenizer", "tokenizer_2")):
            trainer.check_tokenizer(tokenizer, encoder, name)
        self.tokenizer_3 = self.text_encoder_3 = None
        if not args.drop_t5:
            self.tokenizer_3 = load(T5TokenizerFast, self.path, "tokenizer_3")
            self.text_encoder_3 = trainer.frozen(load(T5EncoderModel, self.path, "text_encoder_3"), self.device,
                                                 self.dtype)
            trainer.check_tokenizer(self.tokenizer_3, self.text_encoder_3, "tokenizer_3")
        vae = load(AutoencoderKL, self.path, "vae")
        # As the pipeline decodes: in fp32 if the VAE's config asks for it (SD3's does), then cast.
        self.vae = trainer.frozen(vae, self.device, torch.float32 if vae.config.force_upcast else self.dtype)
        self.scheduler = load(FlowMatchEulerDiscreteScheduler, self.path, "scheduler")
        self.policy = load(SD3Transformer2DModel, self.path, "transformer")  # fp32 master weights, trained
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        # The scheduler's training grid: σ_i = shift·s / (1 + (shift − 1)·s), s = i/T, listed noisiest first.
        # Reversed, it is indexed like a DDPM timestep: sigmas[t] grows with t, so the Cat(γ^k) sampler of
        # schedule.py over-samples high σ, the early generation steps (§3).
        self.sigmas = self.scheduler.sigmas.flip(0).to(self.device)
        self.reward_scale = schedule.reward_scale_flow(self.sigmas)

    @torch.no_grad()
    def encode_prompts(self, captions):
        """As StableDiffusion3Pipeline.encode_prompt: the CLIP penultimate states concatenated on the
        channel axis and zero-padded to T5's width, followed on the sequence axis by the T5 states (zeros
        without T5); pooled = both CLIP projections concatenated."""
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(captions), self.t5_max_length, self.policy.config.joint_attention_dim,
                             device=self.device, dtype=self.dtype)
        else:
            ids = self.tokenizer_3(captions, padding="max_length", truncation=True, max_length=self.t5_max_length,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0]
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def encode_captions(self, captions):
        states, pooled = self.encode_prompts(captions)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    @torch.no_grad()
    def encode(self, batch, generator):
        """Pixels [2B] (winners then losers) → latents (z − shift)·scale (§4); captions [B] → text states,
        repeated per pair."""
        moments, prompts = trainer.encoder_outputs(self, batch)
        config = self.vae.config
        latents = (DiagonalGaussianDistribution(moments).sample(generator) - config.shift_factor) * config.scaling_factor
        return latents.to(self.dtype), {"encoder_hidden_states": prompts["encoder_hidden_states"].repeat(2, 1, 1),
                                        "pooled_projections": prompts["pooled_projections"].repeat(2, 1)}

    def offload_encoders(self):
        """Once everything is cached the VAE and the text encoders never run again: free their memory
        (T5 alone is ~9 GB)."""
        for module in (self.vae, *self.text_encoders, self.text_encoder_3):
            if module is not None:
                module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample_noise_level(self, n, generator, gamma, num_bins):
        """One σ per pair from the shifted grid, high σ over-sampled by Cat(γ^k); λ(σ) per pair (§3–§4).

        Returned as the transformer's timestep σ·T (as the pipeline passes it), which keeps the log's
        t-bins (trainer.BinStats) on the 0 … T scale."""
        index = schedule.sample_timesteps(n, self.num_train_timesteps, gamma, num_bins, generator=generator)
        index = index.to(self.device)
        return self.sigmas[index] * self.num_train_timesteps, self.reward_scale[index]

    def add_noise(self, latents, noise, timesteps):
        """x_σ = (1 − σ)·x0 + σ·ε, and the velocity target v = ε − x0 the model predicts (§4)."""
        sigma = (timesteps / self.num_train_timesteps).view(-1, 1, 1, 1)  # fp32, whatever the latents' dtype
        noisy = (1 - sigma) * latents + sigma * noise
        return noisy.to(latents.dtype), noise - latents

    def predict(self, forward, noisy, timesteps, cond):
        return forward(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def save_pipeline(self, policy, out_dir):
        pipeline = StableDiffusion3Pipeline.from_pretrained(self.path, transformer=policy)
        pipeline.save_pretrained(out_dir)

    def save_lora(self, policy, out_dir):
        """--lora_rank: the trained adapter only, in the format `pipe.load_lora_weights(out_dir)` reads."""
        StableDiffusion3Pipeline.save_lora_weights(
            out_dir, transformer_lora_layers=lora.adapter_state_dict(policy),
            transformer_lora_adapter_metadata=lora.adapter_metadata(policy))


if __name__ == "__main__":
    trainer.main(__doc__.split("\n")[0], RECIPE, SD3)
