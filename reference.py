"""The reference model with the paper's stable update (PAPER.md §2). Torch only.

Plain Diffusion-DPO keeps the reference frozen at the pretrained model p_init. The paper instead makes
the reference a hard copy of the policy every τ optimizer steps ("exploration"), and monitors the
divergence of each new reference from p_init: once it exceeds δ, the reference is frozen (or, in the
"Re-Init" variant, reset to p_init). Without the monitor, small τ lets the policy widen the margin by
inflating both errors ("error scaling") and training collapses; `on_diverge="ignore"` reproduces that.

The monitor measures on inputs the caller fixes (the "probe", `Probe` below): a few winner images of the data,
each noised at one t with one ε, drawn once, so that p_init, every new reference and the policy are compared on
exactly the same noised images. p_init never changes, so its predictions on a probe are computed once.

Memory: the initial weights stay in (pinned) CPU memory. They visit the accelerator only when the monitor
needs p_init's predictions (once per probe), loaded into the reference model's own parameters, which are
about to be overwritten by the policy anyway; so the method costs no accelerator memory beyond
Diffusion-DPO's reference.
"""
import copy
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from losses import per_sample_error

ON_DIVERGE = ("freeze", "reinit", "ignore")

# The monitor's probe [choice: fixed winners of the data, drawn once; one micro-batch's winner moves D by ±25 %
# between checks, a fixed probe of 64 by ±4 % (README, "The monitor's estimate of D")]: its pairs come in an
# order of their own (the data seeded seed + PROBE_SEED, without caption dropout) and its t and ε from the
# generator stream MONITOR_STREAM, apart from every micro-batch's (the train scripts' `micro_generators`).
PROBE_SEED = 7919
MONITOR_STREAM = 1 << 20

# --method: which of the paper's two ideas a run uses, the rows of its ablation (PAPER.md §6). A preset sets
# §2's τ and §3's γ and λ(t) together over the script's recipe; an explicit --tau, --gamma or
# --(no_)reward_scale still wins.
METHODS = {
    "plain": dict(tau=0, gamma=1.0, no_reward_scale=True),  # Diffusion-DPO (Wallace et al. 2023)
    "exploration": dict(gamma=1.0, no_reward_scale=True),   # §2 only: the recipe's τ/δ reference update
    "timestep": dict(tau=0),                                # §3 only: γ over-sampling and λ(t)
    "ours": dict(),                                         # §2 + §3, the paper's full method
}

PredictFn = Callable[[nn.Module], torch.Tensor]


class Probe:
    """The monitor's inputs (§2): noised winner latents `noisy`, their timesteps `t` and conditioning `cond`
    (a dict of tensors), and the targets the model should predict. Called with a model it returns its
    predictions, `predict(model, noisy, t, cond)` of the train script, without autograd, in chunks of `chunk`
    images under `autocast`. A checkpoint keeps the inputs, so a resumed run measures on the very same ones.

    `initial` holds p_init's predictions once a Reference has computed them: the inputs are fixed and p_init
    never changes, so every later check needs only the new reference's forwards."""

    def __init__(self, predict, noisy, t, cond: dict, target, chunk: int, autocast=nullcontext):
        self.predict, self.chunk, self.autocast = predict, max(1, chunk), autocast
        self.noisy, self.t, self.cond, self.target = noisy, t, cond, target
        self.initial: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> torch.Tensor:
        out = []
        for i in range(0, len(self.noisy), self.chunk):
            part = slice(i, i + self.chunk)
            with self.autocast():
                out.append(self.predict(model, self.noisy[part], self.t[part], {k: v[part] for k, v in self.cond.items()}))
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"noisy": self.noisy, "t": self.t, "cond": self.cond, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        device = self.noisy.device
        self.noisy, self.t, self.target = (state[k].to(device) for k in ("noisy", "t", "target"))
        self.cond = {k: v.to(device) for k, v in state["cond"].items()}
        self.initial = None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weights a copy moves: parameters and buffers, each as this process's shard under FSDP (a DTensor's
    local tensor shares its storage), so that the τ copy and p_init's restore are local, shard to shard."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]


