"""Where and how a run computes: device, precision, torchrun processes, torch.compile, random streams, signals,
the optimizer. The script calls these; none of them decides whether a step happens or ends the process."""
import atexit
import importlib.util
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mechanics import errors, folder
from mechanics.errors import UsageError

logger = logging.getLogger("train")

@dataclass
class Run:
    """Where this process trains: its device, its rank among the torchrun processes, the autocast dtype."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None
    family: str = ""
    signals: "StopSignal | None" = None
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen models (encoders, VAE, reference): the training dtype on an accelerator."""
        return self.autocast_dtype or torch.float32

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; with bf16 or fp32 the scaler is disabled and every call passes through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (builds what is cached), then the others (find it cached)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def stop_requested(self) -> int:
        """The signal number that asked the run to stop, 0 if none (every rank agrees: one all-reduce)."""
        return self.signals.agreed(self) if self.signals is not None else 0

    def first_of_ranks(self, value):
        """The first rank's non-None value (a picklable one), on every rank; None when every rank has None."""
        if self.world_size == 1:
            return value
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return next((g for g in gathered if g is not None), None)

    def together(self, fn):
        """fn() on every rank, leaving together: a RunError on any rank is raised on every rank (the first failing
        rank's, same class and line), so no rank waits at a collective for one that left. One all-gather."""
        failure, result = None, None
        try:
            result = fn()
        except errors.RunError as error:
            failure = error
        first = self.first_of_ranks(None if failure is None else (type(failure).__name__, str(failure)))
        if first is not None:
            raise getattr(errors, first[0], errors.RunError)(first[1]) from None
        return result

    def mean_over_ranks(self, value) -> float:
        """The mean of a number over every rank (one all-reduce)."""
        value = torch.as_tensor(value, device=self.device).detach().float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    def all_finite(self, *values) -> bool:
        """Whether every value is finite on every rank (one all-reduce)."""
        bad = torch.stack([~torch.isfinite(torch.as_tensor(v, device=self.device).float()) for v in values]).any()
        bad = bad.float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(bad)
        return bad.item() == 0


def _leave_process_group() -> None:
    """At exit, every rank waits for the others before tearing the group down: a rank that destroyed its gloo
    group while another still held a connection to it was seen to abort (SIGABRT) instead of returning its exit
    code. A rank that left early (a failure on it alone) is waited for at most 30 s."""
    import datetime
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    except Exception:  # noqa: BLE001 - a peer already gone: nothing to wait for
        pass
    dist.destroy_process_group()


def _setup_devices(args) -> Run:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but this torch sees no CUDA device: use --device cpu (or mps)")
    if args.device.startswith("mps") and not torch.backends.mps.is_available():
        raise UsageError(f"--device {args.device} but this torch has no MPS device (Apple silicon with a macOS "
                         "build of torch): use --device cpu")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device} is not a device torch knows: use cuda, mps or cpu") from None
    if world_size > 1:
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        atexit.register(_leave_process_group)
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.benchmark = True  # every micro-batch has the same shapes: pick the fastest kernels once
    precision = args.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Run(device, rank, world_size, local_rank, autocast_dtype)


def device_line(run: Run) -> str:
    """`device cuda:0 (NVIDIA H200), precision bf16, 8 processes (DDP)`: the first line of every run."""
    name = f" ({torch.cuda.get_device_name(run.device)})" if run.device.type == "cuda" else ""
    if run.device.type == "cpu":
        name = f" ({torch.get_num_threads()} threads)"
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[run.autocast_dtype]
    engine = "FSDP2" if run.fsdp else "DDP" if run.world_size > 1 else "one process"
    processes = f"{run.world_size} processes ({engine})" if run.world_size > 1 else engine
    return f"device {run.device}{name}, precision {precision}, {processes}"


# A lower bound of a real run's time on a CPU: one SD1.5 pair at 512 px (the 860M-parameter UNet alone: policy
# forward and backward with gradient checkpointing, reference forward, fp32) took 72 s on the 2-core development
# CPU (2026-12-04). The optimizer, VAE and text encoders add to it, and SDXL, SD3 and FLUX are larger.
CPU_SECONDS_PER_PAIR = 70.0


def cpu_warning(args, family: str) -> str:
    """One line for a real recipe started on a CPU: how long it would take at least, and what to do instead."""
    pairs = args.max_steps * args.effective_batch_size
    days = pairs * CPU_SECONDS_PER_PAIR * (args.resolution / 512) ** 2 / 86400
    return (f"{family} at {args.resolution} px on a CPU: {args.max_steps} steps × {args.effective_batch_size} pairs "
            f"would take at least {days:,.0f} days (~{CPU_SECONDS_PER_PAIR:.0f} s per SD1.5 pair at 512 px on a "
            "2-core CPU); run it on a GPU, or try the offline demo with --tiny")


def _prepare(args, run: Run) -> None:
    folder.prepare_output(args, run.is_main)
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(args.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"--report_to {args.report_to} needs the {package} package: pip install {package}")


