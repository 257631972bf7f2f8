"""Bytes per GPU of a full fine-tune of SDXL, SD3 and FLUX.1 under DDP and under FSDP, computed, not guessed.

    python -m tools.memory                  # 8 GPUs, 1 pair per GPU per micro-batch, 1024 px
    python -m tools.memory --gpus 16 --resolution 512

Every figure comes from the real architectures, built on PyTorch's meta device (shapes only: nothing is
allocated or downloaded): parameter counts and Adafactor's factored state from the parameter shapes, and the
activations a training step keeps for backward by running the denoiser's forward on meta tensors in bf16 and
adding up what autograd saves (saved_tensors_hooks), with and without diffusers' gradient checkpointing.
Attention is counted as a flash kernel keeps it (q, k, v, output and the log-sum-exp, not the s×s matrix).

The LoRA line adds rank-r adapters on to_q/k/v/out (mechanics/lora.py) to the frozen bf16 base, with the
activations of the same forward.

Per GPU: the policy's fp32 weights, its fp32 gradients, the optimizer's state (AdamW: two fp32 moments;
Adafactor: factored second moments), the reference (DDP: a bf16 copy; FSDP: fp32 shards) and the frozen text
encoders and VAE in bf16 (0 with --cache_latents, which moves them to the CPU after one pass); p_init waits in
CPU memory. Under FSDP the first four are divided by the number of GPUs; a block's gathered bf16 weights and the
framework's own buffers (CUDA context, allocator slack, communication buckets: a few GB) come on top of both.
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F

# The published configs (unet/ or transformer/ config.json of each base model), written out: nothing is downloaded.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Frozen parts in bf16, parameter counts of the published checkpoints: text encoders and the VAE.
FROZEN = {"SDXL": 123_060_480 + 694_659_840 + 83_653_863,  # CLIP-L, OpenCLIP-bigG, VAE
          "SD3": 123_650_304 + 694_659_840 + 4_762_310_656 + 83_819_683,  # CLIP-L, CLIP-G, T5-XXL, VAE
          "FLUX": 123_060_480 + 4_762_310_656 + 83_819_683}  # CLIP-L, T5-XXL, VAE
OPTIMIZER = {"SDXL": "adafactor", "SD3": "adafactor", "FLUX": "adamw"}  # the recipes' (FLUX: also with Adafactor)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # mechanics/lora.py's


class _FlashAttention(torch.autograd.Function):
    """What a flash kernel keeps for backward: q, k, v, the output and the fp32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


@contextlib.contextmanager
def _flash_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: _FlashAttention.apply(query, key, value)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(forward) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with _flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total[0]


def build(name: str, resolution: int):
    """The denoiser on the meta device in bf16, and a forward on one image at `resolution`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    meta = dict(device="meta", dtype=torch.bfloat16)
    latent = resolution // 8
    with torch.device("meta"):
        if name == "SDXL":
            model = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
            x, c = torch.empty(1, 4, latent, latent, **meta), torch.empty(1, 77, 2048, **meta)
            added = {"text_embeds": torch.empty(1, 1280, **meta), "time_ids": torch.empty(1, 6, **meta)}
            return model, lambda: model(x, torch.tensor([500], device="meta"), encoder_hidden_states=c,
                                        added_cond_kwargs=added)
        if name == "SD3":
            model = SD3Transformer2DModel(**SD3_TRANSFORMER).to(torch.bfloat16)
            x, c = torch.empty(1, 16, latent, latent, **meta), torch.empty(1, 77 + 256, 4096, **meta)
            return model, lambda: model(hidden_states=x, timestep=torch.tensor([500.0], device="meta"),
                                        encoder_hidden_states=c, pooled_projections=torch.empty(1, 2048, **meta))
        model = FluxTransformer2DModel(**FLUX_TRANSFORMER).to(torch.bfloat16)
        tokens, text = (latent // 2) ** 2, 512
        return model, lambda: model(hidden_states=torch.empty(1, tokens, 64, **meta),
                                    encoder_hidden_states=torch.empty(1, text, 4096, **meta),
                                    pooled_projections=torch.empty(1, 768, **meta),
                                    timestep=torch.tensor([0.5], device="meta"), guidance=torch.tensor([3.5], device="meta"),
                                    img_ids=torch.zeros(tokens, 3, device="meta"), txt_ids=torch.zeros(text, 3, device="meta"))


def adafactor_state_bytes(model) -> int:
    """transformers' Adafactor without momentum: a row and a column second moment per matrix, fp32."""
    total = 0
    for p in model.parameters():
        shape = p.shape
        total += 4 * (shape[:-2].numel() * (shape[-2] + shape[-1]) if p.dim() >= 2 else p.numel())
    return total


