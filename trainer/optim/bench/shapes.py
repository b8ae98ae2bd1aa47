"""The parameter set: kohya's sd-scripts SDXL UNet LoRA targets (722 nn.Linear modules) as down/up tensor shapes."""

from collections import Counter

CONTEXT_DIM = 2048  # SDXL cross-attention context (CLIP-L 768 + OpenCLIP-bigG 1280)
# (UNet location, channels, transformer depth) of the 11 Transformer2DModels of the SDXL base UNet
SDXL_TRANSFORMERS = (
    [(f"input_blocks.{i}.1", 640, 2) for i in (4, 5)]
    + [(f"input_blocks.{i}.1", 1280, 10) for i in (7, 8)]
    + [("middle_block.1", 1280, 10)]
    + [(f"output_blocks.{i}.1", 1280, 10) for i in (0, 1, 2)]
    + [(f"output_blocks.{i}.1", 640, 2) for i in (3, 4, 5)]
)
EXPECTED_MODULES = 722
EXPECTED_PARAMS_R16 = 42_557_440


def sdxl_lora_targets():
    """[(module name, in_features, out_features)] of kohya's 722 SDXL UNet LoRA targets (all nn.Linear)."""
    out = []
    for loc, dim, depth in SDXL_TRANSFORMERS:
        out.append((f"{loc}.proj_in", dim, dim))  # linear proj_in/out in SDXL (use_linear_in_transformer)
        for b in range(depth):
            pre = f"{loc}.transformer_blocks.{b}"
            for k in ("to_q", "to_k", "to_v", "to_out.0"):
                out.append((f"{pre}.attn1.{k}", dim, dim))
            out.append((f"{pre}.attn2.to_q", dim, dim))
            out.append((f"{pre}.attn2.to_k", CONTEXT_DIM, dim))
            out.append((f"{pre}.attn2.to_v", CONTEXT_DIM, dim))
            out.append((f"{pre}.attn2.to_out.0", dim, dim))
            out.append((f"{pre}.ff.net.0.proj", dim, 8 * dim))  # GEGLU: 2 x 4*dim
            out.append((f"{pre}.ff.net.2", 4 * dim, dim))
        out.append((f"{loc}.proj_out", dim, dim))
    return out


def lora_shapes(rank=16, quick=False):
    """[(tensor name, shape)]: lora_down (rank, in) and lora_up (out, rank) per target; quick: every 10th target."""
    targets = sdxl_lora_targets()
    if quick:
        targets = targets[::10]
    shapes = []
    for name, fin, fout in targets:
        shapes.append((f"{name}.lora_down", (rank, fin)))
        shapes.append((f"{name}.lora_up", (fout, rank)))
    return targets, shapes


def shapes_summary(targets, rank):
    by = Counter((fin, fout) for _, fin, fout in targets)
    lines = ["| in -> out | modules | LoRA params |", "|---|---:|---:|"]
    for (fin, fout), n in sorted(by.items()):
        lines.append(f"| {fin} -> {fout} | {n} | {n * rank * (fin + fout):,} |")
    return lines
