"""Continue training from an existing LoRA-family file: ours, kohya's (networks.lora), LyCORIS's (LoCon, LoHa,
LoKr, DoRA, Diag-OFT, BOFT) or ComfyUI's trainer's (`diffusion_model.<module>.lora_up.weight`).

Keys are matched to the network's modules by the original SDXL names (diffusers-spelled kohya names too); the
file's alpha is adopted with the loaders' meaning (scale = alpha / rank), so the continued network applies exactly
what ComfyUI applied to the file. Anything that does not fit (type, rank, factor layout, DoRA, a module missing
on either side) raises LoRAError naming the file and the key.
"""

from __future__ import annotations

import logging
import os

import torch

from ..oft_rules import refusal
from .errors import LoRAError

log = logging.getLogger(__name__)

KIND_OF = {"lora_up.weight": "lora", "lora_down.weight": "lora", "hada_w1_a": "loha", "hada_w1_b": "loha",
           "hada_w2_a": "loha", "hada_w2_b": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr",
           "lokr_w2": "lokr", "lokr_w2_a": "lokr", "lokr_w2_b": "lokr",
           "lora_mid.weight": "lora", "hada_t1": "loha", "hada_t2": "loha",
           "oft_blocks": "oft", "rescale": "oft"}  # BOFT's oft_blocks have 4 dimensions (LyCORIS's algo_check)
TUCKER = ("lora_mid.weight", "hada_t1", "hada_t2")  # LyCORIS's use_tucker cores (3x3 convs)
COMMON = ("alpha", "dora_scale")
# LoKr's Tucker cores: ComfyUI 0.3.75 fails to apply lokr_t2 (its torch.kron gets a non-contiguous einsum result;
# seen with torch 2.13 on the tiny SDXL), so we neither train nor continue them; no loader reads lokr_t1.
UNSUPPORTED = ("lokr_t1", "lokr_t2")
SUFFIXES = sorted((*KIND_OF, *COMMON, *UNSUPPORTED), key=len, reverse=True)
FLAG = {kind: f"--network {kind}" for kind in ("lora", "loha", "lokr", "oft", "boft")}


def read_file(source) -> tuple[dict, dict, str]:
    """(tensors, metadata, label) of a path or an in-memory state dict."""
    if not isinstance(source, (str, os.PathLike)):
        return dict(source), {}, "the state dict"
    path = os.fspath(source)
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), path
    except Exception as exc:
        raise LoRAError(f"cannot read LoRA file {path}: {exc}") from exc


