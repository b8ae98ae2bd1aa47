"""The VRAM estimate (trainer/vram.py): its exact parts equal the bytes counted on the live tensors (tiny model,
CPU), for every optimizer's state; it is stored in the run's meta and the LoRA's metadata; the warning names the
options that would make a run fit."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.model import LoRANetwork
from trainer.optim import OPTIMIZER_INFO, OPTIMIZERS, create_optimizer
from trainer.vram import activation_bytes, optimizer_state_bytes, options_to_fit, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from random_sdxl import SDXL_UNET, TINY_UNET, random_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def lora_params():
    """A tiny UNet's LoRA with LoCon and DoRA: 2-D, 4-D and magnitude tensors of many shapes."""
    unet = random_unet(TINY_UNET, "cpu", torch.float32)
    net = LoRANetwork(SimpleNamespace(unet=unet, te1=torch.nn.Module(), te2=torch.nn.Module()), 4, 4, conv_rank=2,
                      dora=True)
    return net.trainable_parameters()


@pytest.mark.parametrize("name", ["AdamW", *OPTIMIZERS])
def test_optimizer_state_bytes_equal_the_live_state(name, lora_params):
    lr = OPTIMIZER_INFO[name].recommended_lr if name in OPTIMIZER_INFO else 1e-4
    params = [torch.nn.Parameter(p.detach().clone()) for p in lora_params]

    def make(ps):
        return create_optimizer(name, ps, lr=lr)

    estimated = optimizer_state_bytes(make, params)
    opt = make(params)
    g = torch.Generator().manual_seed(0)
    for loss in (1.0, 0.9, 0.8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step(**({"loss": loss} if name != "AdamW" else {}))
    def live():
        return nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))

    if hasattr(opt, "build_full_state"):  # EmoClan: a phase's state arrives when the loss first picks it
        assert 0 < live() <= estimated
        opt.build_full_state()
    assert estimated == live() and (live() > 0 or name == "EmoVoid")  # EmoVoid keeps no tensor state


def test_trainer_estimate_parts_are_the_live_bytes(tmp_path):
    from _trainer_helpers import lora_tensors, tiny_config

    from trainer.runstore import RunReader
    from trainer.train import Trainer

    t = Trainer(tiny_config(tmp_path, steps=2, optimizer="EmoNavi", gradient_checkpointing=True))
    t.setup()
    est, run = t.vram_estimate, t.built
    parts = est["parts"]
    m = run.model
    frozen = [x for net in (m.unet, m.te1, m.te2, m.vae) for x in (*net.parameters(), *net.buffers())]
    assert parts["weights_on_device"] == nbytes(frozen)  # the CPU run: everything is on its device
    assert est["weights"]["unet"] == {"device:float32": nbytes([*m.unet.parameters(), *m.unet.buffers()])}
    assert parts["adapter_params"] == parts["adapter_grads"] == nbytes(run.params)
    assert parts["caches_on_device"] == run.data.latent_cache.nbytes() + run.data.text_cache.nbytes() > 0
    assert parts["offload_working_set"] == 0 and parts["activations_model"] > 0
    t.run()
    state = [v for st in run.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert parts["optimizer_state"] == nbytes(state)
    assert parts["rollback_copy"] == t._guard.last_good.nbytes_on("cpu") == nbytes(run.params) + nbytes(state)
    assert est["total"] == sum(parts.values())
    reader = RunReader(t.run_dir)
    assert reader.meta()["vram_estimate"]["total"] == est["total"]
    reader.close()
    t.close()
    from safetensors import safe_open

    with safe_open(t.cfg.output, "pt") as f:
        assert float(f.metadata()["emolora_vram_estimate_mb"]) == round(est["total"] / 2**20, 1)
    assert lora_tensors(t.cfg.output)


def test_offloaded_blocks_working_set(tmp_path):
    """On the CPU the offloaded blocks stay on the run's device (counted as weights, no working set on top); the
    working set a GPU run adds is a block and its neighbour, counted on the live tensors."""
    from _trainer_helpers import tiny_config

    from trainer.offload import unet_blocks
    from trainer.train import Trainer

    t = Trainer(tiny_config(tmp_path, steps=1, offload="blocks", gradient_checkpointing=True))
    t.setup()
    sizes = [nbytes([*b.parameters(), *b.buffers()]) for _, b in unet_blocks(t.model.unet)]
    assert t.built.offload.streamed_peak_bytes() == max(a + b for a, b in zip(sizes, sizes[1:]))
    assert t.built.offload.host_bytes() == sum(sizes)
    assert t.vram_estimate["parts"]["offload_working_set"] == 0
    assert t.vram_estimate["parts"]["weights_on_device"] >= sum(sizes)
    t.close()
    t.release()


def test_activation_model_scales_with_pixels_batch_and_checkpointing():
    one = activation_bytes(SDXL_UNET, 1024, 1, True, 2)
    assert activation_bytes(SDXL_UNET, 512, 1, True, 2) == pytest.approx(one / 4, rel=0.01)
    assert activation_bytes(SDXL_UNET, 1024, 2, True, 2) == pytest.approx(2 * one, rel=0.01)
    assert activation_bytes(SDXL_UNET, 1024, 1, False, 2) > 5 * one
    assert activation_bytes(SDXL_UNET, 1024, 1, True, 4) == 2 * one


def test_warning_names_what_would_fit():
    from trainer.config import TrainConfig

    cfg = TrainConfig(gradient_checkpointing=False, batch_size=2, cache_text="off", base_dtype="bf16")
    gib = 2**30
    est = {"device": "cuda:0", "total": 12 * gib, "free": 5 * gib, "held": 6 * gib, "fits": False,
           "weights": {"unet": {"device:bfloat16": 5 * gib}, "te1": {"device:bfloat16": gib // 4}},
           "parts": {"weights_on_device": 5.25 * gib, "rollback_copy": gib // 2, "activations_model": 5 * gib}}
    line, warning = report(cfg, est)
    assert line.startswith("VRAM estimate on cuda:0: 12.00 GiB") and "5.00 GiB free" in line
    assert "about 1.00 GiB short" in warning
    for option in ("base_dtype=fp8 (about -2.5 GiB)", "offload=blocks", "cache_text=memory",
                   "gradient_checkpointing=true", "rollback_on_host=true", "batch_size=1", "a lower resolution"):
        assert option in warning
    low = cfg.replace(base_dtype="fp8", offload="blocks", gradient_checkpointing=True, batch_size=1,
                      rollback_on_host=True, resolution=768, cache_text="memory")
    assert options_to_fit(low, {**est, "parts": {**est["parts"], "rollback_copy": 0}}) == []
    assert report(cfg, {**est, "fits": True})[1] is None


def test_low_vram_presets():
    """8gb/6gb/4gb: fp8 base, batch 1, checkpointing, latents and text outputs cached (encoders off the GPU), and
    more offloading and host-side copies the smaller the card."""
    from trainer.config import build_config

    expect = {"8gb": ("none", False), "6gb": ("blocks:3", True), "4gb": ("blocks", True)}
    for name, (offload, on_host) in expect.items():
        cfg = build_config(presets=[name], overrides={"model": "m", "data": "d", "output": "o.safetensors"})
        assert (cfg.base_dtype, cfg.batch_size, cfg.gradient_checkpointing) == ("fp8", 1, True), name
        assert cfg.cache_latents != "off" and cfg.cache_text != "off" and not cfg.train_text_encoder, name
        assert (cfg.offload, cfg.rollback_on_host) == (offload, on_host), name
