"""Adapter types, one module each over a shared base: LoRA/LoCon (DoRA, rsLoRA), LoHa and LoKr."""

from .base import Adapter, compute_dtype
from .loha import LoHaAdapter
from .lokr import LoKrAdapter, factorization
from .lora import LoRAAdapter

ADAPTERS = {"lora": LoRAAdapter, "loha": LoHaAdapter, "lokr": LoKrAdapter}
NETWORK_TYPES = tuple(ADAPTERS)

__all__ = ["ADAPTERS", "NETWORK_TYPES", "Adapter", "LoHaAdapter", "LoKrAdapter", "LoRAAdapter", "compute_dtype",
           "factorization"]
