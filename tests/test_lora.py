"""--lora_rank (lora.py): log 2 at init, only the adapter trains, the reference adapter is copied at multiples
of τ, and the saved adapter is what diffusers' load_lora_weights reads; the file for ComfyUI and AUTOMATIC1111
(kohya's keys for SD1.5 and SDXL, alpha for every family) gives the same images. Tiny models, offline."""
import json
import math
import os

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from mechanics import runtime as mruntime
from helpers import main_or_exit, run_sd15 as run_log, sd15_dpo_loss, setup_sd15 as setup
from mechanics import lora
from reference import Reference
import train_flux
import train_sd3
import train_sdxl


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 16, 16, generator=g), torch.tensor([10, 300, 600, 999]),
            torch.randn(4, 77, 32, generator=g))


def forward(module, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return module(x, t, encoder_hidden_states=c).sample


def nudge(tensors, amount=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
            p.add_(amount * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("tau", [0, 2])
def test_loss_is_log2_at_init_and_only_the_adapter_gets_gradients(tmp_path, tau):
    args, runtime, model = setup(tmp_path, "--lora_rank", 4, "--tau", tau)
    unet = model.unet
    trainable = lora.add_lora(unet, 4, reference_adapter=tau > 0)
    policy_view, reference_view = lora.views(unet, tau)  # as the trainers build the LoRA reference
    reference = Reference(policy_view, tau=tau, delta=0.05, on_diverge="freeze", model=reference_view)
    import data
    loader = data.PairLoader(data.load_pairs(args.dataset), data.PairTransform(args.resolution, random_flip=True),
                             args.train_batch_size)
    batch = next(iter(loader))
    loss, metrics = sd15_dpo_loss(args, model, batch, mruntime.micro_generators(0, 0, 0, runtime.device), unet,
                                  reference.model)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and metrics["reward_margin"].item() == 0
    loss.backward()
    with_grad = {name for name, p in unet.named_parameters() if p.grad is not None}
    trainable_ids = {id(p) for p in trainable}
    assert with_grad == {name for name, p in unet.named_parameters() if id(p) in trainable_ids}
    assert with_grad and all(".lora_" in name and ".default." in name for name in with_grad)
    assert sum(p.numel() for p in trainable) < 0.1 * sum(p.numel() for p in unet.parameters())
    assert list(policy_view.parameters()) == trainable and len(list(reference.model.parameters())) == (
        len(trainable) if tau else 0)


def test_views_match_peft_public_switches_and_leave_requires_grad_alone(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(setup(tmp_path)[0].pretrained_model, "unet"))
    inputs = unet_inputs()
    base = forward(unet, inputs)
    trainable = lora.add_lora(unet, 4, reference_adapter=True)
    nudge(trainable)  # B ≠ 0: the policy adapter now changes the output
    off, ref = lora.AdapterView(unet, None), lora.AdapterView(unet, lora.REFERENCE)
    policy_out = forward(unet, inputs)
    assert not torch.allclose(policy_out, base)
    assert torch.equal(forward(off, inputs), base)  # adapters off: exactly the base model
    assert torch.equal(forward(ref, inputs), base)  # the reference adapter still has B = 0
    assert torch.equal(forward(unet, inputs), policy_out)  # each view switches back
    unet.set_adapter(lora.REFERENCE)
    assert torch.equal(forward(unet, inputs), forward(ref, inputs))
    unet.set_adapter(lora.POLICY)
    unet.disable_adapters()
    assert torch.equal(forward(unet, inputs), forward(off, inputs))
    unet.enable_adapters()
    for p in trainable:
        p.requires_grad_(True)
    flags = [p.requires_grad for p in unet.parameters()]
    forward(ref, inputs), forward(off, inputs)
    assert [p.requires_grad for p in unet.parameters()] == flags


def test_reference_adapter_copies_every_tau_and_initial_model_is_adapters_off(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(setup(tmp_path)[0].pretrained_model, "unet"))
    inputs = unet_inputs()
    base = forward(unet, inputs)
    trainable = lora.add_lora(unet, 4, reference_adapter=True)
    policy_view, reference_view = lora.views(unet, 3)
    reference = Reference(policy_view, tau=3, delta=1e9, on_diverge="reinit", model=reference_view)
    reference_tensors = lora.adapter_tensors(unet, lora.REFERENCE)
    initial = [t.clone() for t in reference_tensors]
    err_fn = lambda module: (forward(module, inputs) ** 2).flatten(1).mean(1)
    predict, target = (lambda module: forward(module, inputs)), torch.zeros_like(base)  # errors = err_fn's
    for step in range(1, 8):
        nudge(trainable, seed=step)
        before = [t.clone() for t in reference_tensors]
        info = reference.step(step, policy_view, predict, target)
        now = reference_tensors
        if step % 3 == 0:
            assert info["ref_updated"] and all(torch.equal(a, b) for a, b in zip(now, trainable))
            expected = (err_fn(policy_view) - (base ** 2).flatten(1).mean(1)).mean().item()
            assert info["divergence"] == pytest.approx(expected, rel=1e-4, abs=1e-8)
        else:
            assert not info["ref_updated"] and all(torch.equal(a, b) for a, b in zip(now, before))
    # Re-Init puts the initial adapter back: B = 0, the base model.
    reference.delta = -1.0
    assert reference.step(9, policy_view, predict, target)["ref_reinit"]
    assert all(torch.equal(a, b) for a, b in zip(reference_tensors, initial))
    assert torch.equal(forward(reference.model, inputs), base)
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(reference.model.parameters(), reference_tensors))


def test_lora_run_copies_the_reference_adapter_at_multiples_of_tau_and_saves_loadable_weights(tmp_path):
    log = run_log(tmp_path, "--lora_rank", 4, "--tau", 2, "--delta", 1e9, "--max_steps", 4, "--learning_rate", 1e-3,
                  "--checkpoint_every", 1, "--keep_checkpoints", 10)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert [r["ref_updated"] for r in log] == [False, True, False, True]
    base = UNet2DConditionModel.from_pretrained(os.environ["RDPO_CACHE"] + "/tiny-sd15-v1", subfolder="unet").state_dict()
    adapters = {}
    for step in range(1, 5):
        state = torch.load(tmp_path / f"checkpoint-{step}" / "state.pt", weights_only=False)["policy"]
        for key, value in state.items():  # the base weights never move
            if ".lora_" not in key:
                assert torch.equal(value, base[key.replace(".base_layer", "")]), key
        adapters[step] = {name: [v for k, v in state.items() if f".{name}." in k] for name in ("default", "reference")}
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not same(adapters[1]["default"], adapters[2]["default"])
    assert same(adapters[2]["reference"], adapters[2]["default"])       # copied at step 2 …
    assert same(adapters[3]["reference"], adapters[2]["default"])       # … kept through step 3 …
    assert not same(adapters[3]["reference"], adapters[3]["default"])
    assert same(adapters[4]["reference"], adapters[4]["default"])       # … copied again at step 4

    final = tmp_path / "final_lora"
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    pipe = StableDiffusionPipeline.from_pretrained(os.environ["RDPO_CACHE"] + "/tiny-sd15-v1")
    sample = lambda: pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images[0]
    before = sample()
    pipe.load_lora_weights(str(final))
    after = sample()
    assert abs(after - before).max() > 1e-4
    pipe.unload_lora_weights()
    assert abs(sample() - before).max() < 1e-6


# LoRA files for the tools people load them in (lora.save_for_tools): rank 4 with alpha 2, so a loader that took
# alpha for the rank (as diffusers' own kohya converter writes it) or ignored it would double the update. A learning
# rate so high that two steps move every family's images by more than 1e-2: a doubled update misses the diffusers
# file's images by far more than the tolerance of 1e-4, which only float rounding could use.
RANK, ALPHA = 4, 2.0
TOOLS_FLAGS = ["--lora_rank", RANK, "--lora_alpha", ALPHA, "--max_steps", 2, "--learning_rate", 0.1,
               "--checkpoint_every", 1000]


def train_lora(family, output_dir):
    """A tiny LoRA run of `family`'s trainer (τ = 8: its reference adapter exists, still at B = 0); its final_lora/."""
    if family == "sd15":
        run_log(output_dir, *TOOLS_FLAGS)
    else:
        trainer = {"sdxl": train_sdxl, "sd3": train_sd3, "flux": train_flux}[family]
        main_or_exit(trainer, ["--tiny", "--output_dir", str(output_dir), *map(str, TOOLS_FLAGS)])
    return output_dir / "final_lora"


def sample(pipe):
    extra = {"max_sequence_length": 16} if isinstance(pipe, diffusers.FluxPipeline) else {}
    return pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **extra).images[0]


def load_tools_lora(pipe, state):
    """Diffusers' loader for a tools' file (a state dict): the pipeline's own, which detects kohya's keys (SD1.5,
    SDXL) and reads `.alpha` keys (FLUX). SD3's pipeline loader refuses keys without "lora" in their name and takes
    alpha only from diffusers' own metadata, so its transformer's load_lora_adapter is given the file's alphas."""
    if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
        state = dict(state)
        alphas = {key: state.pop(key).item() for key in list(state) if key.endswith(".alpha")}
        pipe.transformer.load_lora_adapter(state, prefix="transformer", network_alphas=alphas)
    else:
        pipe.load_lora_weights(state)


def check_tools_file(final, tools_name, modules, parts, base_model_version):
    """The tools' file holds the trained adapter of the diffusers file (`modules`: its module → (the diffusers
    file's key, the tools' file's key) of each tensor), `.alpha` = ALPHA per module, kohya's metadata, and gives
    the diffusers file's images in diffusers' loader."""
    path = final / tools_name
    tools, ours = load_file(path), load_file(final / "pytorch_lora_weights.safetensors")
    assert set(tools) == {f"{module}.{part}" for module in modules.values() for part in (*parts, "alpha")}
    assert {tools[f"{module}.alpha"].item() for module in modules.values()} == {ALPHA}
    for key, value in ours.items():  # the trained adapter's tensors, not the reference adapter's (B = 0)
        module, part = key.split(".lora.")
        assert torch.equal(tools[f"{modules[module]}.{parts[part != 'down.weight']}"], value), key
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == str(ALPHA)
    assert metadata["ss_base_model_version"] == base_model_version and "lora_adapter_metadata" not in metadata

    base = json.loads((final / "base_model.json").read_text())
    pipe = getattr(diffusers, base["pipeline"]).from_pretrained(base["base_model"])
    before = sample(pipe)
    pipe.load_lora_weights(final)  # the diffusers file
    expected = sample(pipe)
    pipe.unload_lora_weights()
    if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
        load_tools_lora(pipe, tools)
    else:
        pipe.load_lora_weights(str(path))  # the file, as a user passes it
    from_tools = sample(pipe)
    pipe.unload_lora_weights()
    load_tools_lora(pipe, {k: torch.tensor(float(RANK)) if k.endswith(".alpha") else v for k, v in tools.items()})
    alpha_as_rank = sample(pipe)
    assert abs(expected - before).max() > 1e-2       # the LoRA changes the images: the comparison says something
    assert abs(from_tools - expected).max() < 1e-4   # the same images as the diffusers file
    assert abs(alpha_as_rank - expected).max() > 1e-3  # and the file's alpha is what makes them the same


@pytest.mark.parametrize("family, version", [("sd15", "sd_v1"), ("sdxl", "sdxl_base_v1-0")])
def test_the_kohya_file_loads_in_diffusers_kohya_loader_with_the_images_of_the_diffusers_file(tmp_path, family, version):
    final = train_lora(family, tmp_path)
    ours = load_file(final / "pytorch_lora_weights.safetensors")
    assert all(key.startswith("unet.") for key in ours)
    # kohya's names: lora_unet_ and the diffusers module with "_" for "." (what ComfyUI and AUTOMATIC1111 map)
    modules = {key.split(".lora.")[0]: "lora_unet_" + key.split(".lora.")[0].removeprefix("unet.").replace(".", "_")
               for key in ours}
    assert all(key.startswith("lora_unet_") for key in load_file(final / lora.KOHYA_FILE))
    check_tools_file(final, lora.KOHYA_FILE, modules, ["lora_down.weight", "lora_up.weight"], version)


@pytest.mark.parametrize("family, version", [("sd3", "sd3"), ("flux", "flux1")])
def test_the_sd3_and_flux_file_carries_alpha_and_gives_the_images_of_the_diffusers_file(tmp_path, family, version):
    final = train_lora(family, tmp_path)
    ours = load_file(final / "pytorch_lora_weights.safetensors")
    # diffusers' module names, which ComfyUI maps for SD3 and FLUX, with PEFT's lora_A / lora_B and `.alpha`
    modules = {key.split(".lora.")[0]: key.split(".lora.")[0] for key in ours}
    assert modules and all(module.startswith("transformer.") for module in modules)
    check_tools_file(final, lora.COMFYUI_FILE, modules, ["lora_A.weight", "lora_B.weight"], version)
