"""LoRA fine-tuning (--lora_rank) with the paper's reference update, at the memory cost of one base model.

peft adapters on the denoiser's attention projections (diffusers' PEFT integration, `add_adapter`):

- the policy is the base model plus the trained adapter "default";
- plain Diffusion-DPO (τ = 0): the reference is the same model with its adapters switched off, so there is
  no second copy of anything;
- with the reference update (τ > 0, PAPER.md §2): the reference is a second adapter, "reference", that
  reference.Reference copies from the trained adapter every τ steps. The initial model p_init is "adapters
  off": LoRA's B matrices start at zero, so the adapter's initial weights ARE p_init, and the monitor's
  p_init forward loads them into the reference adapter exactly as it loads full weights otherwise.

Both sides are `AdapterView`s of the one shared denoiser: a view runs the denoiser with its adapter active and
exposes only that adapter's tensors as its parameters, so reference.Reference copies, snapshots (pinned CPU)
and restores adapter weights with the very rule it applies to full models. The frozen base weights are kept
in the training dtype (bf16 on CUDA), the adapters in fp32, as in diffusers' LoRA scripts. The trained
adapter is saved with the pipeline's `save_lora_weights`, which `pipe.load_lora_weights(folder)` reads, and
once more for the tools people load LoRAs in (`save_for_tools`): ComfyUI and AUTOMATIC1111 read neither
diffusers' UNet keys nor the alpha it keeps in its own metadata, so a LoRA trained with alpha ≠ rank would
load there at the wrong strength, or (SD1.5, SDXL) not at all.
"""
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