@torch.no_grad()
def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s, non_blocking=True)


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    # Each rank measures on its own batch; every rank must take the same freeze decision.
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class Reference:
    """The reference model p_ref of Diffusion-DPO, updated by the τ/δ rule of §2. The copy runs in the policy's
    mode (train or eval: diffusers' blocks take different code paths), so that policy and reference compute the
    same function and the loss is exactly log 2 at the first step.

    policy:     the model being trained (unwrapped: no DDP or compile wrapper); its current weights
                become both the reference and p_init, so build this before any optimizer step.
    tau:        copy the policy into the reference every `tau` optimizer steps; 0 or None = plain
                Diffusion-DPO (the reference stays p_init forever).
    delta:      divergence threshold δ of the monitor (0.005 for SD1.5, 0.002 for SDXL in the paper).
    on_diverge: what happens once D(p_ref, p_init) > δ: "freeze" (the paper's rule; the reference stays
                at that last copy for the rest of training), "reinit" (the Re-Init ablation, Table 3:
                reset to p_init; the monitor keeps checking later copies), or "ignore" (update every τ
                without the monitor, the failure mode the paper warns about).
    dtype:      dtype of the reference copy (the training dtype, e.g. bf16: it is only ever run); p_init is
                kept in that dtype too, in pinned CPU memory.
    model:      the reference module to use instead of a deep copy of the policy; it must start equal to the
                policy, and its parameters and buffers must match the policy's one to one. LoRA (mechanics/lora.py)
                passes views of one shared base model through two adapters, so that only the adapter
                weights are copied, and p_init is the initial adapter (B = 0: the base model itself). Under
                FSDP the trainers pass a copy of the policy sharded as the policy is: every tensor is then this
                process's shard, and p_init's shards wait in each process's CPU memory.
    """

    def __init__(self, policy: nn.Module, tau: int | None = 32, delta: float = 0.005,
                 on_diverge: str = "freeze", dtype: torch.dtype | None = None, model: nn.Module | None = None):
        if on_diverge not in ON_DIVERGE:
            raise ValueError(f"on_diverge must be one of {ON_DIVERGE}, got {on_diverge!r}")
        if tau is not None and tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.tau = tau or 0
        self.delta = delta
        self.on_diverge = on_diverge
        if model is None:
            model = copy.deepcopy(policy)
            if dtype is not None:
                model.to(dtype=dtype)  # the training dtype: the reference is only ever run, never trained
        self.model = model.requires_grad_(False)
        # The tensors every update copies, listed once: updates copy in place and allocate nothing.
        self._tensors = _tensors(self.model)
        self._policy, self._policy_tensors = None, []
        pin = torch.cuda.is_available()
        self.initial = [t.detach().to("cpu", copy=True) for t in self._tensors]
        if pin:
            self.initial = [t.pin_memory() for t in self.initial]
        self._parked: list[torch.Tensor] | None = None  # CPU room for the reference while p_init borrows it
        self.frozen = False
        self.holds_initial = True  # the reference currently equals p_init
        self.num_updates = 0
        self.last_divergence: float | None = None

    def _tensors_of(self, policy: nn.Module) -> list[torch.Tensor]:
        if policy is not self._policy:
            self._policy, self._policy_tensors = policy, _tensors(policy)
        return self._policy_tensors

    @torch.no_grad()
    def _initial_predictions(self, predict: PredictFn, keep_reference: bool) -> torch.Tensor:
        """p_init's predictions: kept on a Probe after the first time; else p_init is loaded into the reference's
        parameters (which, unless `keep_reference` is false, are parked in CPU memory and put back after)."""
        if isinstance(predict, Probe) and predict.initial is not None:
            return predict.initial
        if self.holds_initial:
            pred = predict(self.model)
        elif not keep_reference:
            _copy_into(self._tensors, self.initial)
            self.holds_initial = True
            pred = predict(self.model)
        else:
            if self._parked is None:
                self._parked = [torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                                for t in self._tensors]
            # Stream order keeps these asynchronous copies safe: nothing reads the parked weights on the host.
            _copy_into(self._parked, self._tensors)
            _copy_into(self._tensors, self.initial)
            pred = predict(self.model)
            _copy_into(self._tensors, self._parked)
        if isinstance(predict, Probe):
            predict.initial = pred
        return pred

    @staticmethod
    def _gap(pred, pred_init, target) -> tuple[float, float]:
        """D = mean(e(pred) − e(pred_init)) (§2: the reverse-KL estimate, per-element mean, no factor T), and
        the output distance mean_CHW (pred − pred_init)², both averaged over the probe and all ranks. D is a
        difference of errors and can be ≈ 0 while the model has moved; the distance cannot."""
        gap = (per_sample_error(pred, target) - per_sample_error(pred_init, target)).mean()
        distance = per_sample_error(pred, pred_init).mean()
        return tuple(_mean_over_ranks(torch.stack([gap, distance])).tolist())

    @torch.no_grad()
    def step(self, step: int, policy: nn.Module, predict: PredictFn, target: torch.Tensor) -> dict:
        """Apply the §2 rule after optimizer step `step` (1-based). Returns what happened, for the log.

        predict(model) -> Tensor[n, ...]: the model's predictions on the probe, a few winner images noised
        at fixed t with fixed ε, the same inputs on every call (a Probe); target: their ε (or velocity). On an
        update step:
            1. p_init's predictions (computed once per Probe);
            2. copy the policy into the reference (p_ref ← p_θ) and predict;
            3. D(p_ref, p_init) = mean(e_ref − e_init), and the output distance E‖ε_ref − ε_init‖²;
            4. if D > δ: freeze the reference, or reset it to p_init ("reinit"), or go on ("ignore").
        Re-Init resets to p_init, and the next check copies the policy again and measures it against p_init:
        once the policy has diverged past δ it usually stays there, so every later check resets again and
        the run ends as Diffusion-DPO against p_init (Table 3's weaker variant).
        """
        if not self.tau or self.frozen or step % self.tau != 0:
            return {"ref_updated": False, "ref_frozen": self.frozen}
        pred_init = self._initial_predictions(predict, keep_reference=False)
        _copy_into(self._tensors, self._tensors_of(policy))
        self.holds_initial = False
        divergence, distance = self._gap(predict(self.model), pred_init, target)
        self.last_divergence = divergence
        self.num_updates += 1
        reinit = False
        if divergence > self.delta and self.on_diverge == "freeze":
            self.frozen = True
        elif divergence > self.delta and self.on_diverge == "reinit":
            _copy_into(self._tensors, self.initial)
            self.holds_initial = True
            reinit = True
        return {"ref_updated": True, "ref_frozen": self.frozen, "ref_reinit": reinit,
                "divergence": divergence, "ref_distance": distance}

    @torch.no_grad()
    def divergence(self, model: nn.Module, predict: PredictFn, target: torch.Tensor) -> tuple[float, float]:
        """(D(model, p_init), output distance) on request, without changing the reference (e.g. to log
        Fig. 1b for a Diffusion-DPO run, where the reference is p_init and this costs two small forwards).

        If the reference has moved away from p_init, its weights are parked in CPU memory while p_init
        borrows its parameters, then put back: still no extra accelerator memory.
        """
        was_training = model.training
        model.eval()
        pred = predict(model)
        model.train(was_training)
        return self._gap(pred, self._initial_predictions(predict, keep_reference=True), target)

    def state_dict(self) -> dict:
        """Everything needed to resume: the reference weights and the monitor's state (p_init is the
        pretrained model, which a resumed run loads again)."""
        return {"model": self.model.state_dict(), "frozen": self.frozen,
                "holds_initial": self.holds_initial, "num_updates": self.num_updates,
                "last_divergence": self.last_divergence}

    def load_state_dict(self, state: dict) -> None:
        if "model" in state:  # sharded checkpoints (FSDP) restore the weights themselves
            self.model.load_state_dict(state["model"])
        self.frozen = state["frozen"]
        self.holds_initial = state["holds_initial"]
        self.num_updates = state["num_updates"]
        self.last_divergence = state["last_divergence"]
