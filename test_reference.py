"""The reference of reference.py (PAPER.md §2) on small modules: τ copies, the monitor D, freeze, Re-Init, ignore."""
import pytest
import torch
from torch import nn

from reference import Probe, Reference


def make_policy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
NOISE = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))


def err_fn(model):
    return (model(X) - NOISE).pow(2).mean(dim=1)


def predict(model):
    """The monitor's probe: the model's predictions on X, whose target is NOISE (reference.step computes the
    errors err_fn gives)."""
    return model(X)


def nudge(policy, amount):
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(amount)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_copies_exactly_at_multiples_of_tau():
    policy = make_policy()
    ref = Reference(policy, tau=4, delta=1e9)
    initial = weights(policy)
    for step in range(1, 13):
        before = weights(ref.model)
        nudge(policy, 0.01)
        info = ref.step(step, policy, predict, NOISE)
        if step % 4 == 0:
            assert info["ref_updated"] and same(weights(ref.model), weights(policy)), step
        else:
            assert not info["ref_updated"] and same(weights(ref.model), before), step
    assert ref.num_updates == 3 and not ref.frozen
    assert same(ref.initial[:4], initial)  # p_init is kept untouched


def test_divergence_is_the_error_gap_to_the_initial_model_and_freezes_past_delta():
    policy = make_policy()
    init_errors = err_fn(make_policy())
    ref = Reference(policy, tau=2, delta=0.05)
    nudge(policy, 0.02)
    ref.step(1, policy, predict, NOISE)
    info = ref.step(2, policy, predict, NOISE)
    expected = (err_fn(policy) - init_errors).mean().item()
    assert info["divergence"] == pytest.approx(expected, rel=1e-5)
    assert expected < 0.05 and not info["ref_frozen"]
    nudge(policy, 0.3)
    info = ref.step(4, policy, predict, NOISE)
    assert info["divergence"] > 0.05 and info["ref_frozen"] and ref.frozen
    frozen_weights = weights(ref.model)
    assert same(frozen_weights, weights(policy))  # frozen at the copy that crossed δ
    nudge(policy, 0.1)
    for step in (5, 6, 8):
        info = ref.step(step, policy, predict, NOISE)
        assert not info["ref_updated"] and info["ref_frozen"]
    assert same(weights(ref.model), frozen_weights)


def test_reinit_resets_to_the_initial_model_and_keeps_monitoring():
    policy = make_policy()
    initial = weights(policy)
    ref = Reference(policy, tau=1, delta=0.05, on_diverge="reinit")
    nudge(policy, 0.5)
    info = ref.step(1, policy, predict, NOISE)
    assert info["ref_reinit"] and not ref.frozen
    assert same(weights(ref.model), initial)
    info = ref.step(2, policy, predict, NOISE)  # still diverged: reset again, never frozen
    assert info["ref_updated"] and info["ref_reinit"] and same(weights(ref.model), initial)


def test_ignore_keeps_updating_without_the_monitor():
    policy = make_policy()
    ref = Reference(policy, tau=1, delta=0.0, on_diverge="ignore")
    for step in range(1, 4):
        nudge(policy, 0.5)
        info = ref.step(step, policy, predict, NOISE)
        assert info["divergence"] > 0 and not ref.frozen
        assert same(weights(ref.model), weights(policy))


def test_tau_zero_is_plain_diffusion_dpo():
    for tau in (0, None):
        policy = make_policy()
        initial = weights(policy)
        ref = Reference(policy, tau=tau)
        for step in range(1, 70):
            nudge(policy, 0.01)
            assert ref.step(step, policy, predict, NOISE) == {"ref_updated": False, "ref_frozen": False}
        assert same(weights(ref.model), initial)


def test_divergence_on_request_leaves_the_reference_alone():
    policy = make_policy()
    init_errors = err_fn(make_policy())
    ref = Reference(policy, tau=2, delta=1e9)
    nudge(policy, 0.05)
    expected = (err_fn(policy) - init_errors).mean().item()
    assert ref.divergence(policy, predict, NOISE)[0] == pytest.approx(expected, rel=1e-5)
    ref.step(2, policy, predict, NOISE)  # now the reference holds a copy of the policy, not p_init
    held = weights(ref.model)
    nudge(policy, 0.05)
    expected = (err_fn(policy) - init_errors).mean().item()
    assert ref.divergence(policy, predict, NOISE)[0] == pytest.approx(expected, rel=1e-5)
    assert same(weights(ref.model), held)


