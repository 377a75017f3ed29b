"""Data-parallel fine-tuning on torch.distributed: DDP or FSDP2, launched with torchrun.

    torchrun --nproc-per-node 2 -m peftcore train recipe.toml --set train.strategy=ddp

`train()` (peftcore.training.loop) is the one loop for one process and for many: it calls `setup()`, which
does nothing in a plain `python` run and joins the process group under torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment), then `wrap_model(model, strategy)`. What the loop
does differently with more than one process:

- Data: each optimizer step takes the next `world_size x batch_size` rows of the epoch's seeded
  permutation per micro-batch; rank r gets the r-th contiguous part of them. Every row is seen once
  per epoch, and the rows of a step are exactly those one process with `batch_size x world_size`
  would take. A short last batch of an epoch is split as evenly as it goes; a rank left without rows
  runs a one-token batch with no trained target (it must still join the collectives; it adds 0).
- Loss: the sum over trained targets divided by the GLOBAL number of trained targets of the step
  (one all_reduce of the count before the backward), so 2 ranks x batch b update exactly like one
  process with batch 2b. DDP averages gradients over ranks, so under DDP each rank's loss is also
  multiplied by world_size (exact in binary floating point) to turn DDP's mean into the sum.
  Logged loss, token throughput and the evaluation loss / accuracy are all-reduced: global values.
- Clipping: after the reduction every rank holds the same, global gradient, so clip_grad_norm_ on
  it clips by the global norm and every rank takes the same skip / early-stop decisions.
- Rank 0 alone writes metrics.jsonl, checkpoints and the best adapter. Every rank resumes from the
  same checkpoint folder (multi-node: put output_dir on a shared file system).
- RNG: a fresh run seeds rank r with `seed + r` (rank 0 with `seed`, as a single process does), so
  dropout masks differ between ranks; a checkpoint stores every rank's RNG states (gathered to
  rank 0) and rank r restores its own. Resuming with another world size is an error: the global
  batch, the per-rank RNG streams and the data split would all change silently.

Strategies
----------
"ddp": DistributedDataParallel over the PeftModel. Frozen base parameters have requires_grad False,
so DDP's reducer never sees them: only the adapter's gradients are all-reduced (bucketed, overlapped
with the backward). find_unused_parameters=False (every trainable tensor of the active adapter takes
part in every forward) except for a multi-task model, whose task heads each sit out the other tasks'
batches (tested: equal to one process, per task), forward_sync_buffers=False (buffers are fixed:
RoPE tables, quantized weights —
broadcasting them every forward would resend a QLoRA base each step), init_sync=False: instead of
broadcasting the whole base from rank 0, we broadcast only the trainable tensors and check that the
frozen base is identical on every rank (a fingerprint all-gather: a rank that loaded another
checkpoint or seed fails loudly instead of training a different model).

"fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block (every module whose
class name ends in DecoderLayer / BertLayer / GPT2Block), then on the root. Mixed requires_grad inside
one block: torch 2.13's fully_shard accepts it (it reduce-scatters only parameters that received a
gradient, and demands one dtype only among the trainable ones), but then the adapter tensors become
sharded DTensors, and saving an adapter in PEFT's format, running a prompt encoder to write its
prompts, restoring a checkpoint or clipping all need collective gathers and a checkpoint format of
their own. We pass the trainable tensors (and everything else an adapter file holds: other adapters,
saved biases, a targeted embedding's base table, prompt encoders) as `ignored_params`: FSDP shards
the frozen base — 99%+ of the bytes in parameter-efficient fine-tuning — and the adapter stays a
plain tensor, replicated, whose gradients we all-reduce (summed, one flat buffer per dtype) once per
optimizer step, after the last micro-batch. Replicating the adapter costs its size x 4 (weights,
gradients, two AdamW moments) per rank — megabytes for LoRA — and buys one checkpoint format for
single process, ddp and fsdp, with the same code path for saving, clipping and resuming.

QLoRA under fsdp: the quantized base weights (int4 / NF4 / int8 QuantLinear) are buffers, not
parameters, and fully_shard shards parameters only: every rank holds the whole quantized base;
what is sharded is the rest (norms, embeddings, unquantized layers). We replicate on purpose:
sharding packed 4-bit weights would need them (and their per-group scales) turned into parameters,
split on quantization-group boundaries, and the fused dequant kernels fed all-gathered buffers each
forward; a 4-bit base is already 1/8 of its fp32 size (a 7B NF4 base is ~3.9 GB), so the extra
all-gather traffic buys little. For a dense base that does not fit one device use fsdp; for QLoRA
ddp and fsdp behave alike.

Failure: `setup()` gives the process group a timeout (PEFTCORE_DIST_TIMEOUT_S, default 600 s), so a
rank that dies makes the others fail in their next collective instead of waiting forever (gloo sees
the closed connection at once; NCCL's watchdog aborts after the timeout; torchrun also stops the
remaining workers when one exits with an error). `peer_failure` turns the survivors' collective
error (a gloo traceback that never says another process died) into one line that does.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from peftcore import adapter_keys
from peftcore.config import LoraConfig
from peftcore.multitask.model import MultiTaskModel

STRATEGIES = ("auto", "ddp", "fsdp")
BLOCK_SUFFIXES = ("DecoderLayer", "BertLayer", "GPT2Block")
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """The ranks disagree (different base weights, a checkpoint of another world size, ...)."""


# How a collective says the other end went away: torch's DistError types (NCCL, timeouts), and gloo's
# plain RuntimeError, which names gloo's source file and the closed or reset connection.
PEER_LOST = ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")


def peer_failure(error: BaseException) -> DistributedError | None:
    """For an error a collective raised on this rank because another rank died (killed, out of memory,
    its own exception): one line that says so. None for any other error, or outside a process group."""
    if world_size() == 1 or not (isinstance(error, dist.DistError) or any(m in str(error) for m in PEER_LOST)):
        return None
    where = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0]  # without gloo's "[pair.cc:537]"
    return DistributedError(f"rank {rank()}: a collective operation failed ({where[:200]}): another process of "
                            "this launch most likely died (killed, out of memory, or its own error): see its output "
                            "and the launcher's")


# -- the process group ------------------------------------------------------------------------------
def launched() -> bool:
    """True inside a multi-process torchrun launch (or any launcher that sets RANK and WORLD_SIZE > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group when launched by torchrun; a no-op (False) for a single process.

    Idempotent. On CUDA selects the GPU LOCAL_RANK first, so `torch.device("cuda")` means this
    rank's GPU: call it before loading the model. Backend: NCCL for CUDA tensors plus gloo for CPU
    ones when CUDA is available, gloo alone otherwise.
    """
    if is_initialized():
        return True
    if not launched():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("PEFTCORE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def comm_device() -> torch.device:
    """Where small metric tensors go for a collective: CPU unless the group is NCCL only."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of each value over the ranks (float64); the values themselves in a single process."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` on every rank (e.g. a run folder named after rank 0's clock)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- wrapping -----------------------------------------------------------------------------------------
@dataclass
class Parallel:
    """How the loop runs a model: `module` for training forwards, `model` for parameters and files."""

    model: nn.Module
    module: nn.Module
    strategy: str = "single"  # "single" | "ddp" | "fsdp"
    world_size: int = 1
    rank: int = 0
    trainable: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """DDP divides the summed gradients by world_size: multiply the loss back (a power of 2 is exact)."""
        return float(self.world_size) if self.strategy == "ddp" else 1.0

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward + backward: DDP skips its all-reduce until the last."""
        if self.strategy == "ddp" and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def finish_grads(self) -> None:
        """After the step's last backward: sum the replicated adapter gradients (fsdp; DDP did its own)."""
        if self.strategy == "fsdp" and self.world_size > 1:
            sum_gradients(self.trainable)

    def settle(self) -> None:
        """Before rank 0 alone reads the model (state_dict for a save): under fsdp, reshard every unit on
        every rank. FSDP2's state_dict hook reshards a unit that is still gathered (the root stays
        gathered after a no_grad forward), which on rank 0 alone would leave the ranks out of step:
        rank 0 would all-gather that unit in the next forward and the others would not."""
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values) if self.world_size > 1 else list(values)


def single(model: nn.Module) -> Parallel:
    return Parallel(model, model, trainable=[p for p in model.parameters() if p.requires_grad])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith(BLOCK_SUFFIXES)]


def wrap_model(model: nn.Module, strategy: str = "auto") -> Parallel:
    """Make `model` (a PeftModel, already on this rank's device) data-parallel over the process group.

    A single process gets the model back unwrapped, whatever the strategy. "auto" means "ddp".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose from {', '.join(STRATEGIES)}")
    if world_size() == 1:
        return single(model)
    strategy = "ddp" if strategy == "auto" else strategy
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: did get_peft_model run?")
    device = trainable[0].device
    from torch.distributed.fsdp import FSDPModule

    already_sharded = isinstance(model, FSDPModule)
    if strategy == "ddp" and already_sharded:
        raise ValueError("this model was sharded with strategy fsdp by an earlier train(); use strategy fsdp again")
    if not already_sharded:
        check_same_base(model)
    broadcast_tensors(trainable)
    parallel = Parallel(model, model, strategy, world_size(), rank(), trainable)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        parallel.module = DistributedDataParallel(
            # a multi-task batch trains one task's head: the other heads get no gradient that step
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            init_sync=False, find_unused_parameters=isinstance(model, MultiTaskModel), gradient_as_bucket_view=True)
    elif not already_sharded:
        shard_base(model, device)
    return parallel


def shard_base(model: nn.Module, device: torch.device) -> None:
    """FSDP2 per transformer block, then the root; adapter tensors stay replicated (module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    ignored = replicated_params(model)
    blocks = transformer_blocks(model)
    if not blocks:
        warnings.warn(f"fsdp: no module of {type(model).__name__} has a class name ending in "
                      f"{', '.join(BLOCK_SUFFIXES)}; the whole model is one FSDP unit (all-gathered at once)")
    # Our blocks return (hidden, k, v); k and v are views kept for the KV cache and never modified in
    # place, which is the case FSDP2's "returned a view tensor" warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter an adapter file or the optimizer touches: trainable tensors, every adapter's
    own tensors, saved biases and embedding tables, modules_to_save copies, prompt encoders."""
    named = dict(model.named_parameters())
    keep = {n for n, p in named.items() if p.requires_grad}
    keep |= {n for n in named if n.startswith("prompt_encoder.")}
    configs = getattr(model, "peft_config", {})
    if any(isinstance(c, LoraConfig) for c in configs.values()):
        keep |= set(adapter_keys.adapter_keys(named, model))
    for name, config in configs.items():
        if isinstance(config, LoraConfig):
            keep |= set(adapter_keys.bias_keys(named, model, config.bias))
            keep |= set(adapter_keys.embedding_keys(named, model, config))
            keep |= set(adapter_keys.modules_to_save_keys(model, name).values())
    return {named[n] for n in keep if n in named}


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank src's values everywhere (the adapter's random init, whatever each rank drew)."""
    for t in tensors:
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def check_same_base(model: nn.Module) -> None:
    """Every rank must hold the same frozen weights (init_sync=False skips DDP's full broadcast).

    Compares a float64 (sum, sum of squares) over every frozen parameter and buffer, in chunks so a
    large (or quantized uint8) tensor is never copied whole."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        for chunk in t.detach().reshape(-1).split(1 << 24):
            x = chunk.double()
            total += torch.stack([x.sum(), (x * x).sum()]).to(device)
    prints = all_gather_object(tuple(total.tolist()))
    for r, other in enumerate(prints):
        if any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(prints[0], other)):
            raise DistributedError(
                f"the frozen base weights differ between rank 0 and rank {r}: every rank must load the same "
                "checkpoint (and, for a randomly initialised base, use the same seed) before training")


@torch.no_grad()
def sum_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of replicated parameters, one flat buffer per dtype.

    A parameter no rank produced a gradient for keeps `grad=None` (the optimizer then skips it, as in
    a single process); one that some rank did not reach counts as a zero gradient there."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        present = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(group, grads):
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        for p, g, count in zip(group, grads, flat[offset:].tolist()):
            p.grad = g if count > 0 else None
