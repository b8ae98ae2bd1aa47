"""kohya-compatible LoRA/LoCon injected into the diffusers SDXL UNet (and optionally both CLIPs).

Targets follow kohya's networks.lora for SDXL: every Linear / 1x1 Conv inside Transformer2DModel
(attn1/attn2 q,k,v,out, ff.net.0.proj, ff.net.2, proj_in, proj_out: 722 modules on SDXL base); with
conv_rank > 0 also ResnetBlock2D/Downsample2D/Upsample2D (3x3 convs get conv_rank, their Linear and
1x1 shortcut get rank, as kohya does); text encoders: CLIPAttention and CLIPMLP linears.
Modules are named by the ORIGINAL SDXL names (lora_unet_input_blocks_4_1_...), so exports load in
ComfyUI, A1111/Forge, kohya and diffusers without conversion.

Base modules are swapped for a wrapper in their parent (undone by remove(); meanwhile the host's
state_dict names gain `.base.`). The LoRA weights are owned by the network, not the host model, so
host dtype casts, requires_grad_(False), parameters() and state_dict() never include them. They stay
fp32 whatever the base dtype; the forward casts.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import sdxl_keys as K
from .convert import canonical_te_name
from .errors import LoRAError

log = logging.getLogger(__name__)

UNET_TRANSFORMER = {"Transformer2DModel"}
UNET_CONV_BLOCKS = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TE_BLOCKS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}


class LoRAModule(nn.Module):
    """The trainable low-rank pair for one base Linear or Conv2d."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.lora_name = name
        self.rank = int(rank)
        dev = base.weight.device
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                bias=False,
                device=dev,
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=dev)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=dev)
        # kohya/Microsoft init: down kaiming-uniform, up zero, so training starts at the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.set_alpha(alpha)
        self.dropout = float(dropout)
        self.multiplier = 1.0

    def set_alpha(self, alpha) -> None:
        alpha = float(alpha) if alpha else float(self.rank)  # kohya: alpha 0/None means alpha = rank
        self.alpha = alpha
        self.scale = alpha / self.rank  # a Python float: no device sync per forward

    def delta(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        h = x.to(self.lora_down.weight.dtype)
        if training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        return self.lora_up(self.lora_down(h)) * (self.scale * self.multiplier)


class LoRAWrapper(nn.Module):
    """Stands in for a base module in its parent: forward = base(x) + lora delta. The LoRA is held
    outside the module registry so the host model's parameters/state_dict stay the base's own."""

    def __init__(self, base: nn.Module, lora: LoRAModule):
        super().__init__()
        self.base = base
        object.__setattr__(self, "lora", lora)

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.lora.multiplier == 0:
            return out
        return out + self.lora.delta(x, self.training).to(out.dtype)

    def __getattr__(self, name):
        # Code that reads e.g. `module.weight.dtype` or `in_features` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")  # absent while copy/unpickle rebuilds us
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)


def _children(block: nn.Module):
    for child_name, child in block.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
            yield child_name, child


