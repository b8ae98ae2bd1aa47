import math

import numpy as np
import pytest
from _trainer_helpers import photo

from trainer.data import BucketBatchSampler, apply_crop, assign_bucket, make_buckets, plan_crop, process_caption


def test_buckets_are_kohya_like_at_sdxl_resolution():
    buckets = make_buckets(1024, step=64)
    assert (1024, 1024) in buckets and (896, 1152) in buckets and (1152, 896) in buckets
    assert (512, 2048) in buckets and (2048, 512) in buckets  # default sides resolution/2 .. 2*resolution
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 1024 * 1024
        assert (h, w) in buckets
        assert 512 <= min(w, h) and max(w, h) <= 2048
    # each width appears once per orientation: the largest height that fits the area
    assert len({w for w, _ in buckets}) == len(buckets)


def test_bucket_limits_and_validation():
    assert make_buckets(128, step=32) == sorted(make_buckets(128, step=32))
    assert make_buckets(128, step=32, min_side=128, max_side=128) == [(128, 128)]
    with pytest.raises(ValueError, match="multiples"):
        make_buckets(1000, step=64)


def test_assignment_by_aspect_ratio():
    buckets = make_buckets(1024, step=64)
    assert assign_bucket((3000, 3000), buckets) == (1024, 1024)
    w, h = assign_bucket((1920, 1080), buckets)
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.08
    assert assign_bucket((100, 10000), buckets) == (512, 2048)  # extreme ratios go to the extreme bucket


def test_crop_plan_and_time_ids():
    c = plan_crop((300, 200), (128, 64))  # cover 128x64: scale max(128/300, 64/200) -> 128x85
    assert c.resized == (128, 85) and c.left == 0 and c.top == (85 - 64) // 2
    assert c.time_ids == (200, 300, c.top, 0, 64, 128)  # (orig_h, orig_w, top, left, target_h, target_w)
    img = apply_crop(photo((300, 200)), c)
    assert img.size == (128, 64)


def test_flip_mirrors_the_crop_left_edge_and_the_pixels():
    src = photo((200, 100), 3)
    c = plan_crop(src.size, (64, 64), rng=np.random.default_rng(0))
    f = plan_crop(src.size, (64, 64), flip=True, rng=np.random.default_rng(0))
    assert (c.left, c.top) == (f.left, f.top)
    assert f.time_ids[3] == f.resized[0] - (f.left + 64)
    a, b = np.asarray(apply_crop(src, c)), np.asarray(apply_crop(src, f))
    assert np.array_equal(a[:, ::-1], b)


def test_random_crop_is_reproducible_from_its_generator():
    a = [plan_crop((500, 300), (64, 64), rng=np.random.default_rng(5)).left for _ in range(3)]
    assert len(set(a)) == 1
    lefts = {plan_crop((500, 300), (64, 64), rng=np.random.default_rng(s)).left for s in range(20)}
    assert len(lefts) > 5


def test_sampler_groups_by_bucket_and_is_a_function_of_seed_and_epoch():
    buckets = [0, 0, 1, 1, 1, 2]
    repeats = [1, 2, 1, 1, 3, 1]
    s = BucketBatchSampler(buckets, repeats, batch_size=2, seed=7)
    e0 = s.epoch(0)
    assert len(e0) == len(s) == 2 + 3 + 1
    flat = sorted(i for b in e0 for i in b)
    assert flat == sorted(i for i, r in enumerate(repeats) for _ in range(r))  # repeats honoured
    for b in e0:
        assert len({buckets[i] for i in b}) == 1
    assert BucketBatchSampler(buckets, repeats, 2, seed=7).epoch(0) == e0
    assert s.epoch(1) != e0 or s.epoch(2) != e0


def test_caption_processing_keeps_tokens_and_is_seeded():
    cap = "sks, red hair, smiling, outdoors, sunset"
    out = process_caption(cap, np.random.default_rng(1), shuffle=True, keep_tokens=1)
    assert out.startswith("sks, ") and sorted(out.split(", ")) == sorted(cap.split(", "))
    again = process_caption(cap, np.random.default_rng(1), shuffle=True, keep_tokens=1)
    assert out == again
    views = {process_caption(cap, np.random.default_rng(s), shuffle=True, keep_tokens=1) for s in range(30)}
    assert len(views) > 5 and all(v.startswith("sks, ") for v in views)
    assert process_caption(cap, np.random.default_rng(0), caption_dropout=0.999999) == ""
    dropped = process_caption(cap, np.random.default_rng(0), keep_tokens=1, tag_dropout=0.999999)
    assert dropped == "sks"
    assert process_caption(cap, np.random.default_rng(0)) == cap
