"""UNet block offloading (`offload = "blocks"` or `"blocks:N"`): the frozen weights of the UNet's down/mid/up blocks
(all of them, or the N largest) live in pinned host memory; each block's weights are copied to the GPU just before
its forward, on a side stream while the previous block computes, and dropped after it. Only the block's own
registered tensors move: the adapters are held outside the UNet's module registry (trainer/model/lora.py), so the
LoRA, its gradients and the optimizer state stay on the GPU.

The backward needs the weights again, in two ways, and both bring the block back on demand:
- an op outside a checkpointed region saved a weight for its backward (a Linear needs W for the input's
  gradient): while a block runs forward, saved-tensor hooks replace each of its weights by a token, so the graph
  holds no GPU copy; unpacking a token in the backward fetches the block again;
- with gradient checkpointing, diffusers re-runs each resnet and transformer block's forward in the backward:
  a forward pre-hook on every module of an offloaded block fetches the block before the recomputation.
In the backward a fetched block drops the blocks after it (their backward is done: it runs in reverse order)
and prefetches the one before it; the end of the backward drops all. The last block is kept at the end of a
forward with gradients, since the backward starts with it.

On the CPU the copies are identities (the weights stay where they are): the same hooks and tokens run, which is
what the tests check, and nothing is saved. Tests substitute `_to_device`/`_parked` to make real copies and
poison dropped weights, so a missed fetch changes the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("emolora.train")


def unet_blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's down, mid and up blocks in forward order, by their diffusers names."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    return blocks + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own_tensors(module):
    """(owner, name, is_param, tensor) for the module's own parameters and buffers (not its children's)."""
    for name, p in module._parameters.items():
        if p is not None:
            yield module, name, True, p
    for name, b in module._buffers.items():
        if b is not None:
            yield module, name, False, b


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    slots: list  # (owner module, attribute, is_param)
    host: list  # the host (pinned on CUDA) tensors, one per slot
    nbytes: int
    on_device: list | None = None  # the device copies while the block is fetched
    pending: tuple | None = None  # (copies, CUDA event) of a prefetch not yet handed to the compute stream
    hooks: list = field(default_factory=list)


class _Token:
    """Stands in for a saved block weight in the autograd graph: which slot, and the view that was saved."""

    __slots__ = ("block", "slot", "size", "stride", "offset")

    def __init__(self, block, slot, size, stride, offset):
        self.block, self.slot, self.size, self.stride, self.offset = block, slot, size, stride, offset


class BlockOffloader:
    """Streams the frozen weights of `count` UNet blocks (None: all; else the largest `count`) to `device`.
    attach() places the UNet (the rest of it on the device, the offloaded blocks' tensors in host memory) and
    installs the hooks; detach() removes them and puts every block on the device."""

    def __init__(self, unet, device, count: int | None = None):
        self.unet, self.device = unet, torch.device(device)
        self.cuda = self.device.type == "cuda"
        blocks = unet_blocks(unet)
        size = {name: sum(tensor_bytes(t) for m in b.modules() for *_, t in _own_tensors(m)) for name, b in blocks}
        if count is None or count >= len(blocks):
            chosen = {name for name, _ in blocks}
        else:  # the largest blocks save the most; forward order breaks ties
            chosen = {name for name, _ in sorted(blocks, key=lambda nb: -size[nb[0]])[:count]}
        self.blocks = [_Block(name, b, [], [], size[name]) for name, b in blocks if name in chosen]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.trace: list | None = None  # tests: a list to record (event, block name) in order
        self._storages: dict = {}  # storage data_ptr -> [(block index, slot, start offset, end offset)]
        self._callback_task = None  # the backward whose end drops every block
        self._handles: list = []
        self._saving = None  # the saved-tensor hooks of the block running forward
        self.attached = False

    # ---- placement -------------------------------------------------------------------------------------------
    def attach(self) -> BlockOffloader:
        offloaded = {id(m) for b in self.blocks for m in b.module.modules()}
        for module in self.unet.modules():  # module by module: the whole UNet is never on the device at once
            if id(module) in offloaded:
                continue
            for owner, name, is_param, t in list(_own_tensors(module)):
                self._set(owner, name, is_param, t.to(self.device))
        for i, block in enumerate(self.blocks):
            for module in block.module.modules():
                for owner, name, is_param, t in list(_own_tensors(module)):
                    host = t.detach().to("cpu")
                    if self.cuda:
                        host = host.pin_memory()  # page-locked: the copies can run asynchronously
                    block.slots.append((owner, name, is_param))
                    block.host.append(host)
                    self._set(owner, name, is_param, self._parked(host))
            self._hook(i, block)
        self.attached = True
        log.info("offload: %d UNet blocks (%s; %.0f MiB of weights) stream from host memory",
                 len(self.blocks), ", ".join(b.name for b in self.blocks), sum(b.nbytes for b in self.blocks) / 2**20)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            for (owner, name, is_param), host in zip(block.slots, block.host):
                self._set(owner, name, is_param, host.to(self.device))
            block.on_device = block.pending = None
        self._storages.clear()
        self.attached = False

    def _hook(self, i: int, block: _Block) -> None:
        self._handles.append(block.module.register_forward_pre_hook(lambda m, a: self._enter(i)))
        self._handles.append(block.module.register_forward_hook(lambda m, a, o: self._leave(i), always_call=True))
        for module in block.module.modules():  # a checkpointed module recomputing in the backward fetches
            if module is not block.module:
                self._handles.append(module.register_forward_pre_hook(lambda m, a: self._need(i)))

    @staticmethod
    def _set(owner, name, is_param, t) -> None:
        if is_param:
            owner._parameters[name].data = t
        else:
            owner._buffers[name] = t

    # What a fetch makes of a host tensor, and what a dropped slot holds (tests replace both).
    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True) if self.cuda else host

    def _parked(self, host: torch.Tensor) -> torch.Tensor:
        return host

    # ---- fetching and dropping -------------------------------------------------------------------------------
    def resident(self) -> list[str]:
        return [b.name for b in self.blocks if b.on_device is not None]

    def _log(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, self.blocks[i].name))

    def _prefetch(self, i: int) -> None:
        """Start copying block i on the side stream (CUDA), unless it is there or on its way."""
        if not 0 <= i < len(self.blocks):
            return
        block = self.blocks[i]
        if block.on_device is not None or block.pending is not None:
            return
        self._log("fetch", i)
        if not self.cuda:
            block.pending = ([self._to_device(h) for h in block.host], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [self._to_device(h) for h in block.host]
            event = torch.cuda.Event()
            event.record(self.stream)
        block.pending = (copies, event)

    def _ensure(self, i: int) -> None:
        """Block i's weights in place on the device (waiting for its copy, on the compute stream only)."""
        block = self.blocks[i]
        if block.on_device is not None:
            return
        self._prefetch(i)
        copies, event = block.pending
        block.pending = None
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)  # allocated on the side stream, used on this one
        for slot, ((owner, name, is_param), c) in enumerate(zip(block.slots, copies)):
            self._set(owner, name, is_param, c)
            self._storages.setdefault(c.untyped_storage().data_ptr(), []).append(
                (i, slot, c.storage_offset(), c.storage_offset() + c.numel()))
        block.on_device = copies

    def _drop(self, i: int) -> None:
        block = self.blocks[i]
        if block.on_device is None:
            return
        self._log("drop", i)
        for c in block.on_device:
            entries = self._storages.get(c.untyped_storage().data_ptr(), [])
            entries[:] = [e for e in entries if e[0] != i]
            if not entries:
                self._storages.pop(c.untyped_storage().data_ptr(), None)
        for (owner, name, is_param), host in zip(block.slots, block.host):
            self._set(owner, name, is_param, self._parked(host))
        block.on_device = None

    def drop_all(self) -> None:
        for i in range(len(self.blocks)):
            self._drop(i)
            self.blocks[i].pending = None

    # ---- the hooks -------------------------------------------------------------------------------------------
    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _enter(self, i: int) -> None:
        """Block i's forward starts: it alone (and the next one, arriving) on the device."""
        if self._in_backward():  # a checkpoint around the whole block recomputes it
            self._need(i)
            return
        self._log("forward", i)
        for j, other in enumerate(self.blocks):
            if j != i:
                self._drop(j)
                if j != i + 1:
                    other.pending = None  # a prefetch an interrupted forward left behind
        self._ensure(i)
        self._prefetch(i + 1)
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            ctx.__enter__()
            self._saving = ctx

    def _leave(self, i: int) -> None:
        ctx, self._saving = getattr(self, "_saving", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        if self._in_backward():
            return
        if not (torch.is_grad_enabled() and i == len(self.blocks) - 1):
            self._drop(i)  # the last block stays for the backward, which starts with it

    def _need(self, i: int) -> None:
        """A module of block i runs, or a saved weight of it is unpacked: in the forward the block is there
        already; in the backward (a checkpointed module recomputing, an op's backward) fetch it, drop the blocks
        after it and prefetch the one before."""
        if not self._in_backward():
            self._ensure(i)
            return
        task = torch._C._current_graph_task_id()
        if self._callback_task != task:  # the end of this backward drops every block
            self._callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        if self.blocks[i].on_device is not None:
            return
        self._log("backward", i)
        for j in range(i + 1, len(self.blocks)):
            self._drop(j)
        self._ensure(i)
        self._prefetch(i - 1)

    def _after_backward(self) -> None:
        self._callback_task = None
        self.drop_all()

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta" or t.layout != torch.strided:
            return t
        for i, slot, start, end in self._storages.get(t.untyped_storage().data_ptr(), ()):
            if start <= t.storage_offset() < end and t.dtype == self.blocks[i].on_device[slot].dtype:
                return _Token(i, slot, t.size(), t.stride(), t.storage_offset() - start)
        return t

    def _unpack(self, x):
        if not isinstance(x, _Token):
            return x
        self._need(x.block)
        base = self.blocks[x.block].on_device[x.slot]
        return base.as_strided(x.size, x.stride, base.storage_offset() + x.offset)

    # ---- sizes (the VRAM estimate) ---------------------------------------------------------------------------
    def streamed_peak_bytes(self) -> int:
        """The most offloaded-weight bytes on the device at once: a block and its neighbour arriving."""
        sizes = [b.nbytes for b in self.blocks]
        if len(sizes) < 2:
            return sum(sizes)
        return max(a + b for a, b in zip(sizes, sizes[1:]))

    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)