class LoRANetwork(nn.Module):
    """LoRA over an SDXLModel. Freezes the base networks; only LoRA weights require grad."""

    def __init__(
        self,
        model,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        conv_rank: int = 0,
        conv_alpha: float = 1.0,
        train_te: bool = False,
        te_rank: int | None = None,
        *,
        te_alpha: float | None = None,
        multiplier: float = 1.0,
    ):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.conv_rank, self.conv_alpha = int(conv_rank or 0), float(conv_alpha)
        self.train_te = bool(train_te)
        self.te_rank = int(te_rank or rank)
        self.te_alpha = float(te_alpha if te_alpha is not None else alpha)
        self.loras = nn.ModuleDict()
        self._wrapped: list[tuple[nn.Module, str, LoRAWrapper]] = []
        self._aliases: dict[str, str] = {}  # diffusers-spelled kohya names -> our (original-name) keys

        for net in (model.unet, model.te1, model.te2):
            if any(isinstance(m, LoRAWrapper) for m in net.modules()):
                raise LoRAError("the model already carries a LoRA network; call remove() on it first")
            net.requires_grad_(False)
        targets = self._unet_targets(model.unet)
        if self.train_te:
            for index, te in ((1, model.te1), (2, model.te2)):
                targets += self._te_targets(index, te)
        for name, parent, child_name, base, r, a in targets:
            lora = LoRAModule(name, base, r, a, dropout)
            self.loras[name] = lora
            wrapper = LoRAWrapper(base, lora)
            setattr(parent, child_name, wrapper)
            self._wrapped.append((parent, child_name, wrapper))
        self.set_multiplier(multiplier)

    # ------------------------------------------------------------------ target discovery
    def _unet_targets(self, unet) -> list:
        module_map = K.unet_module_map(K.layout_from_diffusers_config(dict(unet.config)))
        modules = dict(unet.named_modules())
        found = []
        for block_name, block in unet.named_modules():
            cls = type(block).__name__
            conv_block = cls in UNET_CONV_BLOCKS and self.conv_rank > 0
            if cls not in UNET_TRANSFORMER and not conv_block:
                continue
            for child_name, child in _children(block):
                full = f"{block_name}.{child_name}"
                is_conv_kxk = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
                if is_conv_kxk and not conv_block:
                    continue
                if full not in module_map:
                    raise LoRAError(f"no original SDXL name for UNet module {full}")
                name = K.kohya_unet_name(module_map[full])
                self._aliases["lora_unet_" + full.replace(".", "_")] = name
                r, a = (self.conv_rank, self.conv_alpha) if is_conv_kxk else (self.rank, self.alpha)
                parent_name, _, attr = full.rpartition(".")
                found.append((name, modules[parent_name], attr, child, r, a))
        return found

    def _te_targets(self, index: int, te) -> list:
        modules = dict(te.named_modules())
        found = []
        for block_name, block in te.named_modules():
            if type(block).__name__ not in TE_BLOCKS:
                continue
            for child_name, child in _children(block):
                if not isinstance(child, nn.Linear):
                    continue
                full = f"{block_name}.{child_name}"
                parent_name, _, attr = full.rpartition(".")
                name = K.kohya_te_name(index, canonical_te_name(full))
                found.append((name, modules[parent_name], attr, child, self.te_rank, self.te_alpha))
        return found

    # ------------------------------------------------------------------ training API
    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights in a stable order: sorted by kohya name, down before up."""
        return [
            p
            for name in sorted(self.loras)
            for p in (self.loras[name].lora_down.weight, self.loras[name].lora_up.weight)
        ]

    def param_groups(self, unet_lr: float, te_lr=None) -> list[dict]:
        """Optimizer param groups: UNet, TE1, TE2 (te_lr: one value, a (te1, te2) pair, or None = unet_lr)."""
        te_lrs = (te_lr, te_lr) if te_lr is None or isinstance(te_lr, (int, float)) else tuple(te_lr)
        spec = (("unet", "lora_unet_", unet_lr), ("te1", "lora_te1_", te_lrs[0]), ("te2", "lora_te2_", te_lrs[1]))
        groups = []
        for group, prefix, lr in spec:
            params = [
                p for name in sorted(self.loras) if name.startswith(prefix) for p in self.loras[name].parameters()
            ]
            if params:
                groups.append({"params": params, "lr": unet_lr if lr is None else lr, "name": group})
        return groups

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras.values():
            lora.multiplier = self.multiplier

    # ------------------------------------------------------------------ kohya format
    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight` / `.lora_up.weight` in `dtype`, `<name>.alpha` as a 0-dim fp32 tensor
        (kept fp32 so a non-representable alpha such as 0.3 round-trips exactly)."""
        sd = {}
        for name in sorted(self.loras):
            lora = self.loras[name]
            sd[f"{name}.lora_down.weight"] = lora.lora_down.weight.detach().to("cpu", dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = lora.lora_up.weight.detach().to("cpu", dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
        return sd

    def load_kohya(self, source, *, strict: bool = True) -> dict:
        """Continue from a kohya-format LoRA (ours or kohya's; original or diffusers module spelling).

        Each module adopts the file's alpha. Unknown modules raise LoRAError when strict; modules of this
        network absent from the file keep their fresh init and are reported under "missing".
        """
        if isinstance(source, (str, os.PathLike)):
            from safetensors.torch import load_file

            try:
                sd = load_file(os.fspath(source))
            except Exception as exc:
                raise LoRAError(f"cannot read LoRA file {source}: {exc}") from exc
        else:
            sd = dict(source)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in sd.items():
            module, _, suffix = key.partition(".")
            grouped.setdefault(self._aliases.get(module, module), {})[suffix] = value
        unknown = sorted(n for n in grouped if n not in self.loras)
        if unknown and strict:
            raise LoRAError(
                f"{len(unknown)} LoRA modules in the file have no counterpart in this network, e.g. {unknown[:3]} "
                f"(network: rank {self.rank}, conv_rank {self.conv_rank}, train_te {self.train_te}); "
                "create the network with matching conv_rank/train_te, or pass strict=False to skip them"
            )
        loaded = []
        for name, parts in grouped.items():
            if name not in self.loras:
                continue
            lora = self.loras[name]
            extra = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
            if extra or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise LoRAError(
                    f"{name}: unsupported LoRA tensors {sorted(parts)} (only plain LoRA/LoCon is supported)"
                )
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            if down.shape[0] != lora.rank:
                raise LoRAError(
                    f"rank mismatch for {name}: the file has rank {down.shape[0]}, the network rank {lora.rank}; "
                    f"create LoRANetwork with rank={down.shape[0]} (conv_rank / te_rank for conv / text modules)"
                )
            if down.shape != lora.lora_down.weight.shape or up.shape != lora.lora_up.weight.shape:
                raise LoRAError(
                    f"shape mismatch for {name}: file {tuple(down.shape)}/{tuple(up.shape)}, network "
                    f"{tuple(lora.lora_down.weight.shape)}/{tuple(lora.lora_up.weight.shape)} (LoRA of another base?)"
                )
            with torch.no_grad():
                lora.lora_down.weight.copy_(down.to(lora.lora_down.weight))
                lora.lora_up.weight.copy_(up.to(lora.lora_up.weight))
            lora.set_alpha(parts["alpha"].item() if "alpha" in parts else lora.rank)
            loaded.append(name)
        missing = sorted(set(self.loras) - set(loaded))
        if missing:
            log.warning(
                "LoRA file lacks %d of the network's modules (kept at init), e.g. %s", len(missing), missing[:3]
            )
        return {"loaded": len(loaded), "missing": missing, "unknown": unknown}

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Put the original base modules back; the LoRA weights stay available for export."""
        for parent, child_name, wrapper in reversed(self._wrapped):
            setattr(parent, child_name, wrapper.base)
        self._wrapped.clear()
