"""Memory caches kept on the accelerator (FeatureCache.move_to): batches are stacked there, entries encoded later
join them there. The 'meta' device stands in for a GPU (same code path, no data)."""

import torch
from _trainer_helpers import make_dataset
from test_data_cache import FakeEncoders, build, cfg

from trainer.build import keep_caches_on_device
from trainer.data import FeatureCache, scan_dataset


def test_moved_caches_give_batches_on_that_device(tmp_path):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=4))
    enc = FakeEncoders()
    lat, txt = FeatureCache("memory"), FeatureCache("memory")
    data = build(items, cfg(), enc, lat, txt)
    data.fill_caches()
    on_cpu = data.batch(0, 0)
    assert lat.nbytes() > 0 and txt.nbytes() > 0
    lat.move_to("meta")
    txt.move_to("meta")
    b = data.batch(0, 0)
    assert b.latents.device.type == b.prompt_embeds.device.type == b.pooled.device.type == "meta"
    assert b.latents.shape == on_cpu.latents.shape and b.indices == on_cpu.indices
    # An entry encoded after the move (here: one dropped from the cache) lands beside the others.
    key = next(iter(lat._mem))
    del lat._mem[key]
    for e in range(2):
        for i in range(len(data)):
            assert data.batch(e, i).latents.device.type == "meta"
    assert lat._mem[key]["latents"].device.type == "meta"


def test_caches_stay_in_host_memory_off_cuda():
    c = FeatureCache("memory")
    c.put("k", {"x": torch.ones(3)})
    assert keep_caches_on_device(torch.device("cpu"), c, None) is False and c.device.type == "cpu"