POLICY = "default"      # peft's default adapter name: diffusers' save/load of LoRA weights expects it
REFERENCE = "reference"
# The attention projections of diffusers' UNet and MMDiT blocks [choice: these four; what diffusers' first SD and FLUX
# LoRA scripts targeted; its current FLUX and SD3 scripts add the text stream's and the feed-forward layers (README)]
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _tuner_layers(denoiser: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


def adapter_tensors(denoiser: nn.Module, adapter: str) -> list[torch.Tensor]:
    """The parameters of one adapter, in module order (the same order for every adapter of one model)."""
    tensors = []
    for layer in _tuner_layers(denoiser):
        for name in layer.adapter_layer_names:
            holder = getattr(layer, name, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and adapter in holder:
                item = holder[adapter]
                tensors.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return tensors


def add_lora(denoiser: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
             reference_adapter: bool = False, base_dtype: torch.dtype | None = None,
             seed: int = 0) -> list[torch.Tensor]:
    """Freeze `denoiser`, cast its base weights to `base_dtype`, add the trained LoRA adapter (and, for the
    reference update, a second one equal to it). Returns the trainable parameters (the adapter's, fp32).
    The adapters' random A matrices are drawn from `seed` (peft draws them on the CPU), so every run and
    every DDP rank starts from the same adapter."""
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    if base_dtype is not None and base_dtype != denoiser.dtype:
        denoiser.to(dtype=base_dtype)  # frozen: no fp32 master copy needed (about half the memory)
    # Gaussian A, zero B (diffusers' LoRA scripts): the adapted model starts exactly at the base model.
    config = dict(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(**config), adapter_name=POLICY)
        if reference_adapter:
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
                warnings.simplefilter("ignore", UserWarning)
                denoiser.add_adapter(LoraConfig(**config), adapter_name=REFERENCE)
            denoiser.set_adapter(POLICY)
            with torch.no_grad():
                for ref, pol in zip(adapter_tensors(denoiser, REFERENCE), adapter_tensors(denoiser, POLICY), strict=True):
                    ref.copy_(pol)
    trainable = adapter_tensors(denoiser, POLICY)
    for p in denoiser.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.data = p.data.float()
        p.requires_grad_(True)
    for p in adapter_tensors(denoiser, REFERENCE):
        p.data = p.data.float()
    return trainable


@contextmanager
def active_adapter(layers: list, adapter: str | None):
    """Run the shared denoiser through `adapter` (None: adapters off, the base model), then switch back.

    Sets peft's per-layer state directly on a list of layers built once: the public switches
    (`set_adapter`, `disable_adapters`) walk every module of the model and flip requires_grad on the adapter
    weights at each call, which the training loop must not do between the policy's forward and backward.
    """
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        for layer in layers:
            if adapter is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter, layer._disable_adapters = [adapter], False
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


class AdapterView(nn.Module):
    """The shared denoiser seen through one adapter, or through none (`adapter=None`: the base model).

    Its parameters are that adapter's weights only (the same Parameter objects the denoiser holds, not
    copies), so reference.Reference copies, snapshots and restores adapter weights and nothing else. The
    denoiser is not a submodule: the view never moves, casts or trains the base weights.
    """

    def __init__(self, denoiser: nn.Module, adapter: str | None):
        super().__init__()
        self.__dict__["denoiser"] = denoiser  # plain attribute, not a registered submodule
        self.adapter = adapter
        self.layers = _tuner_layers(denoiser)
        self.weights = nn.ParameterList(adapter_tensors(denoiser, adapter) if adapter else [])

    def forward(self, *args, **kwargs):
        with active_adapter(self.layers, self.adapter):
            return self.denoiser(*args, **kwargs)


def views(denoiser: nn.Module, tau: int) -> tuple[AdapterView, AdapterView]:
    """(policy, reference) of a LoRA run for reference.Reference: the policy adapter, and the second adapter
    the τ copies go into (τ = 0: the adapter-free base model, i.e. p_init itself). Hand the policy view, not
    the denoiser, to the reference's step and divergence."""
    return AdapterView(denoiser, POLICY), AdapterView(denoiser, REFERENCE if tau else None)


def adapter_state_dict(denoiser: nn.Module) -> dict:
    """The trained adapter in diffusers' LoRA key format (what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=POLICY))


def adapter_metadata(denoiser: nn.Module) -> dict:
    """The LoraConfig (rank, alpha, targets) stored beside the weights, so a loader gets alpha right."""
    return denoiser.peft_config[POLICY].to_dict()


# final_lora/'s file for the tools people load LoRAs in, beside diffusers' pytorch_lora_weights.safetensors:
# - UNets (SD1.5, SDXL): kohya's convention, which ComfyUI, AUTOMATIC1111 (and Forge, SD.Next, InvokeAI) read:
#   `lora_unet_<module, "." as "_">` + `.lora_down.weight`, `.lora_up.weight` and `.alpha`, the module named as in
#   diffusers' UNet (as kohya's sd-scripts name SD1.5 modules and diffusers' own `convert_state_dict_to_kohya` does;
#   both tools map these names onto SD1.5's and SDXL's original layout).
# - transformers (SD3, FLUX): diffusers' keys, which ComfyUI already maps (`transformer.<module>.lora_A.weight`,
#   `.lora_B.weight`), with the `.alpha` per module that ComfyUI reads and diffusers' FLUX loader reads too
#   (SD3's pipeline loader refuses a key without "lora" in it: in diffusers, SD3 loads the diffusers file).
# Neither file carries diffusers' own adapter metadata (FLUX's loader refuses alphas given twice); both carry
# kohya's `ss_*` metadata, which AUTOMATIC1111 reads to list a LoRA under its base model.
KOHYA_FILE = "kohya_lora.safetensors"
COMFYUI_FILE = "comfyui_lora.safetensors"
# kohya's ss_base_model_version of each pipeline ("sd_v2" for an SD2 UNet under the SD1.5 pipeline).
BASE_MODEL_VERSION = {"StableDiffusionPipeline": "sd_v1", "StableDiffusionXLPipeline": "sdxl_base_v1-0",
                      "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux1"}


def tools_file(prefix: str) -> str:
    """The name of the tools' file for a denoiser saved under `prefix` ("unet" or "transformer")."""
    return KOHYA_FILE if prefix == "unet" else COMFYUI_FILE


def module_alphas(denoiser: nn.Module) -> dict[str, float]:
    """Each module the trained adapter adapts (its name in the denoiser) -> that adapter's lora_alpha there
    (peft scales the module's update by alpha / rank, as kohya's loaders do with `.alpha`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return {name: float(layer.lora_alpha[POLICY]) for name, layer in denoiser.named_modules()
            if isinstance(layer, BaseTunerLayer) and POLICY in getattr(layer, "lora_alpha", {})}


def tools_state_dict(denoiser: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The trained adapter (never the reference adapter) in the convention of `tools_file(prefix)`, with each
    module's `.alpha` (fp32 scalar): the adapter's lora_alpha, not the rank that `convert_state_dict_to_kohya`
    writes as alpha."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(denoiser, adapter_name=POLICY)
    alphas = module_alphas(denoiser)
    if prefix == "unet":
        state = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_state.items()})
        alpha_of = {"lora_unet_" + name.replace(".", "_"): alpha for name, alpha in alphas.items()}
    else:
        state = {f"{prefix}.{key}": value for key, value in peft_state.items()}
        alpha_of = {f"{prefix}.{name}": alpha for name, alpha in alphas.items()}
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items() if not key.endswith(".alpha")}
    for module in {key[:key.index(".lora_")] for key in state}:
        state[f"{module}.alpha"] = torch.tensor(alpha_of[module], dtype=torch.float32)
    return state


def tools_metadata(denoiser: nn.Module, prefix: str, pipeline: str, base_model: str) -> dict[str, str]:
    """kohya's safetensors metadata: rank, alpha, base model (AUTOMATIC1111 lists a LoRA under its base by it)."""
    config = denoiser.peft_config[POLICY]
    version = BASE_MODEL_VERSION.get(pipeline, pipeline)
    if version == "sd_v1" and getattr(denoiser.config, "cross_attention_dim", None) == 1024:
        version = "sd_v2"
    name = os.path.basename(base_model.rstrip("/")) if os.path.isabs(base_model) else base_model
    metadata = {"ss_network_dim": str(config.r), "ss_network_alpha": str(float(config.lora_alpha)),
                "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"), "ss_sd_model_name": name}
    if prefix == "unet":
        metadata["ss_network_module"] = "networks.lora"
    return metadata


def save_for_tools(folder: str, denoiser: nn.Module, prefix: str, pipeline: str, base_model: str) -> str:
    """Write `folder/tools_file(prefix)`; returns its path. Serialized in memory and written with open(), so
    that a full disk is OSError(ENOSPC) for folder.atomic_dir (safetensors' own writer reports its own error)."""
    from safetensors.torch import save

    path = os.path.join(folder, tools_file(prefix))
    data = save(tools_state_dict(denoiser, prefix), metadata=tools_metadata(denoiser, prefix, pipeline, base_model))
    with open(path, "wb") as f:
        f.write(data)
    return path