def split_key(key: str) -> tuple[str, str] | None:
    """(kohya module name, tensor suffix), or None for a key that is no LoRA-family tensor."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            if module.startswith("diffusion_model."):  # ComfyUI's own trainer
                module = "lora_unet_" + module[len("diffusion_model."):].replace(".", "_")
            return module, suffix
    return None


def file_steps(meta: dict) -> int:
    """Optimizer steps the file was trained for (its ss_steps, cumulative in our files), 0 if unknown."""
    try:
        return max(0, int(float(meta.get("ss_steps", 0))))
    except ValueError:
        return 0


def load_network_weights(network, source, *, strict: bool = True) -> dict:
    """Load `source` (a .safetensors path or a state dict) into `network`'s adapters.

    strict: every module of the file must exist in the network and vice versa; strict=False skips the file's
    extra modules and keeps the network's missing ones at their fresh init (both reported). Returns {"loaded",
    "missing", "unknown", "steps_before"}; network.steps_before is set from the file's ss_steps.
    """
    sd, meta, label = read_file(source)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        parts = split_key(key)
        if parts is None:
            raise LoRAError(f"{label}: key {key!r} is not a LoRA, LoHa, LoKr, DoRA or OFT tensor")
        module, suffix = parts
        grouped.setdefault(network.alias(module), {})[suffix] = value
    unknown = sorted(n for n in grouped if n not in network.loras)
    if unknown and strict:
        raise LoRAError(
            f"{label}: {len(unknown)} modules have no counterpart in this network, e.g. {unknown[0]!r} "
            f"(network: {network.network_type}, rank {network.rank}, conv_rank {network.conv_rank}, train_te "
            f"{network.train_te}); match conv_rank / train_text_encoder to the file, or load with strict=False")
    loaded = []
    for name, parts in sorted(grouped.items()):
        if name in network.loras:
            _load_module(network, network.loras[name], name, parts, label)
            loaded.append(name)
    missing = sorted(set(network.loras) - set(loaded))
    if missing and strict:
        raise LoRAError(f"{label} lacks {len(missing)} of this network's modules, e.g. {missing[0]!r} (a file "
                        f"trained with other targets: match conv_rank / train_text_encoder, or strict=False)")
    if missing:
        log.warning("%s lacks %d of the network's modules (kept at init), e.g. %s", label, len(missing), missing[:3])
    network.steps_before = file_steps(meta)
    network.weights_source = os.path.basename(label) if label != "the state dict" else None
    return {"loaded": len(loaded), "missing": missing, "unknown": unknown, "steps_before": network.steps_before}


def _load_module(network, adapter, name: str, parts: dict, label: str) -> None:
    def describe(suffix):
        return f"{label}: {name}.{suffix}"

    unsupported = [s for s in parts if s in UNSUPPORTED]
    if unsupported:
        raise LoRAError(f"{describe(unsupported[0])}: LoKr with Tucker cores is not supported (ComfyUI cannot "
                        "apply lokr_t2 either); Tucker works with lora and loha")
    kinds = {KIND_OF[s] for s in parts if s in KIND_OF}
    if len(kinds) != 1:
        raise LoRAError(f"{describe(sorted(parts)[0])}: the module holds {sorted(parts)}, not one LoRA/LoHa/LoKr")
    kind = kinds.pop()
    if kind == "oft" and "oft_blocks" in parts and parts["oft_blocks"].dim() == 4:
        kind = "boft"
    if kind != adapter.kind:
        raise LoRAError(f"{describe(next(s for s in parts if s in KIND_OF))} is a {kind} module but this network "
                        f"trains {adapter.kind}: start with {FLAG[kind]}")
    if ("dora_scale" in parts) != (adapter.dora_scale is not None):
        has = "has" if "dora_scale" in parts else "has no"
        raise LoRAError(f"{describe('dora_scale')}: the file {has} DoRA magnitudes and the network "
                        f"{'does not use' if 'dora_scale' in parts else 'uses'} DoRA: set dora to match the file")
    want = {s for s, _ in adapter.named_factors()}
    have = {s for s in parts if s in KIND_OF}
    tucker_file, tucker_net = have & set(TUCKER), want & set(TUCKER)
    if bool(tucker_file) != bool(tucker_net):
        key = sorted(tucker_file or tucker_net)[0]
        raise LoRAError(f"{describe(key)}: the file {'uses' if tucker_file else 'does not use'} Tucker cores for "
                        f"3x3 convs and the network {'does not' if tucker_file else 'does'}: set tucker to "
                        f"{bool(tucker_file)} (--tucker)")
    if "rescale" in have and adapter.kind == "oft":
        raise LoRAError(f"{describe('rescale')}: {refusal('oft', rescale=True)}; such a file cannot be continued")
    if ("rescale" in have) != ("rescale" in want):
        raise LoRAError(f"{describe('rescale')}: the file {'has' if 'rescale' in have else 'has no'} a rescale and "
                        f"the network {'does not train' if 'rescale' in have else 'trains'} one: set oft_rescale "
                        f"to {'rescale' in have} (--oft-rescale; network boft only)")
    if have != want:
        raise LoRAError(f"{describe(sorted(have ^ want)[0])}: the file's {kind} factors {sorted(have)} differ from "
                        f"this network's {sorted(want)} (lokr_factor, lokr_full_matrix, lokr_decompose_both or "
                        "rank differ)")
    file_rank = _file_rank(kind, parts)
    if file_rank is not None and file_rank != adapter.rank:
        raise LoRAError(f"{describe(_rank_key(kind, parts))}: rank mismatch, the file has rank {file_rank} and the "
                        f"network rank {adapter.rank}; use rank={file_rank} (conv_rank for 3x3 convs)")
    try:
        adapter.load_tensors(parts, describe)
    except ValueError as exc:
        raise LoRAError(str(exc)) from None


def _rank_key(kind: str, parts: dict) -> str | None:
    if kind == "lora":
        return "lora_down.weight"
    if kind == "loha":
        return "hada_w1_b"
    return next((k for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)


def _file_rank(kind: str, parts: dict) -> int | None:
    key = _rank_key(kind, parts)
    return None if key is None else int(parts[key].shape[0])
