"""UNet block offloading (trainer/offload.py) on the CPU: the hook order in forward and backward (with and without
gradient checkpointing), gradients bit-identical to no offload for every adapter type while dropped weights are
poisoned (NaN), the graph holding no copy of a dropped block, and the Trainer's loss and LoRA unchanged."""

import gc
import math
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config import ConfigError, TrainConfig, offload_block_count
from trainer.model import LoRANetwork
from trainer.offload import BlockOffloader, unet_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from random_sdxl import TINY_UNET, random_unet, synthetic_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ORDER = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]


class PoisonOffloader(BlockOffloader):
    """Real copies on the CPU, and NaN in a dropped block's weights: a use without a fetch shows in the result."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.copies = []  # weakrefs to every device copy made

    def _to_device(self, host):
        c = host.clone()
        self.copies.append((self._fetching, weakref.ref(c)))
        return c

    def _prefetch(self, i):
        self._fetching = self.blocks[i].name if 0 <= i < len(self.blocks) else None
        super()._prefetch(i)

    def _parked(self, host):
        return torch.full_like(host, math.nan) if host.is_floating_point() else torch.zeros_like(host)


def build(checkpointing, network="lora", dora=False, offload=None, count=None, fp8=False):
    unet = random_unet(TINY_UNET, "cpu", torch.float32)
    if fp8:  # the frozen Linear/Conv weights held in float8 with a scale (trainer/model/base_weights.py)
        from trainer.model.base_weights import store_unet

        assert store_unet(unet, torch.float8_e4m3fn, torch.float32) > 0
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    torch.manual_seed(1)
    net = LoRANetwork(SimpleNamespace(unet=unet, te1=torch.nn.Module(), te2=torch.nn.Module()), 4, 4, conv_rank=2,
                      network=network, dora=dora)
    params = net.trainable_parameters()
    with torch.no_grad():  # LoRA up starts at zero: move it so every factor gets a gradient
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    for p in params:
        p.requires_grad_(True)
    off = offload(unet, "cpu", count).attach() if offload else None
    return unet, params, off


def forward(unet):
    lat, tid, emb, pooled = synthetic_batch(2, 64, TINY_UNET)
    out = unet(lat, torch.tensor([10, 500]), encoder_hidden_states=emb,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
    return out.float().pow(2).mean()


def loss_and_grads(unet, params):
    loss = forward(unet)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_hook_order_forward_then_backward_in_reverse(checkpointing):
    unet, params, off = build(checkpointing, offload=PoisonOffloader)
    off.trace = []
    loss = forward(unet)
    fwd = list(off.trace)
    # forward: each block fetched before it runs, the next one prefetched while it runs, dropped after it; the
    # last block stays for the backward
    expect = []
    for i, name in enumerate(ORDER):
        expect += [("forward", name)] + ([("fetch", name)] if i == 0 else []) + (
            [("fetch", ORDER[i + 1])] if i + 1 < len(ORDER) else [])
        if i + 1 < len(ORDER):
            expect.append(("drop", name))
    assert fwd == expect
    assert off.resident() == ["up_blocks.2"]
    off.trace = []
    loss.backward()
    back = [name for event, name in off.trace if event == "backward"]
    assert back == ORDER[-2::-1]  # fetched again in reverse order (recomputation or a saved weight's token)
    drops = [name for event, name in off.trace if event == "drop"]
    assert drops == ORDER[::-1] and off.resident() == []  # every block dropped, the first at the backward's end
    for event, name in off.trace:  # each backward fetch was prefetched by the block after it
        if event == "backward" and name != ORDER[-2]:
            assert off.trace.index(("fetch", name)) < off.trace.index(("backward", name))


@pytest.mark.parametrize("network,dora,checkpointing,fp8", [
    ("lora", False, True, False), ("lora", True, True, False), ("loha", False, True, False),
    ("lokr", False, True, False), ("lora", True, False, False), ("lora", True, True, True),
    ("loha", False, False, True)])
def test_gradients_bit_identical_with_poisoned_dropped_weights(network, dora, checkpointing, fp8):
    ref_loss, ref_grads = loss_and_grads(*build(checkpointing, network, dora, fp8=fp8)[:2])
    unet, params, off = build(checkpointing, network, dora, offload=PoisonOffloader, fp8=fp8)
    loss, grads = loss_and_grads(unet, params)
    assert torch.isfinite(ref_loss) and torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert all(p.device.type == "cpu" and p.grad is not None for p in params)
    # the adapters never moved into the blocks' host storage: no LoRA tensor is among the offloaded slots
    slots = {id(owner._parameters[name]) for b in off.blocks for owner, name, is_param in b.slots if is_param}
    assert not slots & {id(p) for p in params}
    if fp8:  # the blocks' float8 weights and their scales are what moves
        assert any(h.dtype == torch.float8_e4m3fn for b in off.blocks for h in b.host)


@pytest.mark.parametrize("fp8", [False, True])
def test_the_graph_holds_no_copy_of_a_dropped_block(fp8):
    """Without checkpointing every op saves its inputs; the weights among them are tokens, so after the forward
    only the last block's copies (kept for the backward) are alive (fp8: the stored weights the layers save)."""
    unet, params, off = build(False, offload=PoisonOffloader, fp8=fp8)
    loss = forward(unet)
    gc.collect()
    alive = {name for name, ref in off.copies if ref() is not None}
    assert alive == {"up_blocks.2"}
    loss.backward()
    gc.collect()
    assert not any(ref() is not None for _, ref in off.copies)


