"""Read safetensors tensors straight into owned, 64-byte-aligned memory (no memory map).

A tensor viewed in a file's memory map starts wherever the header ends (any 8-byte offset), and CPU BLAS
libraries take other kernels for unaligned operands, so results then depend on the file's layout (an AMD
EPYC BLAS gave pooled embeddings 2.4e-7 apart for the same weights). Reading each tensor into a fresh
torch allocation (64-byte aligned) with readinto avoids that, and it is also cheaper than copying out of a
map: one kernel copy from the page cache, no page faults, and the process never holds the file's pages
(on a 3.3 GB checkpoint: half the peak RSS of mmap + copy, and faster; benchmarks/bench_load.py).
The header has been validated by safetensors itself (detect.read_header) before this runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip


_CHUNK = 16 << 20  # bytes converted per read: a bounded scratch buffer, reused (no heap growth)


def _fill(f, view: memoryview) -> None:
    got = 0
    while got < len(view):  # one read() returns at most ~2 GB on Linux
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"file ends {len(view) - got} bytes early")
        got += n


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read_tensors(path: str, dtype_of: Callable[[str], torch.dtype | None]) -> dict[str, torch.Tensor]:
    """{name: tensor} for every tensor where dtype_of(name) is not None, floats converted to that dtype.

    Each tensor is a fresh contiguous allocation. A conversion reads through one reused 16 MB scratch buffer,
    so the peak is the result alone.
    """
    out = {}
    scratch = None
    with open(path, "rb", buffering=0) as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        start = 8 + size
        entries = sorted((info["data_offsets"][0], name, info) for name, info in header.items() if "dtype" in info)
        for offset, name, info in entries:  # in file order: sequential reads
            target = dtype_of(name)
            if target is None:
                continue
            stored = DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            if not stored.is_floating_point:  # integer tensors keep their type
                target = stored
            tensor = torch.empty(info["shape"], dtype=target)
            f.seek(start + offset)
            if target == stored:
                _fill(f, _bytes(tensor))
            else:
                if scratch is None:
                    scratch = torch.empty(_CHUNK, dtype=torch.uint8)
                flat, per = tensor.view(-1), _CHUNK // stored.itemsize
                for i in range(0, flat.numel(), per):
                    n = min(per, flat.numel() - i)
                    _fill(f, _bytes(scratch[: n * stored.itemsize]))
                    flat[i : i + n].copy_(scratch[: n * stored.itemsize].view(stored))
            out[name] = tensor
    return out
