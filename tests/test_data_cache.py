import hashlib

import pytest
import torch
from _trainer_helpers import make_dataset, write_item

from trainer.config import TrainConfig
from trainer.data import FeatureCache, TrainingData, plan_crop, scan_dataset


class FakeEncoders:
    """Deterministic stand-ins for the VAE and the text encoders that count their calls."""

    def __init__(self):
        self.images = 0
        self.texts = 0

    def encode_images(self, pixels, seed):
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def encode_text(self, captions):
        self.texts += len(captions)
        vals = [int(hashlib.sha256(c.encode()).hexdigest()[:6], 16) / 2**24 for c in captions]
        embeds = torch.tensor(vals)[:, None, None].expand(-1, 77, 16).clone()
        return embeds, embeds[:, 0, :8].clone()


def cfg(**kw):
    base = dict(resolution=64, bucket_step=32, batch_size=2, seed=3, cache_latents="memory", cache_text="memory")
    return TrainConfig(**{**base, **kw})


def build(items, c, enc, lat=None, txt=None):
    return TrainingData(items, c, encode_images=enc.encode_images, encode_text=enc.encode_text, model_hash="m1",
                        latent_cache=lat, text_cache=txt)


def test_memory_cache_encodes_each_image_and_caption_once(tmp_path):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=5, captions=["a", "b", "a", "c", "b"]))
    enc = FakeEncoders()
    lat, txt = FeatureCache("memory"), FeatureCache("memory")
    data = build(items, cfg(), enc, lat, txt)
    assert data.fill_caches() == {"latents": 5, "text": 3}
    assert build(items, cfg(), enc, lat, txt).fill_caches() == {"latents": 0, "text": 0}
    for e in range(2):
        for i in range(len(data)):
            b = data.batch(e, i)
            assert b.latents.shape[0] == len(b.indices) == b.prompt_embeds.shape[0]
    assert (enc.images, enc.texts) == (5, 3)  # batches come from the cache only


def test_disk_cache_survives_and_edits_are_reencoded(tmp_path):
    root = make_dataset(tmp_path / "d", n=4)
    cache_dir = tmp_path / "cache"
    enc = FakeEncoders()

    def fill():
        items, _ = scan_dataset(root)
        d = build(items, cfg(), enc, FeatureCache("disk", cache_dir / "lat"), FeatureCache("disk", cache_dir / "txt"))
        return d, d.fill_caches()

    _, n = fill()
    assert n == {"latents": 4, "text": 4}
    _, n = fill()
    assert n == {"latents": 0, "text": 0}  # a new process would read the same files
    write_item(root, "img01", "a photo of a green blob, soft light", size=(64, 96), seed=99)  # new pixels
    (root / "img02.txt").write_text("an edited caption")
    data, n = fill()
    assert n == {"latents": 1, "text": 1}
    # the batch of the edited image carries the new content, not the stale entry
    i = next(k for k, it in enumerate(data.items) if it.image.stem == "img01")
    crop = plan_crop(data.items[i].size, data.bucket_of[i])
    entry = data.latent_cache.get(data._latent_key(i, crop))
    probe = FakeEncoders()
    fresh = build(data.items, cfg(), probe)._encode_pixels([i], [crop])
    assert probe.images == 1 and torch.equal(entry["latents"], fresh[0])


def test_corrupt_disk_entry_is_reencoded(tmp_path, caplog):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=2))
    enc = FakeEncoders()
    lat = FeatureCache("disk", tmp_path / "c")
    build(items, cfg(cache_text="off"), enc, lat).fill_caches()
    victim = next((tmp_path / "c").rglob("*.safetensors"))
    victim.write_bytes(b"garbage")
    data = build(items, cfg(cache_text="off"), enc, FeatureCache("disk", tmp_path / "c"))
    for i in range(len(data)):
        data.batch(0, i)
    assert enc.images == 3 and "unreadable" in caplog.text


def test_flip_aug_caches_both_orientations_and_batches_are_reproducible(tmp_path):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=4))
    enc = FakeEncoders()
    c = cfg(flip_aug=True, batch_size=1)
    data = build(items, c, enc, FeatureCache("memory"), FeatureCache("memory"))
    assert data.fill_caches()["latents"] == 8
    seen = [data.batch(e, i).latents for e in range(3) for i in range(len(data))]
    again = build(items, c, enc, data.latent_cache, data.text_cache)
    assert all(torch.equal(a, again.batch(e, i).latents)
               for (e, i), a in zip([(e, i) for e in range(3) for i in range(len(data))], seen))
    assert enc.images == 8


def test_uncached_batches_apply_caption_augmentation_per_epoch(tmp_path):
    caps = ["sks, red, blue, green, yellow, pink"] * 2
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=2, sizes=((64, 64),), captions=caps))
    enc = FakeEncoders()
    c = cfg(cache_latents="off", cache_text="off", shuffle_caption=True, keep_tokens=1, random_crop=True,
            batch_size=2)
    data = build(items, c, enc)
    views = {tuple(data.batch(e, 0).captions) for e in range(6)}
    assert len(views) > 1 and all(v.startswith("sks, ") for vs in views for v in vs)
    assert data.batch(4, 0).captions == data.batch(4, 0).captions
    b = data.batch(0, 0)
    assert b.prompt_embeds is None and b.time_ids.shape == (2, 6) and b.latents.shape == (2, 4, 8, 8)


def test_buckets_off_uses_one_square(tmp_path):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=3))
    data = build(items, cfg(enable_buckets=False), FakeEncoders())
    assert data.buckets == [(64, 64)] and set(data.bucket_of) == {(64, 64)}


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_feature_cache_roundtrip(tmp_path, mode):
    cache = FeatureCache(mode, tmp_path if mode == "disk" else None)
    t = {"a": torch.arange(6.0).view(2, 3)}
    assert cache.get("k" * 64) is None and "k" * 64 not in cache
    cache.put("k" * 64, t)
    assert "k" * 64 in cache and torch.equal(cache.get("k" * 64)["a"], t["a"])
