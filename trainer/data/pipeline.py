"""Dataset items -> training batches: buckets, crop plans, cache filling and per-batch augmentation.

Randomness per batch comes from a generator seeded by (seed, epoch, batch index), so a resumed run draws
the same flips, crops and caption views as an uninterrupted one without saving any generator state.
"""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .buckets import apply_crop, assign_bucket, make_buckets, plan_crop
from .cache import FeatureCache, latent_key, text_key
from .captions import process_caption
from .images import load_image, to_tensor_array
from .masks import LATENT_CELL, latent_mask, read_mask
from .sampler import BucketBatchSampler

log = logging.getLogger("emolora.data")

TEXT_BATCH = 8


@dataclass
class Batch:
    indices: list  # dataset item indices
    captions: list  # the caption views used (after shuffle/dropout)
    latents: torch.Tensor  # (B, 4, h, w), already scaled by the VAE factor
    time_ids: torch.Tensor  # (B, 6) float32: SDXL's add_time_ids
    prompt_embeds: torch.Tensor | None = None  # (B, 77, 2048) when text-encoder outputs are cached
    pooled: torch.Tensor | None = None  # (B, 1280)
    mask: torch.Tensor | None = None  # (B, 1, h, w) loss weights on the latent grid, when any item has a mask
    weights: torch.Tensor | None = None  # (B,) per-sample loss weights (prior_loss_weight on reg images), if any
    offset: int = 0  # under several ranks: this shard's first row in the global batch (trainer/distributed.py)
    global_rows: int | None = None  # rows of the whole global batch; None: this batch is the whole of it