def lora_params(model, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(LORA_TARGETS))


def figures(name: str, resolution: int, lora_rank: int) -> dict:
    model, forward = build(name, resolution)
    params = sum(p.numel() for p in model.parameters())
    plain = saved_bytes(forward)
    model.enable_gradient_checkpointing()
    checkpointed = saved_bytes(forward)
    return {"params": params, "adamw": 8 * params, "adafactor": adafactor_state_bytes(model),
            "activations": 2 * plain, "activations_checkpointed": 2 * checkpointed,  # one pair = 2 images
            "frozen": 2 * FROZEN[name], "lora": lora_params(model, lora_rank)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over")
    p.add_argument("--resolution", type=int, default=1024, help="pixels")
    p.add_argument("--lora_rank", type=int, default=8, help="rank of the one-GPU LoRA line (train_flux.py's recipe: 8)")
    args = p.parse_args(argv)
    gb = 1e9
    print(f"GB per GPU, full fine-tune, 1 pair (2 images) per GPU per micro-batch at {args.resolution} px, "
          f"FSDP over {args.gpus} GPUs; act = activations without / with gradient checkpointing")
    print("| model | params | weights fp32 | grads fp32 | optimizer | reference | frozen enc.+VAE | act | act ckpt "
          "| DDP total (ckpt) | FSDP total (ckpt) | fits 80 GB | fits 141 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lora = {}
    for name, optimizer in (("SDXL", "adamw"), ("SDXL", "adafactor"), ("SD3", "adamw"), ("SD3", "adafactor"),
                            ("FLUX", "adamw"), ("FLUX", "adafactor")):  # Adafactor: DDP only (README)
        f = lora.setdefault(name, figures(name, args.resolution, args.lora_rank))
        n, f["optimizer"] = f["params"], f[optimizer]
        state = {"DDP": 4 * n + 4 * n + f["optimizer"] + 2 * n, "FSDP": (4 * n + 4 * n + f["optimizer"] + 4 * n) / args.gpus}
        if optimizer == "adafactor":  # transformers' Adafactor takes no DTensors: no FSDP
            del state["FSDP"]
        totals = {k: (v + f["frozen"] + f["activations"], v + f["frozen"] + f["activations_checkpointed"])
                  for k, v in state.items()}
        fits = lambda limit: ", ".join(f"{k}{' ckpt' if i else ''}" for k, t in totals.items() for i, x in enumerate(t)
                                       if x / gb <= limit) or "none"
        fsdp = f"{totals['FSDP'][0] / gb:.0f} ({totals['FSDP'][1] / gb:.0f})" if "FSDP" in totals else "—"
        reference = f"DDP {2 * n / gb:.1f}" + (f", FSDP {4 * n / args.gpus / gb:.1f}" if "FSDP" in totals else "")
        print(f"| {name} ({optimizer}) | {n / 1e9:.2f} B | {4 * n / gb:.1f} | {4 * n / gb:.1f} | {f['optimizer'] / gb:.1f} "
              f"| {reference} | {f['frozen'] / gb:.1f} | {f['activations'] / gb:.1f} "
              f"| {f['activations_checkpointed'] / gb:.1f} | {totals['DDP'][0] / gb:.0f} ({totals['DDP'][1] / gb:.0f}) "
              f"| {fsdp} | {fits(80)} | {fits(141)} |")
    f = lora["FLUX"]
    adapters = f["lora"] * (4 + 4 + 8 + 4)  # the policy's: fp32 weights, grads, two AdamW moments; the reference's
    base = 2 * f["params"]
    print(f"\nFLUX LoRA r{args.lora_rank} on one GPU (train_flux.py's recipe), GB: base transformer bf16 {base / gb:.1f}, "
          f"two adapters of {f['lora'] / 1e6:.1f} M parameters with AdamW {adapters / gb:.2f}, frozen encoders + VAE "
          f"{f['frozen'] / gb:.1f} (0 with --cache_latents), activations per pair {f['activations'] / gb:.1f} "
          f"(checkpointed {f['activations_checkpointed'] / gb:.1f}); total {(base + adapters + f['frozen'] + f['activations']) / gb:.0f} "
          f"without gradient checkpointing, {(base + adapters + f['frozen'] + f['activations_checkpointed']) / gb:.0f} with "
          f"({(base + adapters + f['activations_checkpointed']) / gb:.0f} with --cache_latents)")


if __name__ == "__main__":
    main()
