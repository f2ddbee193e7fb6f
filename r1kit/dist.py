"""Scale-out on torchrun: process group, rank facts, reductions, DDP / FSDP2 wrapping, sharded state.

    torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \\
        -m r1kit STAGE --config recipe.toml

Plain `r1kit STAGE` (no torchrun variables) is a world of one: every helper here is then a no-op
that returns its input, so the stages call them unconditionally and one code path serves both.

Why the pieces are as they are:
- The backend follows the device (NCCL on CUDA, gloo on CPU) and every collective carries the
  configured timeout: a peer that never arrives or dies mid-step ends this rank with one line
  (`DistError`) within it, never a silent hang.
- Data parallelism keeps the single-process maths: each rank takes a contiguous share of the step's
  batch, and a token-mean loss is scaled by `loss_scale(n_local)` = n_local · world / n_global, so
  after the gradient average (DDP's all-reduce, FSDP2's reduce-scatter) the update is exactly the
  one the full batch gives on one process.
- FSDP2 (`fully_shard`) wraps each transformer block, then the root (embedding, head, final norm),
  for both families: MoE experts live inside their block, DeepSeek's MTP blocks are blocks too.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from r1kit.common import is_distributed, is_main_process, print0

PARALLEL = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600.0


class DistError(RuntimeError):
    """A distributed run cannot go on (peer missing or dead, bad launch); the message is one line."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or tdist.is_initialized()


def world() -> World:
    """This process's place in the job (a world of one outside torchrun)."""
    if tdist.is_available() and tdist.is_initialized():
        return World(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[World, torch.device]:
    """Join torchrun's process group (idempotent) → (World, the device this rank computes on).

    CUDA: NCCL, and rank LOCAL_RANK takes GPU LOCAL_RANK. Elsewhere gloo. Outside torchrun: (World(), device).
    """
    if not is_distributed():
        return World(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise DistError(f"LOCAL_RANK {local_rank} but only {n} GPU(s) are visible on {_host()}: "
                            f"use --nproc-per-node {n} or fewer, or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif device.type not in ("cpu",):
        raise DistError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                     device_id=device if device.type == "cuda" else None)
        except Exception as e:  # noqa: BLE001 — rendezvous failures come as several types
            raise DistError(f"rank {os.environ.get('RANK')}: could not join the process group "
                            f"({backend}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')}) within {timeout_s:.0f}s: {_first_line(e)}; "
                            "check that every node was launched with the same --nnodes and rendezvous "
                            "endpoint and can reach it") from None
    _check_same_backend(device)
    return world(), device


def shutdown() -> None:
    """Leave the process group at the end of a run (no-op outside torchrun)."""
    if tdist.is_initialized():
        barrier("finishing the run")
        tdist.destroy_process_group()


def leave_after_peer_loss(code: int) -> int:
    """End this rank at once with `code` after a peer was lost; returns `code` when no group is up.

    Why not a normal return: a gloo group whose peer died aborts the interpreter's exit (its
    transport threads are torn down still joinable: "terminate called without an active
    exception", SIGABRT), which would replace the one-line error and its status with a C++ abort;
    and destroying the group first can block on the dead peer. Everything r1kit writes is already
    closed (checkpoints, metrics lines), so only the standard streams need flushing."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _check_same_backend(device: torch.device) -> None:
    """All ranks on the same kind of device: a mix (one node without GPUs) would deadlock in NCCL."""
    kinds = [None] * tdist.get_world_size()
    guarded(lambda: tdist.all_gather_object(kinds, (device.type, _host())), "checking the ranks' devices")
    if len({k for k, _ in kinds}) > 1:
        where = ", ".join(f"rank {r} {k} on {h}" for r, (k, h) in enumerate(kinds))
        raise DistError(f"ranks disagree on the device ({where}); set the stage's device explicitly on every node")


def _host() -> str:
    import socket
    return socket.gethostname()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def guarded(fn, what: str):
    """Run a collective; a dead or missing peer becomes one DistError line naming what was waited for."""
    try:
        return fn()
    except DistError:
        raise
    except (RuntimeError, tdist.DistError) as e:
        raise peer_lost(e, what) from None


def peer_lost(e: BaseException, what: str) -> DistError:
    r = world().rank
    return DistError(f"rank {r}: lost a peer while {what} ({_first_line(e)}); another rank died or its host "
                     "is unreachable — see the first failing rank's log; the last checkpoint resumes the run")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception escaping a training step is the process group failing (not a bug)."""
    if isinstance(e, tdist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and tdist.is_initialized() and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out",
                            "NCCL", "Gloo", "gloo"))


# ---------------------------------------------------------------------------------------------
# Reductions (world of one: identity)
# ---------------------------------------------------------------------------------------------
def _reduce(values: list[float], op, what: str) -> list[float]:
    if not tdist.is_initialized() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    guarded(lambda: tdist.all_reduce(t, op=op), what)
    return t.tolist()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(metrics: dict[str, float], what: str = "summing metrics") -> dict[str, float]:
    """{name: float} summed over ranks (same keys, same order on every rank)."""
    return dict(zip(metrics, _reduce([float(v) for v in metrics.values()], tdist.ReduceOp.SUM, what)))


def all_reduce_mean(metrics: dict[str, float], what: str = "averaging metrics") -> dict[str, float]:
    n = world().world_size
    return {k: v / n for k, v in all_reduce_sum(metrics, what).items()}


def all_reduce_max(metrics: dict[str, float], what: str = "reducing metrics") -> dict[str, float]:
    return dict(zip(metrics, _reduce([float(v) for v in metrics.values()], tdist.ReduceOp.MAX, what)))


def global_sum(x: float, what: str = "summing token counts") -> float:
    return _reduce([float(x)], tdist.ReduceOp.SUM, what)[0]


def loss_scale(n_local: float, what: str = "summing token counts") -> float:
    """n_local · world / n_global: turns this rank's token-mean loss into its share of the global
    token mean, so the gradient average over ranks equals the full batch's gradient (1.0 alone)."""
    n_global = global_sum(n_local, what)
    return n_local * world().world_size / n_global if n_global else 0.0


def all_gather(obj, what: str = "gathering results") -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] alone."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    guarded(lambda: tdist.all_gather_object(out, obj), what)
    return out


