"""Training on several processes with torch.distributed (torchrun, accelerate launch), in lockstep.

Launch: the unchanged CLI under `torchrun --nproc_per_node=N -m trainer train ...` (or `accelerate launch`);
RANK / WORLD_SIZE / LOCAL_RANK come from the launcher. NCCL on CUDA (one GPU per local rank), gloo on the CPU.
Without those variables (or with WORLD_SIZE=1) everything here is a no-op and the run is an ordinary one.

What makes N processes train ONE LoRA, equal (up to float reduction order) to one process with N times the batch:
- Data: the sampler draws global batches of batch_size x N; rank r takes rows [r*b, (r+1)*b) of each (`shard`).
  Each sample's noise and timestep are a function of its global position (Trainer.micro_batch_loss), so they
  are those one process would draw. A short batch (end of a bucket) may leave a rank with no rows: it then
  contributes zero gradient and its share of the loss is zero; losses are weighted by global row counts.
- Gradients: an explicit all-reduce (SUM) of the flattened LoRA gradients, once per optimizer step after all
  grad_accum micro-batches, in dtype buckets. Why not DistributedDataParallel: DDP wants one nn.Module that owns
  the trained parameters and runs the forward; the LoRA network only wraps the UNet's modules (the UNet, which
  runs the forward, owns none of them), a rank with an empty shard must still join the reduce without running a
  forward, and accumulation across micro-batches would need no_sync() around all but the last. One reduce per
  step is what DDP's no_sync + last-micro-batch sync amounts to for a few million LoRA weights, without the
  hooks. It is torch.distributed's all_reduce, not a transport of our own.
- Emotion in lockstep: each rank's micro-batch loss is (its rows' loss sum) / (global rows); the step's loss
  rides in the same all-reduce as the gradients, so every optimizer is fed the global mean and the step still
  has one host read. Every optimizer then sees identical gradients and loss and stays bit-identical; at every
  save the ranks compare a checksum of LoRA and optimizer state and fail loudly if they differ.
- Control: rank 0 alone owns the run folder (store, LoRA, state, samples, control file). It reads the control
  file; the decision (stop / save now / auto-stop) is shared over a CPU (gloo) group each step, so every rank
  stops at the same step without a device sync.
- Faults: the process group has a timeout (EMOLORA_DIST_TIMEOUT seconds, default 600), so a dead peer ends the
  others' collectives with an error naming this rank instead of a hang; torchrun then ends the job non-zero and
  names the failed rank.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from .devices import pick_device

log = logging.getLogger("emolora.train")

BUCKET_BYTES = 64 << 20  # gradients per all_reduce call: bounds the flat copy's extra memory
AUTO_STOP_CODES = {None: 0, "stop": 1, "mark": 2, "off": 3}


class LockstepError(RuntimeError):
    """The ranks' LoRA or optimizer state differ, or a peer failed during a collective."""


