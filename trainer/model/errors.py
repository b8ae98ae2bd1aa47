"""Errors raised by the model half of the trainer core."""


class ModelError(ValueError):
    """A base checkpoint cannot be used: missing, corrupt, not SDXL-family, or no tokenizer found."""


class LoRAError(ValueError):
    """A LoRA file does not fit the network it is loaded into (rank, shape or module mismatch)."""


class NonFiniteLoRAError(ValueError):
    """A LoRA with NaN/inf weights: save_lora refuses to write it."""
