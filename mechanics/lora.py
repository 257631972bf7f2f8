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
adapter is saved with the pipeline's `save_lora_weights`, which `pipe.load_lora_weights(folder)` reads.
"""
import warnings
from contextlib import contextmanager

import torch
from torch import nn

POLICY = "default"      # peft's default adapter name: diffusers' save/load of LoRA weights expects it
REFERENCE = "reference"
# The attention projections of diffusers' UNet and MMDiT blocks, as diffusers' LoRA training scripts target.
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