def world_size() -> int:
    """Processes training this LoRA together (1 unless a process group is up): the global batch's factor."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) otherwise."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None


def timeout_s() -> float:
    value = os.environ.get("EMOLORA_DIST_TIMEOUT", "600")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"EMOLORA_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None


@dataclass
class Dist:
    """This process's place in the run. world == 1: a single-process run, every method is a cheap no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the default group (and destroy it at the end)
    cpu_group: object = None  # gloo group for host-side decisions (the default group itself under gloo)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- host-side agreement ---------------------------------------------------------------------------------
    def _collective(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # gloo/NCCL raise RuntimeError (or DistBackendError) on a dead peer or timeout
            raise LockstepError(f"rank {self.rank}/{self.world}: {what} failed; another rank died or timed out "
                                f"({type(e).__name__}: {e})") from e

    def barrier(self, what: str = "barrier") -> None:
        if self.enabled:
            self._collective(what, lambda: torch.distributed.barrier(group=self.cpu_group))

    @contextmanager
    def main_first(self, what: str):
        """Rank 0 runs the block first, the others wait, then run it themselves (e.g. filling a disk cache
        once: the others then find every entry)."""
        if not self.is_main:
            self.barrier(what)
        yield
        if self.is_main:
            self.barrier(what)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (host objects, over the CPU group)."""
        if not self.enabled:
            return obj
        box = [obj]
        self._collective("broadcast", lambda: torch.distributed.broadcast_object_list(box, 0, group=self.cpu_group))
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        self._collective("all_gather", lambda: torch.distributed.all_gather_object(out, obj, group=self.cpu_group))
        return out

    def agree_control(self, state: dict, local_stop: bool) -> dict:
        """Rank 0's control state (its file) with stop = any rank's stop; one small CPU all_reduce per step."""
        if not self.enabled:
            return {**state, "stop": bool(state.get("stop")) or local_stop}
        mine = self.is_main
        codes = torch.tensor([int(bool(state.get("stop")) or local_stop),
                              int(state.get("save_now") or 0) if mine else 0,
                              AUTO_STOP_CODES.get(state.get("auto_stop"), 0) if mine else 0], dtype=torch.int64)
        self._collective("control all_reduce", lambda: torch.distributed.all_reduce(
            codes, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group))
        names = {v: k for k, v in AUTO_STOP_CODES.items()}
        stop, save_now, auto = codes.tolist()
        return {**state, "stop": bool(stop), "save_now": save_now, "auto_stop": names.get(auto)}

    # ---- the step's reduce -----------------------------------------------------------------------------------
    def reduce_step(self, params, loss_sum: torch.Tensor) -> torch.Tensor:
        """SUM-all-reduce the LoRA gradients (absent ones count as zeros and are created) and the step's loss
        sum, in place, in dtype buckets of at most BUCKET_BYTES; -> the reduced loss sum (a device tensor, not
        read here: it joins the step's single host read)."""
        if not self.enabled:
            return loss_sum
        loss = loss_sum.detach().float().reshape(1)
        by_dtype: dict = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        buckets, current, size = [], [], 0
        for dtype in sorted(by_dtype, key=str):
            for p in by_dtype[dtype]:
                nbytes = p.numel() * p.element_size()
                if current and (size + nbytes > BUCKET_BYTES or current[0].dtype != dtype):
                    buckets.append(current)
                    current, size = [], 0
                current.append(p)
                size += nbytes
        if current:
            buckets.append(current)
        loss_done = False
        for bucket in buckets:
            flats = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
            carry_loss = not loss_done and bucket[0].dtype == torch.float32
            flat = torch.cat(flats + ([loss.to(bucket[0].device)] if carry_loss else []))
            self._collective("gradient all_reduce", lambda flat=flat: torch.distributed.all_reduce(flat))
            offset = 0
            for p in bucket:
                n = p.numel()
                g = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += n
            if carry_loss:
                loss, loss_done = flat[offset:].clone(), True
        if not loss_done:
            self._collective("loss all_reduce", lambda: torch.distributed.all_reduce(loss))
        return loss.reshape(())

    def broadcast_params(self, params) -> None:
        """Rank 0's LoRA weights on every rank (after init or resume), as DDP does at construction."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                self._collective("parameter broadcast", lambda p=p: torch.distributed.broadcast(p.data, 0))

    # ---- lockstep check --------------------------------------------------------------------------------------
    def check_lockstep(self, params, optimizer, step: int) -> None:
        """All ranks compare a checksum of the LoRA and the optimizer state; any difference raises on every
        rank, naming the ranks that differ from rank 0."""
        if not self.enabled:
            return
        digest = state_checksum(params, optimizer)
        digests = self.gather_objects(digest)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise LockstepError(f"ranks out of lockstep at step {step}: the LoRA/optimizer state of rank(s) "
                                f"{bad} differs from rank 0's (checksums {digests}); the run cannot continue")

    def shutdown(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def state_checksum(params, optimizer) -> str:
    """A hex digest of the bits of every LoRA tensor and of the whole optimizer state (per-parameter moments, the
    emotion's EMAs and history, the groups' hyper-parameters). Tensors are reduced on their device to two int64
    sums over their bit patterns (one weighted by position), so only a few numbers per tensor reach the host."""
    tensors, other = [p.detach() for p in params], hashlib.blake2b(digest_size=16)
    sd = optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd.get("param_groups", ())]
    _walk({**sd, "param_groups": groups}, "", tensors, other)
    if tensors:
        other.update(torch.stack([_bit_sums(t) for t in tensors]).cpu().numpy().tobytes())
    return other.hexdigest()


def _walk(obj, path: str, tensors: list, other) -> None:
    """Tensors into `tensors`, everything else (numbers, strings...) into the hash, in a fixed order."""
    if torch.is_tensor(obj):
        other.update(f"{path}:tensor{tuple(obj.shape)};".encode())
        tensors.append(obj.detach())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _walk(obj[k], f"{path}.{k}", tensors, other)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", tensors, other)
    else:
        other.update(f"{path}={obj!r};".encode())


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sums(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 1_000_003 + 1
    return torch.stack([bits.sum(), (bits * weights).sum()])


def process_backend(device_type: str, windows: bool = os.name == "nt") -> str:
    """NCCL for CUDA ranks, gloo otherwise; Windows builds of torch have no NCCL, so gloo there for CUDA too."""
    return "nccl" if device_type == "cuda" and not windows else "gloo"


def setup(cfg):
    """Join the launcher's process group (if any). -> (cfg with this rank's device, Dist).

    CUDA: rank -> cuda:LOCAL_RANK and NCCL; otherwise gloo. A memory feature cache cannot be shared between
    processes, so under several ranks it becomes the disk cache (rank 0 fills it, the others read it)."""
    rank, world, local_rank = launched_world()
    if world <= 1:
        return cfg, Dist()
    device = pick_device(cfg.device)
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = process_backend(device.type)
    dist = Dist(rank, world, local_rank)
    timeout = timedelta(seconds=timeout_s())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timeout, **(
            {"device_id": device} if backend == "nccl" else {}))
        dist.owns_group = True
    dist.cpu_group = (torch.distributed.new_group(backend="gloo", timeout=timeout) if backend != "gloo"
                      else torch.distributed.group.WORLD)
    changes = {"device": str(device)}
    for field in ("cache_latents", "cache_text"):
        if getattr(cfg, field) == "memory":
            changes[field] = "disk"
    if rank != 0:  # one voice: the other ranks report only warnings and errors
        logging.getLogger("emolora").setLevel(logging.WARNING)
    log.info("distributed: %d ranks (%s), global batch %d = %d per rank x %d ranks x %d accumulation",
             world, backend, cfg.batch_size * world * cfg.grad_accum, cfg.batch_size, world, cfg.grad_accum)
    return cfg.replace(**changes), dist


def shard(batch, dist: Dist, per_rank: int):
    """This rank's rows of a global batch, with `offset` (its first row's global position) and `global_rows`
    set; rows past the end (a short batch) leave a later rank with an empty shard."""
    n = len(batch.indices)
    if not dist.enabled:
        return replace(batch, offset=0, global_rows=n)
    lo, hi = min(n, dist.rank * per_rank), min(n, (dist.rank + 1) * per_rank)

    def rows(x):
        return x[lo:hi] if x is not None else None

    return replace(batch, indices=batch.indices[lo:hi], captions=batch.captions[lo:hi], latents=rows(batch.latents),
                   time_ids=rows(batch.time_ids), prompt_embeds=rows(batch.prompt_embeds), pooled=rows(batch.pooled),
                   mask=rows(batch.mask), weights=rows(batch.weights), offset=lo, global_rows=n)


class NullStore:
    """What a rank other than 0 has in place of the RunStore: the folder's paths, no writes."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)

    state_dir = property(lambda self: self.run_dir / "state")
    samples_dir = property(lambda self: self.run_dir / "samples")

    def write_config(self, config):
        pass

    def log_step(self, step, record):
        pass

    def event(self, step, kind, data=None):
        pass

    def set_meta(self, **values):
        pass

    def truncate_after(self, step):
        pass

    def close(self):
        pass