def start(args, family: str) -> Run:
    """Everything before the models load, for resolved `args`: logging, the device, precision and torchrun
    processes, the output folder (folder.prepare_output), signals, and run.json. Returns the Run."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    run = _setup_devices(args)
    run.family, run.fsdp = family, args.fsdp
    if run.device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if run.is_main:  # the run's first line: where and how it computes
        logger.info(device_line(run))
        if run.device.type == "cpu" and not args.tiny:
            logger.warning(cpu_warning(args, family))
    run.together(lambda: _prepare(args, run))  # a refusal on rank 0 (a folder in use) ends every rank alike
    run.signals = StopSignal()
    if run.is_main:  # the values the run uses, for plot.py and for people
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({"family": family, **vars(args)}, f, indent=1)
        logger.info("%s %s: effective batch %d pairs (%d × %d devices × %d accumulation), lr %.3g, β %s, "
                    "τ %d, δ %g, γ %g, λ(t) %s", family, args.method, args.effective_batch_size, args.train_batch_size,
                    run.world_size, args.gradient_accumulation_steps, args.learning_rate, args.beta, args.tau,
                    args.delta, args.gamma, "off" if args.no_reward_scale else "on")
    return run


def quiet_libraries() -> None:
    """The first screen of a run shows the run: no loading bars of every component, no transformers notice
    that torchvision is missing (it falls back to PIL, which is what the trainers use)."""
    import datasets
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage())


def ddp(module: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel when torchrun started several processes, else (or under --fsdp, which syncs
    the gradients itself) the module itself."""
    if run.world_size == 1 or run.fsdp:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


# The blocks FSDP shards one by one (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel).
BLOCKS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def shard(module: nn.Module, run: Run) -> nn.Module:
    """--fsdp: FSDP2 (`fully_shard`) on each block, then on the whole model: every process keeps 1/N of the
    parameters, gradients and optimizer state, and gathers a block's weights only while it runs. bf16 compute
    with fp32 master weights and fp32 gradient reduction under bf16 autocast. Parameters are resharded after
    every forward, the root's too: the reference runs without backward, and its τ copy writes the shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=run.autocast_dtype, reduce_dtype=torch.float32)
    for name in BLOCKS:
        blocks = getattr(module, name, None)
        for block in ([blocks] if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList)
                      else blocks or []):
            fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    return fully_shard(module, mp_policy=policy, reshard_after_forward=True)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, its total norm as a plain tensor (under FSDP a DTensor of partial norms)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def maybe_compile(module: nn.Module, enabled: bool):
    """torch.compile with fixed shapes (dynamic=False): a rare odd-sized batch (skipped pairs) recompiles
    once, instead of turning every later step into a dynamic-shape graph."""
    return torch.compile(module, dynamic=False) if enabled else module


def micro_generators(seed: int, step: int, micro: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Timesteps (CPU) and noise / VAE sampling (device) of one micro-batch come from generators seeded
    by its position (step, global micro-batch index), so a resumed run — or the same pairs split over
    more processes — draws exactly the same numbers, with no RNG state to checkpoint."""
    position = (seed * 1_000_003 + step) * 65_537 + micro
    cpu = torch.Generator().manual_seed(position)
    on_device = torch.Generator(device).manual_seed(position + 1)
    return cpu, on_device


def optimizer(args, params):
    """The optimizer of --optimizer and the recipe's schedule: linear warm-up over --warmup_steps, then a
    constant learning rate (PAPER.md §5)."""
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
        opt = bnb.optim.AdamW8bit(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon)
    elif args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        opt = Adafactor(params, lr=args.learning_rate, relative_step=False, scale_parameter=False,
                        warmup_init=False, weight_decay=args.weight_decay)
    else:
        # The fused kernel (one launch for all tensors) exists for CUDA and, since torch 2.4, for CPU, where it
        # is ~5x faster than the default per-tensor loop on a UNet's many small tensors.
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.weight_decay, eps=args.adam_epsilon, fused=fused or None)
    warmup = max(args.warmup_steps, 1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


class StopSignal:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step (or, while the loader finds
    no decodable pair, at once). The handler then gives the signal back its default action: a second one ends
    the process at once, by that signal, without a checkpoint or a traceback."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)
        tqdm.write(f"signal {signum}: stopping after this step with a checkpoint (again to exit at once)",
                   file=sys.stderr)

    def agreed(self, run: Run) -> int:
        flag = torch.tensor([float(self.signum)], device=run.device)
        if run.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item())
        return int(flag.item())


def default_device() -> str:
    """The device of a run that names none: CUDA when there is a GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


SAMPLING_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                   "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# The families released and sampled in bfloat16: FLUX.1's activations can overflow float16's range, which gives
# black or NaN images with some weights. [choice: float16 for them is refused, not warned of; a warning scrolls
# past during hours of sampling, and the broken images would still be scored as if real]
BF16_FAMILIES = ("flux",)


def sampling_dtype(name: str | torch.dtype | None, device, family: str | None = None) -> torch.dtype:
    """The dtype a pipeline of `family` samples in: a torch dtype as is, a name of SAMPLING_DTYPES, or (None, "auto")
    float32 on the CPU, where half precision is slower, and on an accelerator bfloat16 for BF16_FAMILIES (FLUX) and
    float16 for the others, as the public evaluation scripts. float16 for a BF16_FAMILIES model is a UsageError that
    names bfloat16; family None (the name alone checked) refuses only unknown names."""
    if name in (None, "auto"):
        if torch.device(device).type == "cpu":
            return torch.float32
        return torch.bfloat16 if family in BF16_FAMILIES else torch.float16
    if not isinstance(name, torch.dtype) and name not in SAMPLING_DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    dtype = name if isinstance(name, torch.dtype) else SAMPLING_DTYPES[name]
    if dtype == torch.float16 and family in BF16_FAMILIES:
        raise UsageError(f"--dtype float16 for a {family} model: it is a bfloat16 model, and float16 overflows in "
                         "it (black or NaN images with some weights); use --dtype bfloat16 (what auto takes on a "
                         "GPU) or float32")
    return dtype