class TrainingData:
    """Items + options (a TrainConfig, read by attribute) + the two encoders -> batches by (epoch, index).

    encode_images(pixels (B,3,H,W) in [-1,1], float32, CPU; seed) -> latents; encode_text(list of str) ->
    (prompt_embeds, pooled). Either cache may be None (encode every step).
    """

    def __init__(self, items, cfg, *, encode_images: Callable, encode_text: Callable, model_hash: str,
                 latent_cache: FeatureCache | None = None, text_cache: FeatureCache | None = None,
                 vae_dtype=torch.float32, te_dtype=torch.float32):
        self.items = list(items)
        self.cfg = cfg
        self.encode_images, self.encode_text = encode_images, encode_text
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.model_hash, self.vae_dtype, self.te_dtype = model_hash, vae_dtype, te_dtype
        res = cfg.resolution
        if cfg.enable_buckets:
            self.buckets = make_buckets(res, step=cfg.bucket_step, min_side=cfg.bucket_min_side,
                                        max_side=cfg.bucket_max_side)
        else:
            self.buckets = [(res, res)]
        self.bucket_of = [assign_bucket(it.size, self.buckets) for it in self.items]
        ids = {b: i for i, b in enumerate(self.buckets)}
        self.sampler = BucketBatchSampler([ids[b] for b in self.bucket_of], [it.repeats for it in self.items],
                                          cfg.batch_size, cfg.seed)
        self._epoch_cache: tuple = (None, [])
        self._masks: dict = {}  # (item, crop) -> latent-grid mask: read once, small

    def __len__(self) -> int:
        return len(self.sampler)

    def bucket_counts(self) -> dict:
        counts: dict = {}
        for b in self.bucket_of:
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    # ---- caches --------------------------------------------------------------------------------------
    def _latent_key(self, i: int, crop) -> str:
        return latent_key(self.items[i].sha256, crop, self.model_hash, self.vae_dtype)

    def _text_key(self, caption: str) -> str:
        return text_key(caption, self.model_hash, self.te_dtype)

    def fill_caches(self, progress: Callable | None = None) -> dict:
        """Encode whatever the caches lack; progress(kind, done, total). Returns counts of encoded entries."""
        encoded = {"latents": 0, "text": 0}
        if self.latent_cache is not None:
            flips = (False, True) if self.cfg.flip_aug else (False,)
            todo = []
            for i, it in enumerate(self.items):
                for flip in flips:
                    crop = plan_crop(it.size, self.bucket_of[i], flip=flip)
                    if self._latent_key(i, crop) not in self.latent_cache:
                        todo.append((i, crop))
            todo.sort(key=lambda t: (t[1].bucket, t[0], t[1].flip))  # a VAE batch needs one size
            bs = max(1, self.cfg.vae_batch_size)
            chunks = []
            for i, crop in todo:
                if chunks and len(chunks[-1]) < bs and chunks[-1][0][1].bucket == crop.bucket:
                    chunks[-1].append((i, crop))
                else:
                    chunks.append([(i, crop)])
            for chunk in chunks:
                latents = self._encode_pixels([i for i, _ in chunk], [c for _, c in chunk])
                for (i, crop), lat in zip(chunk, latents):
                    self.latent_cache.put(self._latent_key(i, crop), {"latents": lat})
                encoded["latents"] += len(chunk)
                if progress:
                    progress("latents", encoded["latents"], len(todo))
        if self.text_cache is not None:
            captions = sorted({it.caption for it in self.items})
            todo = [c for c in captions if self._text_key(c) not in self.text_cache]
            for k in range(0, len(todo), TEXT_BATCH):
                chunk = todo[k:k + TEXT_BATCH]
                embeds, pooled = self.encode_text(chunk)
                for c, e, p in zip(chunk, embeds, pooled):
                    self.text_cache.put(self._text_key(c), {"prompt_embeds": e, "pooled": p})
                encoded["text"] += len(chunk)
                if progress:
                    progress("text", encoded["text"], len(todo))
        return encoded

    def _encode_pixels(self, indices, crops) -> torch.Tensor:
        pixels, keys = [], []
        for i, crop in zip(indices, crops):
            img, _ = load_image(self.items[i].image.read_bytes())
            pixels.append(torch.from_numpy(to_tensor_array(apply_crop(img, crop))))
            keys.append(self._latent_key(i, crop))
        # The VAE samples its posterior: seed that draw by content, so a latent never depends on what was
        # encoded before it (same cache after a restart, same batch after a resume).
        seed = int(hashlib.sha256("".join(keys).encode()).hexdigest()[:15], 16)
        return self.encode_images(torch.stack(pixels), seed)

    # ---- batches -------------------------------------------------------------------------------------
    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch`, with that batch's augmentation draws."""
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.sampler.epoch(epoch))
        indices = self._epoch_cache[1][index]
        rng = np.random.default_rng([self.cfg.seed, epoch, index, 1])
        cfg = self.cfg
        crops = []
        for i in indices:
            flip = bool(cfg.flip_aug and rng.random() < 0.5)
            random_crop = cfg.random_crop and self.latent_cache is None
            crops.append(plan_crop(self.items[i].size, self.bucket_of[i], flip=flip,
                                   rng=rng if random_crop else None))
        captions = [self.items[i].caption for i in indices]
        if self.text_cache is None:
            captions = [process_caption(c, rng, shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                        separator=cfg.caption_separator, tag_dropout=cfg.tag_dropout,
                                        caption_dropout=cfg.caption_dropout) for c in captions]
        batch = self._assemble(indices, crops, captions)
        if any(self.items[i].is_reg for i in indices):  # kohya: a reg sample's loss x prior_loss_weight
            w = float(getattr(cfg, "prior_loss_weight", 1.0))
            batch.weights = torch.tensor([w if self.items[i].is_reg else 1.0 for i in indices])
        return batch

    def fixed_batches(self, batch_size: int) -> list[Batch]:
        """Every item once, centred and unaugmented, in batches of one bucket each (the validation set)."""
        out = []
        for bucket in sorted(set(self.bucket_of)):
            members = [i for i, b in enumerate(self.bucket_of) if b == bucket]
            for k in range(0, len(members), max(1, batch_size)):
                chunk = members[k:k + max(1, batch_size)]
                crops = [plan_crop(self.items[i].size, bucket) for i in chunk]
                out.append(self._assemble(chunk, crops, [self.items[i].caption for i in chunk]))
        return out

    def fixed_batch(self, n: int) -> Batch:
        """A fixed evaluation batch: up to n training items (never regularization images) of the most populated
        bucket, centred, unaugmented."""
        train = [i for i, it in enumerate(self.items) if not it.is_reg]
        counts: dict = {}
        for i in train:
            counts[self.bucket_of[i]] = counts.get(self.bucket_of[i], 0) + 1
        bucket = max(counts, key=lambda b: (counts[b], b))
        indices = [i for i in train if self.bucket_of[i] == bucket][:max(1, n)]
        crops = [plan_crop(self.items[i].size, bucket) for i in indices]
        return self._assemble(indices, crops, [self.items[i].caption for i in indices])

    def _assemble(self, indices, crops, captions) -> Batch:
        if self.latent_cache is not None:
            latents = []
            for i, crop in zip(indices, crops):
                entry = self.latent_cache.get(self._latent_key(i, crop))
                if entry is None:  # e.g. a disk entry deleted while training: encode it now
                    lat = self._encode_pixels([i], [crop])[0]
                    self.latent_cache.put(self._latent_key(i, crop), {"latents": lat})
                    entry = {"latents": lat.to(self.latent_cache.device)}  # where the other entries are
                latents.append(entry["latents"])
            latents = torch.stack(latents)
        else:
            latents = self._encode_pixels(indices, crops)
        time_ids = torch.tensor([c.time_ids for c in crops], dtype=torch.float32)
        batch = Batch(list(indices), list(captions), latents, time_ids, mask=self._batch_mask(indices, crops))
        if self.text_cache is not None:
            embeds, pooled = [], []
            for c in captions:
                entry = self.text_cache.get(self._text_key(c))
                if entry is None:
                    e, p = self.encode_text([c])
                    entry = {"prompt_embeds": e[0], "pooled": p[0]}
                    self.text_cache.put(self._text_key(c), entry)
                    entry = {k: v.to(self.text_cache.device) for k, v in entry.items()}  # beside the others
                embeds.append(entry["prompt_embeds"])
                pooled.append(entry["pooled"])
            batch.prompt_embeds, batch.pooled = torch.stack(embeds), torch.stack(pooled)
        return batch

    def _batch_mask(self, indices, crops) -> torch.Tensor | None:
        if all(self.items[i].mask is None for i in indices):
            return None
        masks = []
        for i, crop in zip(indices, crops):
            it = self.items[i]
            if it.mask is None:
                bw, bh = crop.bucket
                masks.append(torch.ones(1, bh // LATENT_CELL, bw // LATENT_CELL))
                continue
            if (i, crop) not in self._masks:
                self._masks[(i, crop)] = latent_mask(read_mask(it.mask, it.mask_channel, it.size), crop)
            masks.append(self._masks[(i, crop)])
        return torch.stack(masks)