def broadcast(obj, what: str = "agreeing on a value"):
    """Rank 0's `obj` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    guarded(lambda: tdist.broadcast_object_list(box, src=0), what)
    return box[0]


def barrier(what: str = "waiting for the other ranks") -> None:
    if tdist.is_initialized():
        guarded(tdist.barrier, what)


def all_reduce_(t: torch.Tensor, what: str = "summing a tensor") -> torch.Tensor:
    """In-place sum over ranks (e.g. MoE expert loads, so every rank moves its router bias alike)."""
    if tdist.is_initialized():
        guarded(lambda: tdist.all_reduce(t), what)
    return t


def shard(items: list, what: str = "batch") -> list:
    """This rank's contiguous share of `items`, whose length must divide evenly over the ranks."""
    w = world()
    if len(items) % w.world_size:
        raise DistError(f"the {what} of {len(items)} does not split over {w.world_size} processes; "
                        f"make it a multiple of {w.world_size}")
    n = len(items) // w.world_size
    return items[w.rank * n: (w.rank + 1) * n]


def shard_range(total: int) -> range:
    """Indices of this rank's share of 0..total-1 (uneven totals allowed: the first ranks take one more)."""
    w = world()
    base, extra = divmod(total, w.world_size)
    start = w.rank * base + min(w.rank, extra)
    return range(start, start + base + (w.rank < extra))


