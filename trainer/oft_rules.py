"""OFT and BOFT without torch: LyCORIS's block layouts, and the settings in which ComfyUI 0.3.75 applies a file
the way LyCORIS trains it. The config checks these before the model loads; the adapters (model/adapters/oft.py,
boft.py) use the same layouts.

Where the two disagree (read from ComfyUI's comfy/weight_adapter/oft.py, boft.py and LyCORIS's diag_oft.py,
boft.py): a non-zero constraint (`alpha`) limits ||Q|| to alpha in ComfyUI but to alpha * out_dim in LyCORIS;
Diag-OFT's `rescale` is loaded but never applied by ComfyUI; neither implements DoRA, rsLoRA, Tucker cores or
input dropout for OFT. So we train only constraint 0, rescale with BOFT only, and none of the others.
"""

from __future__ import annotations

from .divisors import balanced_pair

OFT_NETWORKS = ("oft", "boft")
LYCORIS_ALGO = {"oft": "diag-oft", "boft": "boft"}  # LyCORIS's algo names (ss_network_args)


def oft_layout(out_dim: int, dim: int) -> tuple[int, int]:
    """Diag-OFT's (block_size, block_num) for a layer of out_dim outputs and network dim `dim` (LyCORIS's
    factorization: {dim, out_dim / dim} when dim divides out_dim, so dim is the block count when dim^2 > out_dim;
    otherwise the balanced pair under dim)."""
    if out_dim % dim == 0:
        return min(dim, out_dim // dim), max(dim, out_dim // dim)
    return balanced_pair(out_dim, dim)


def boft_layout(out_dim: int, dim: int) -> tuple[int, int] | None:
    """BOFT's (block_size, block_num): the largest even block size b <= dim with out_dim / b a power of two
    (LyCORIS's power2factorization); None where there is none."""
    best = None
    for b in range(2, min(dim, out_dim) + 1, 2):
        q, r = divmod(out_dim, b)
        if r == 0 and q & (q - 1) == 0:
            best = (b, q)
    return best


def boft_stages(block_num: int) -> int:
    """The butterfly's stage count: log2(block_num) + 1."""
    return bin(block_num - 1).count("1") + 1


def refusal(network: str, *, dora=False, rslora=False, tucker=False, dropout=0.0, rescale=False,
            constraint=0.0) -> str | None:
    """Why these settings cannot be trained (one line), or None. Rescale belongs to OFT/BOFT only."""
    if network not in OFT_NETWORKS:
        return "oft_rescale works with network boft only" if rescale else None
    if constraint:
        return (f"oft_constraint {constraint} is not supported: ComfyUI 0.3.75 limits ||Q|| to the file's alpha, "
                "LyCORIS to alpha x out_dim, so only 0 (no constraint) means the same to both")
    if rescale and network == "oft":
        return "oft_rescale works with network boft only: ComfyUI 0.3.75 loads an OFT file's rescale but ignores it"
    for name, on in (("dora", dora), ("rslora", rslora), ("tucker", tucker), ("network_dropout", dropout)):
        if on:
            return f"{name} does not apply to network {network} (ComfyUI and LyCORIS apply no such option to it)"
    return None


def boft_width_error(widths, dim: int, what: str = "rank") -> str | None:
    """A one-line message when BOFT with `dim` cannot split one of the layer widths, else None."""
    bad = sorted(w for w in set(widths) if boft_layout(w, dim) is None)
    if not bad:
        return None
    fits = next((d for d in range(2, max(bad) + 1, 2) if all(boft_layout(w, d) for w in bad)), None)
    hint = f"use {what} >= {fits}" if fits else "no block size fits it"
    return (f"network boft cannot split a layer of width {bad[0]} with {what} {dim}: BOFT needs an even block "
            f"size <= {what} leaving a power-of-two block count ({hint})")
