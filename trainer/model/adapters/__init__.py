"""Adapter types, one module each over a shared base: LoRA/LoCon (DoRA, rsLoRA), LoHa, LoKr, OFT and BOFT."""

from .base import Adapter, compute_dtype
from .boft import BOFTAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter, factorization
from .lora import LoRAAdapter
from .oft import OFTAdapter

ADAPTERS = {"lora": LoRAAdapter, "loha": LoHaAdapter, "lokr": LoKrAdapter, "oft": OFTAdapter, "boft": BOFTAdapter}
NETWORK_TYPES = tuple(ADAPTERS)

__all__ = ["ADAPTERS", "NETWORK_TYPES", "Adapter", "BOFTAdapter", "LoHaAdapter", "LoKrAdapter", "LoRAAdapter",
           "OFTAdapter", "compute_dtype", "factorization"]
