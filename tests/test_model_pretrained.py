"""The pretrained tiny base: built into the cache, loaded like any checkpoint, and its per-step training loss
varies with the timestep like a trained diffusion model's (the random tiny model's hardly does)."""

import os
import statistics

import pytest
import torch
from safetensors.torch import load_file

from trainer.model import clip_tokenizers, load_sdxl, pretrained_tiny_model_path, tiny_model_path
from trainer.model import pretrained as P
from trainer.model import sdxl_keys as K

pytestmark = pytest.mark.usefixtures("one_thread")


def test_built_on_first_use_in_the_cache_loaded_like_any_checkpoint_and_rebuilt_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "STEPS", 2)  # the recipe's steps do not matter here, only the caching and the file
    path = pretrained_tiny_model_path()
    assert path == os.path.join(str(tmp_path), "models", f"{P.PRETRAINED_VERSION}.safetensors")
    assert os.path.isdir(os.path.join(clip_tokenizers.sidecar_dir(path), "tokenizer_2"))
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]

    tiny, pre = load_file(tiny_model_path()), load_file(path)
    assert tiny_model_path().startswith(str(tmp_path))
    assert pre.keys() == tiny.keys()
    assert all(pre[k].dtype == tiny[k].dtype == torch.float16 for k in tiny)
    unet = [k for k in tiny if k.startswith(K.UNET_PREFIX)]
    changed = [k for k in unet if not torch.equal(pre[k], tiny[k])]
    assert len(changed) > 0.9 * len(unet)  # a full fine-tune: nearly every UNet tensor moved in 2 AdamW steps
    assert all(torch.equal(pre[k], tiny[k]) for k in tiny if not k.startswith(K.UNET_PREFIX))  # TEs, VAE kept
    model = load_sdxl(path)
    assert model.arch == load_sdxl(tiny_model_path()).arch and model.prediction_type == "epsilon"

    stamp = os.stat(path).st_mtime_ns
    assert pretrained_tiny_model_path() == path and os.stat(path).st_mtime_ns == stamp  # cached: not rebuilt
    os.remove(path)
    assert pretrained_tiny_model_path() == path and os.path.isfile(path)  # missing: rebuilt


def _step_loss_cv(model: str, tmp_path, name: str) -> float:
    """CV of the per-step loss the optimizer is handed: AdamW at a negligible LR (the base's loss, not learning),
    batch 2, random timesteps, the demo photos at 64 px."""
    from trainer.config import TrainConfig
    from trainer.data.demo import demo_dataset, demo_root
    from trainer.runstore import RunReader
    from trainer.train import train

    cfg = TrainConfig(model=model, data=str(demo_dataset(demo_root())), output=str(tmp_path / name / "l.safetensors"),
                      resolution=64, bucket_step=32, rank=4, batch_size=2, steps=32, seed=1, optimizer="AdamW",
                      lr=1e-6, gradient_checkpointing=False, device="cpu", save_dtype="fp32").validate()
    result = train(cfg)
    reader = RunReader(result.run_dir)
    try:
        losses = [r["loss"] for r in reader.steps(since=0)]
    finally:
        reader.close()
    assert len(losses) == 32
    return statistics.pstdev(losses) / statistics.mean(losses)


def test_its_loss_varies_with_the_timestep_like_a_trained_models(tmp_path):
    # Measured (docs/sweep-surfaces.md): random ~0.05-0.07, pretrained ~1 at these settings.
    random_cv = _step_loss_cv(tiny_model_path(), tmp_path, "random")
    pretrained_cv = _step_loss_cv(pretrained_tiny_model_path(), tmp_path, "pretrained")
    assert random_cv < 0.15
    assert pretrained_cv > 0.5 and pretrained_cv > 5 * random_cv