class SharedControl:
    """The control channel every rank polls: rank 0 reads the file (its ControlPoller); the state is agreed
    over the CPU group, so Stop / Save now / auto-stop act on all ranks at the same step."""

    def __init__(self, poller, dist: Dist, stop_event):
        self.poller, self.dist, self.stop_event = poller, dist, stop_event
        self.state = dict(poller.state) if poller is not None else {}

    def poll(self) -> dict:
        local = self.poller.poll() if self.poller is not None else {}
        self.state = self.dist.agree_control(local, self.stop_event.is_set())
        return self.state


def open_run(dist: Dist, opener, cfg, rt, report, stop_event):
    """Rank 0 opens the run folder with opener(cfg, rt, report) -> (store, poller, started_at); the other ranks
    learn its path and get a NullStore (they write nothing). -> (store, control, the run's first start time)."""
    if not dist.enabled:
        return opener(cfg, rt, report)
    store, poller, started_at = opener(cfg, rt, report) if dist.is_main else (None, None, None)
    run_dir, started_at = dist.broadcast_object((str(store.run_dir) if store else None, started_at))
    if dist.is_main:
        store.set_meta(world_size=dist.world)
    else:
        store = NullStore(run_dir)
    return store, SharedControl(poller, dist, stop_event), started_at
