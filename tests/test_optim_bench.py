"""The optimizer benchmark runs end to end (quick mode) and every optimizer of ours keeps <= 1 host sync per step.

A behaviour check only: timings are printed by the benchmark, never asserted.
"""

import torch

from trainer.optim import OPTIMIZERS
from trainer.optim.bench import EXPECTED_MODULES, EXPECTED_PARAMS_R16, SyncCounter, lora_shapes, run


def test_lora_shapes_match_kohya_sdxl_unet():
    targets, shapes = lora_shapes(16)
    assert len(targets) == EXPECTED_MODULES
    assert len(shapes) == 2 * EXPECTED_MODULES
    assert sum(a * b for _, (a, b) in shapes) == EXPECTED_PARAMS_R16


def test_sync_counter_counts_host_transfers_and_restores():
    t = torch.ones(3)
    with SyncCounter() as c:
        float(t.sum())
        t.sum().item()
        t.tolist()
        bool(t[0] > 0)
    assert c.count == 4
    assert "item" not in torch.Tensor.__dict__ and "__float__" not in torch.Tensor.__dict__


def test_bench_quick_covers_all_and_syncs_at_most_one():
    data = run(quick=True, steps=2, passes=1, threads=1, external=False, foreach_compare=False, out=None)
    rows = {r["label"]: r for r in data["results"]}
    assert set(OPTIMIZERS) <= set(rows)
    for name in OPTIMIZERS:
        assert rows[name]["ms"] is not None and rows[name]["ms"] > 0
    ours = [r for r in data["results"] if r["ours"]]
    assert ours
    for r in ours:
        assert r["syncs_per_step"] is not None, r["label"]
        assert r["syncs_per_step"] <= 1, (r["label"], r["sync_methods"])
        # a 0-dim tensor loss costs at most the one float(loss) more
        assert r["syncs_tensor_loss"] <= r["syncs_per_step"] + 1, r["label"]
