"""One model load and one feature cache for all the runs of a sweep.

SharedModel keeps what the first run loaded and encoded: the model (frozen, prepared) and, per seed, the
training data with its filled caches, the fixed evaluation batch and the validation batches (the held-out
split and the data order depend on the seed; the latents and text embeddings are keyed by content, so a new
seed only re-assembles batches from the same caches). SweepTrainer is an ordinary Trainer whose load/build
seams return those, and whose release() takes its adapters out of the model again, so the next run starts from
the pristine model exactly as a fresh `trainer train` would.
"""

from __future__ import annotations

import logging

from .. import build
from ..data import TrainingData
from ..placement import offload_cached_encoders, onload
from ..train import Trainer

log = logging.getLogger("emolora.sweep")


class SharedModel:
    def __init__(self):
        self.loaded = None  # LoadedModel of the first run
        self.loads = 0  # checkpoint loads (1 for a whole sweep)
        self.first_data = None  # the first TrainingData: its caches serve every seed
        self.data: dict = {}  # seed -> (TrainingData, eval batch)
        self.validation: dict = {}  # seed -> validation batches

    def release(self) -> None:
        self.loaded, self.first_data = None, None
        self.data.clear()
        self.validation.clear()


class SweepTrainer(Trainer):
    def __init__(self, config, shared: SharedModel, **kw):
        super().__init__(config, **kw)
        self.shared = shared

    def setup(self):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # each row's peak is its own run's (the model stays resident)
        return super().setup()

    def load_model(self, rt):
        if self.shared.loaded is None:
            self.shared.loaded = super().load_model(rt)
            self.shared.loads += 1
        return self.shared.loaded

    def build_data(self, rt, loaded, items):
        sh, seed = self.shared, self.cfg.seed
        if seed not in sh.data:
            if sh.first_data is None:
                sh.data[seed] = super().build_data(rt, loaded, items)
                sh.first_data = sh.data[seed][0]
            else:
                sh.data[seed] = self._data_from_caches(rt, loaded, items)
        data, eval_batch = sh.data[seed]
        self.store.set_meta(buckets={f"{w}x{h}": n for (w, h), n in data.bucket_counts().items()},
                            batches_per_epoch=len(data))
        return data, eval_batch

    def _data_from_caches(self, rt, loaded, items):
        """This seed's data over the first data's caches (what build.build_data makes, without new caches)."""
        first, m = self.shared.first_data, loaded.model
        data = TrainingData(items, self.cfg, encode_images=first.encode_images, encode_text=first.encode_text,
                            model_hash=first.model_hash, latent_cache=first.latent_cache, text_cache=first.text_cache,
                            vae_dtype=first.vae_dtype, te_dtype=first.te_dtype)
        onload(rt.device, m.vae, m.te1, m.te2)  # only images this seed trains on and no earlier one did encode
        try:
            data.fill_caches()
            eval_batch = build.make_eval_batch(data, self.cfg.eval_size, m, rt.device) if self.cfg.eval_every else None
        finally:
            offload_cached_encoders(self.cfg, rt.device, m)
        return data, eval_batch

    def build_validation(self, rt, loaded, data, val_items):
        seed = self.cfg.seed
        if seed not in self.shared.validation:
            self.shared.validation[seed] = super().build_validation(rt, loaded, data, val_items)
        return self.shared.validation[seed]

    def _build_training(self, *args, **kw):
        try:
            return super()._build_training(*args, **kw)
        except BaseException:
            strip_adapters(self.shared.loaded.model)  # injected before the failure: the next run needs it bare
            raise

    def release(self) -> None:
        """Take this run's adapters out of the shared model; drop the LoRA and the optimizer."""
        if self.built is not None:
            self.built.network.remove()
        super().release()


def strip_adapters(model) -> int:
    """Put back every base module a LoRA wrapper stands in for (a run that failed mid-setup has no network
    object to call remove() on). -> how many."""
    from ..model.lora import LoRAWrapper

    n = 0
    for net in (model.unet, model.te1, model.te2):
        for parent in list(net.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoRAWrapper):
                    setattr(parent, child_name, child.base)
                    n += 1
    return n