def test_n_largest_blocks_and_the_rest_stays_put():
    unet, params, off = build(True, offload=PoisonOffloader, count=2)
    sizes = {name: sum(p.numel() for p in b.parameters()) for name, b in unet_blocks(unet)}
    chosen = [b.name for b in off.blocks]
    assert len(chosen) == 2 and min(sizes[n] for n in chosen) >= max(s for n, s in sizes.items() if n not in chosen)
    ref_loss, ref_grads = loss_and_grads(*build(True)[:2])
    loss, grads = loss_and_grads(unet, params)
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert off.streamed_peak_bytes() == sum(b.nbytes for b in off.blocks)
    off.detach()
    assert all(torch.isfinite(p).all() for p in unet.parameters())  # the weights are back, none poisoned


def test_offload_values():
    assert offload_block_count("none") == 0 and offload_block_count("blocks") is None
    assert offload_block_count("blocks:3") == 3
    for bad in ("block", "blocks:0", "blocks:x", "all", ""):
        with pytest.raises(ConfigError, match="offload must be none, blocks or blocks:N"):
            TrainConfig(offload=bad).validate(require_paths=False)
    with pytest.raises(ConfigError, match="offload and compile exclude each other"):
        TrainConfig(offload="blocks", compile=True).validate(require_paths=False)


@pytest.mark.parametrize("base_dtype,offload", [("auto", "blocks"), ("fp8", "blocks:2")])
def test_trainer_offload_on_the_cpu_gives_the_same_loss_and_lora(tmp_path, caplog, base_dtype, offload):
    from _trainer_helpers import lora_tensors, tiny_config

    from trainer.runstore import RunReader
    from trainer.train import train

    results, losses = {}, {}
    for mode in ("none", offload):
        cfg = tiny_config(tmp_path / mode.replace(":", "-"), steps=3, gradient_checkpointing=True, offload=mode,
                          base_dtype=base_dtype)
        with caplog.at_level("WARNING", logger="emolora.train"):
            results[mode] = r = train(cfg)
        reader = RunReader(r.run_dir)
        losses[mode] = [row["loss"] for row in reader.steps()]
        assert reader.meta()["vram_estimate"]["parts"]["adapter_params"] > 0
        reader.close()
    assert "saves nothing here" in caplog.text
    assert losses["none"] == losses[offload] and len(losses["none"]) == 3
    a, b = lora_tensors(results["none"].lora_path), lora_tensors(results[offload].lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_offload_flag_bad_value_is_one_line(tmp_path, capsys):
    from trainer.cli import main

    code = main(["train", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path), "--output",
                 str(tmp_path / "o.safetensors"), "--offload", "blocks:zero", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: offload must be none, blocks or blocks:N (N >= 1 UNet blocks), got 'blocks:zero'"


def test_offload_adds_no_device_read(tmp_path, monkeypatch):
    """The hooks, tokens and fetches read nothing back from the device: still one read per train_step."""
    from _trainer_helpers import tiny_config

    from trainer.optim.bench import syncs
    from trainer.optim.bench.syncs import SyncCounter
    from trainer.train import Trainer

    t = Trainer(tiny_config(tmp_path, steps=10, optimizer="AdamW", offload="blocks", gradient_checkpointing=True,
                            optimizer_args={"fused": True}))
    t.setup()
    for _ in range(2):
        t._after_step(t.train_step())
    monkeypatch.setattr(syncs, "SYNC_METHODS", syncs.SYNC_METHODS + ("cpu", "numpy"))
    with SyncCounter() as c:
        record = t.train_step()
    assert c.count <= 1 and not record["skipped"], dict(c.by_name)
    assert t.built.offload.resident() == []  # every block dropped after the backward
    t.close()
