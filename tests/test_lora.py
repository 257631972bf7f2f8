"""--lora_rank (lora.py): log 2 at init, only the adapter trains, the reference adapter is copied at multiples
of τ, and the saved adapter is what diffusers' load_lora_weights reads. Tiny SD1.5, offline."""
import math
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from mechanics import runtime as mruntime
from helpers import run_sd15 as run_log, sd15_dpo_loss, setup_sd15 as setup
from mechanics import lora
from reference import Reference
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