def test_reference_is_frozen_and_initial_weights_live_on_the_cpu():
    policy = make_policy()
    ref = Reference(policy)
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert ref.model.training  # the policy's mode: policy and reference run the same code path
    assert not Reference(make_policy().eval()).model.training
    assert all(t.device.type == "cpu" for t in ref.initial)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.initial, ref.model.parameters()))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.initial, policy.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_initial_weights_stay_off_the_accelerator():
    policy = make_policy().cuda()
    ref = Reference(policy)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in ref.initial)
    assert all(p.device.type == "cuda" for p in ref.model.parameters())


def test_state_dict_round_trip_resumes_the_monitor():
    policy = make_policy()
    ref = Reference(policy, tau=1, delta=0.05)
    nudge(policy, 0.5)
    ref.step(1, policy, predict, NOISE)
    state = ref.state_dict()
    resumed = Reference(make_policy(), tau=1, delta=0.05)
    resumed.load_state_dict(state)
    assert resumed.frozen and resumed.num_updates == 1
    assert same(weights(resumed.model), weights(ref.model))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="on_diverge"):
        Reference(make_policy(), on_diverge="explode")
    with pytest.raises(ValueError, match="tau"):
        Reference(make_policy(), tau=-1)


def test_reinit_ends_as_frozen_at_the_initial_model_once_the_policy_has_crossed():
    """Re-Init's consequence (reference.step's docstring): after the first crossing, every later check copies a
    policy that is still past δ, measures it, and resets again, so between checks the reference is p_init."""
    policy = make_policy()
    initial = weights(policy)
    ref = Reference(policy, tau=2, delta=0.05, on_diverge="reinit")
    infos = []
    for step in range(1, 13):
        nudge(policy, 0.1 if step <= 4 else 0.01)  # past δ by step 4, then training goes on slowly
        infos.append(ref.step(step, policy, predict, NOISE))
        if any(i.get("ref_reinit") for i in infos):  # from the first reset on, the reference is p_init
            assert same(weights(ref.model), initial), step
    checks = [i for i in infos if i["ref_updated"]]
    first = next(k for k, i in enumerate(checks) if i["ref_reinit"])
    assert first < len(checks) - 2 and all(i["ref_reinit"] and i["divergence"] > 0.05 for i in checks[first:])
    assert same(weights(ref.model), initial) and not ref.frozen and ref.holds_initial


def test_output_distance_sees_a_change_the_error_gap_does_not():
    """D is a difference of errors; a model that errs as much as p_init, elsewhere, has D = 0 but moved."""
    policy = make_policy()
    ref = Reference(policy, tau=1, delta=1e9)
    target = torch.zeros(6, 4)
    with torch.no_grad():
        policy[2].weight.neg_()  # predictions change sign: the same squared error against 0
        policy[2].bias.neg_()
    info = ref.step(1, policy, predict, target)
    flipped = make_policy()(X).detach()
    assert abs(info["divergence"]) < 1e-7
    assert info["ref_distance"] == pytest.approx((2 * flipped).pow(2).mean().item(), rel=1e-5)



def test_a_probe_computes_p_inits_predictions_once_with_the_same_divergences():
    """With fixed inputs (a Probe) p_init's predictions are computed at the first check and reused: later
    checks run only the new reference, and D is what recomputing them every time gives."""
    calls = []

    def forward(model, x, t, cond):
        calls.append(model)
        return model(x)

    def run(make_predict):
        policy = make_policy()
        ref = Reference(policy, tau=1, delta=1e9)
        out = []
        for step in range(1, 5):
            nudge(policy, 0.01 * step)
            out.append(ref.step(step, policy, *make_predict()))
        return ref, out

    probe = Probe(forward, X, torch.zeros(6), {}, NOISE, chunk=4)
    ref, cached = run(lambda: (probe, NOISE))
    assert len(calls) == 2 * 5  # p_init once and each of the 4 new references, in 2 chunks of ≤ 4 rows
    _, fresh = run(lambda: (lambda model: model(X), NOISE))
    assert [r["divergence"] for r in cached] == [r["divergence"] for r in fresh]
    assert all(r["divergence"] > 0 for r in cached)
    assert probe.initial is not None and torch.equal(probe.initial, make_policy()(X).detach())
    probe.load_state_dict(probe.state_dict())  # a resume may bring other inputs: p_init's are computed again
    assert probe.initial is None