# ---------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, parallel: str = "ddp", param_dtype: torch.dtype = torch.float32):
    """DDP or FSDP2 around `model`; the model itself in a world of one.

    FSDP2: each block of `model.layers` (dense, MoE and MTP blocks alike) is its own unit, then the
    root; `param_dtype` bf16 computes in bf16 while the sharded master weights and the gradient
    reduction stay fp32. DDP: gradients are all-reduced in fp32 (the stage's autocast does bf16).
    """
    if parallel not in PARALLEL:
        raise DistError(f"parallel = {parallel!r}; choose one of {list(PARALLEL)}")
    if not tdist.is_initialized():
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(model.parameters()).device
        # broadcast_buffers off: MoE gates count their loads per rank (all-reduced before the bias
        # update); rank 0's counts must not overwrite the others' at every forward.
        # find_unused_parameters: a routed expert no token picked on this rank has no gradient.
        moe = any(type(m).__name__ == "MoE" for m in model.modules())
        with warnings.catch_warnings():  # broadcast_buffers=False is the rank-local-buffer setting we mean
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                       broadcast_buffers=False, find_unused_parameters=moe)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def generating(model):
    """→ the module to decode with: DDP's inner model; FSDP2's with every unit unsharded for the
    duration, so ranks decoding different prompts (and different numbers of tokens) run no
    collective per forward — one all-gather per unit on entry, a reshard on exit."""
    inner = unwrap(model)
    units = [m for m in inner.modules() if hasattr(m, "set_reshard_after_forward")]
    if not units:
        yield inner
        return
    for u in units:
        u.set_reshard_after_forward(False)
        guarded(u.unshard, "gathering the weights to generate")
    try:
        yield inner
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True)


def after_optimizer_step(model) -> None:
    """MoE aux-loss-free balancing with the loads of every rank: the router biases stay identical."""
    inner = unwrap(model)
    if not hasattr(inner, "after_optimizer_step"):
        return
    if tdist.is_initialized():
        for gate in inner.gates():
            all_reduce_(gate.load, "summing the MoE expert loads")
    inner.after_optimizer_step()


def full_state_dict(model) -> dict:
    """The unsharded state dict, gathered tensor by tensor onto rank 0's CPU (the other ranks get {}).

    FSDP2 holds DTensor shards: each is all-gathered, copied to CPU and dropped in turn, so no rank
    ever holds the whole model on the accelerator and the gather costs one model of CPU memory on
    rank 0 — the state dict the checkpoint writes anyway.
    """
    sd = unwrap(model).state_dict()
    if not tdist.is_initialized():
        return sd
    from torch.distributed.tensor import DTensor
    main, out = is_main_process(), {}
    for name, t in sd.items():
        if isinstance(t, DTensor):
            t = guarded(t.full_tensor, "gathering the weights for the checkpoint")
        if main:
            out[name] = t.detach().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Optimizer state through torch.distributed.checkpoint (resharded on load: N → M processes)
# ---------------------------------------------------------------------------------------------
def save_optimizer(model, optimizer, directory) -> None:
    """Every rank writes its shard of the optimizer state (FQN-keyed) into `directory` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    sd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _quiet():
        guarded(lambda: dcp.save(sd, checkpoint_id=str(directory)), "writing the optimizer state")


def load_optimizer(model, optimizer, directory) -> None:
    """Read the optimizer state saved by any number of ranks into this layout (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    sd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _quiet():
        guarded(lambda: dcp.load(sd, checkpoint_id=str(directory)), "reading the optimizer state")
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])


@contextlib.contextmanager
def _quiet():
    """DCP warns that a world of one "assumes a single process": that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


__all__ = ["DistError", "World", "world", "init", "wrap", "unwrap", "shard", "shard_range", "loss_scale",
           "all_reduce_sum", "all_reduce_mean", "all_reduce_max", "global_sum", "all_gather", "broadcast",
           "barrier", "all_reduce_", "generating", "after_optimizer_step", "full_state_dict", "save_optimizer",
           "load_optimizer", "shutdown", "print0", "is_main_process", "PARALLEL"]
