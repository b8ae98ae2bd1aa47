"""LoRA-family networks (LoRA/LoCon with DoRA or rsLoRA, LoHa, LoKr) and OFT/BOFT injected into the diffusers SDXL UNet
(and optionally both CLIPs).

Targets follow kohya's networks.lora for SDXL: every Linear / 1x1 Conv inside Transformer2DModel
(attn1/attn2 q,k,v,out, ff.net.0.proj, ff.net.2, proj_in, proj_out: 722 modules on SDXL base); with
conv_rank > 0 also ResnetBlock2D/Downsample2D/Upsample2D (3x3 convs get conv_rank, their Linear and
1x1 shortcut get rank, as kohya does); text encoders: CLIPAttention and CLIPMLP linears. The same targets for
every adapter type (adapters/). Modules are named by the ORIGINAL SDXL names (lora_unet_input_blocks_4_1_...),
so exports load in ComfyUI, A1111/Forge, kohya and (LoRA, rsLoRA) diffusers without conversion.

Base modules are swapped for a wrapper in their parent (undone by remove(); meanwhile the host's
state_dict names gain `.base.`). The adapter weights are owned by the network, not the host model, so
host dtype casts, requires_grad_(False), parameters() and state_dict() never include them. They stay
fp32 whatever the base dtype; the forward computes in the autocast (or input) dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..oft_rules import refusal
from . import sdxl_keys as K
from .adapters import ADAPTERS, NETWORK_TYPES, LoRAAdapter
from .convert import canonical_te_name
from .errors import LoRAError

log = logging.getLogger(__name__)

LoRAModule = LoRAAdapter  # the plain LoRA adapter under its earlier name

UNET_TRANSFORMER = {"Transformer2DModel"}
UNET_CONV_BLOCKS = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TE_BLOCKS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}


class LoRAWrapper(nn.Module):
    """Stands in for a base module in its parent: forward = base(x) + lora delta. The LoRA is held
    outside the module registry so the host model's parameters/state_dict stay the base's own."""

    def __init__(self, base: nn.Module, lora):
        super().__init__()
        self.base = base
        object.__setattr__(self, "lora", lora)

    def forward(self, x, *args, **kwargs):
        if self.lora.multiplier == 0:
            return self.base(x, *args, **kwargs)
        return self.lora(self.base, x, args, kwargs, self.training)

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
    """A LoRA-family network over an SDXLModel. Freezes the base networks; only adapter weights require grad.

    network: "lora" (LoCon on convs), "loha" or "lokr"; dora: weight-decomposed (DoRA) adapters; rslora: scale
    alpha / sqrt(rank) instead of alpha / rank; lokr_factor / lokr_full_matrix / lokr_decompose_both: LyCORIS's
    factor (-1: as balanced as the dimension allows), full_matrix and decompose_both for LoKr; tucker: LyCORIS's
    use_tucker, a Tucker core for the k x k conv factors (lora_mid, hada_t1/t2; not LoKr: see lora_file.py);
    network "oft" / "boft": LyCORIS's Diag-OFT / butterfly OFT with rank as LyCORIS's dim (block layout), alpha
    unused; oft_rescale: BOFT's trained per-channel rescale; oft_constraint: must be 0 (see oft_rules.py).
    """

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
        network: str = "lora",
        dora: bool = False,
        rslora: bool = False,
        lokr_factor: int = -1,
        lokr_full_matrix: bool = False,
        lokr_decompose_both: bool = False,
        tucker: bool = False,
        oft_rescale: bool = False,
        oft_constraint: float = 0.0,
    ):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"rank must be >= 1, got {rank}")
        if network not in ADAPTERS:
            raise LoRAError(f"network must be one of {', '.join(NETWORK_TYPES)}, got {network!r}")
        if lokr_factor == 0 or lokr_factor < -1:
            raise LoRAError(f"lokr_factor must be -1 or >= 1, got {lokr_factor}")
        if tucker and network == "lokr":
            raise LoRAError("tucker works with network lora or loha: ComfyUI cannot apply LoKr's Tucker cores")
        why = refusal(network, dora=dora, rslora=rslora, tucker=tucker, dropout=dropout, rescale=oft_rescale,
                      constraint=oft_constraint)
        if why:
            raise LoRAError(why)
        self.oft_rescale = bool(oft_rescale)
        self.network_type, self.dora, self.rslora, self.tucker = network, bool(dora), bool(rslora), bool(tucker)
        self.lokr_options = dict(lokr_factor=int(lokr_factor), lokr_full_matrix=bool(lokr_full_matrix),
                                 lokr_decompose_both=bool(lokr_decompose_both))
        self.steps_before = 0  # steps of a file this network continues (load_network_weights)
        self.weights_source: str | None = None  # that file's name
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
        opts = dict(dropout=dropout, rslora=self.rslora, dora=self.dora, tucker=self.tucker, **self.lokr_options,
                    oft_rescale=self.oft_rescale)
        for name, parent, child_name, base, r, a in targets:
            try:
                lora = ADAPTERS[network](name, base, r, a, **opts)
            except ValueError as e:  # a layer the adapter type cannot take (BOFT's widths, grouped convs)
                raise LoRAError(str(e)) from None
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
        """Adapter weights in a stable order: sorted by kohya name, each module's factors in export order
        (LoRA: down before up), then DoRA's magnitude."""
        return [p for name in sorted(self.loras) for p in self.loras[name].trainable()]

    def param_groups(self, unet_lr: float, te_lr=None) -> list[dict]:
        """Optimizer param groups: UNet, TE1, TE2 (te_lr: one value, a (te1, te2) pair, or None = unet_lr)."""
        te_lrs = (te_lr, te_lr) if te_lr is None or isinstance(te_lr, (int, float)) else tuple(te_lr)
        spec = (("unet", "lora_unet_", unet_lr), ("te1", "lora_te1_", te_lrs[0]), ("te2", "lora_te2_", te_lrs[1]))
        groups = []
        for group, prefix, lr in spec:
            params = [p for name in sorted(self.loras) if name.startswith(prefix) for p in self.loras[name].trainable()]
            if params:
                groups.append({"params": params, "lr": unet_lr if lr is None else lr, "name": group})
        return groups

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras.values():
            lora.multiplier = self.multiplier

    # ------------------------------------------------------------------ files
    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """`<name>.<tensor>` in the kohya/LyCORIS layout of the network type, in `dtype`; `<name>.alpha` as a
        0-dim fp32 tensor (kept fp32 so a non-representable alpha such as 0.3 round-trips exactly)."""
        sd = {}
        for name in sorted(self.loras):
            for suffix, t in self.loras[name].export_tensors().items():
                t = t if suffix == "alpha" else t.to("cpu", dtype)
                sd[f"{name}.{suffix}"] = t.contiguous()
        return sd

    def load_weights(self, source, *, strict: bool = True) -> dict:
        """Continue from a LoRA/LoHa/LoKr/DoRA file (ours, kohya's, LyCORIS's): see lora_file.load_network_weights."""
        from .lora_file import load_network_weights

        return load_network_weights(self, source, strict=strict)

    load_kohya = load_weights  # the earlier name

    def alias(self, module: str) -> str:
        """Our module name for a diffusers-spelled kohya name (the name itself otherwise)."""
        return self._aliases.get(module, module)

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Put the original base modules back; the adapter weights stay available for export."""
        for parent, child_name, wrapper in reversed(self._wrapped):
            setattr(parent, child_name, wrapper.base)
        self._wrapped.clear()
