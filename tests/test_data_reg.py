"""Regularization (class) images: kohya's balance per epoch, repeats cycling, the prior-loss weight on their
loss, the metadata keys, the errors before the model loads, validation never drawing from them, and a resume
that stays bit-identical with them."""

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _trainer_helpers import lora_tensors, make_dataset, tiny_config, write_item

from trainer.config import TrainConfig, resume_config
from trainer.data import DatasetError, TrainingData, balance_regularization, scan_dataset
from trainer.runstore import RunReader


def reg_folder(root: Path, folders: dict) -> Path:
    """{"<repeats>_<class>": n_images}: kohya's reg layout, images without captions (the class token is theirs)."""
    for name, n in folders.items():
        for i in range(n):
            write_item(root / name, f"r{i}", None, size=(64, 64), seed=100 + i)
    return root


def reg_items(root: Path) -> list:
    return scan_dataset(root)[0]


# ---- the balance --------------------------------------------------------------------------------------------
def test_balance_cuts_a_larger_reg_set_to_the_training_samples(tmp_path):
    items = reg_items(reg_folder(tmp_path / "reg", {"3_person": 5}))  # 15 reg samples with repeats
    used, unused = balance_regularization(items, 7)
    # in path order, each with its folder's 3 repeats, the last cut to fit: 3 + 3 + 1 = 7; two images unused
    assert [it.repeats for it in used] == [3, 3, 1] and unused == 2
    assert [it.image.name for it in used] == ["r0.png", "r1.png", "r2.png"]
    assert all(it.is_reg for it in used) and sum(it.repeats for it in used) == 7


def test_balance_cycles_a_smaller_reg_set_one_repeat_per_image(tmp_path):
    items = reg_items(reg_folder(tmp_path / "reg", {"2_person": 3}))  # 6 reg samples with repeats
    used, unused = balance_regularization(items, 14)
    # first pass 2 + 2 + 2 = 6, then +1 per image round robin: 8 more = two full rounds and two images once more
    assert [it.repeats for it in used] == [2 + 3, 2 + 3, 2 + 2] and unused == 0
    used, _ = balance_regularization(items, 6)
    assert [it.repeats for it in used] == [2, 2, 2]  # an exact fit keeps the folder's repeats


def test_each_epoch_mixes_as_many_reg_samples_as_training_samples(tmp_path):
    train, _ = scan_dataset(make_dataset(tmp_path / "d", n=5, sizes=((64, 64), (96, 64))))  # 5 samples
    regs = reg_items(reg_folder(tmp_path / "reg", {"1_person": 2}))
    used, _ = balance_regularization(regs, 5)
    items = train + used
    cfg = TrainConfig(resolution=64, bucket_step=32, batch_size=2, seed=3, cache_latents="off", cache_text="off",
                      prior_loss_weight=0.25)
    data = TrainingData(items, cfg, encode_images=lambda px, seed: px[:, :4, ::8, ::8],
                        encode_text=lambda c: None, model_hash="m")
    for epoch in (0, 1, 2):
        drawn = Counter(i for b in data.sampler.epoch(epoch) for i in b)
        reg_drawn = sum(n for i, n in drawn.items() if items[i].is_reg)
        assert reg_drawn == 5 == sum(n for i, n in drawn.items() if not items[i].is_reg)
        assert [drawn[i] for i in range(5, 7)] == [3, 2]  # 1 repeat each, then 3 more cycled: 3 and 2
    # the per-sample loss weights of every batch: prior_loss_weight on the reg rows, 1 elsewhere
    seen = set()
    for k in range(len(data)):
        b = data.batch(0, k)
        if any(items[i].is_reg for i in b.indices):
            assert b.weights.tolist() == [0.25 if items[i].is_reg else 1.0 for i in b.indices]
            seen.add("reg")
        else:
            assert b.weights is None
    assert seen == {"reg"}
    assert not any(items[i].is_reg for i in data.fixed_batch(8).indices)  # the eval batch: training images only


def test_prior_loss_weight_scales_each_reg_samples_loss():
    """diffusion_loss with weights: kohya's per-sample mean x weight, then the batch mean (a number check)."""
    from trainer.diffusion import NoiseSchedule, per_sample_loss
    from trainer.losses import diffusion_loss
    from trainer.parts import LoadedModel, Runtime

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    pred = torch.randn(3, 4, 8, 8, generator=g)

    def unet(x, t, **kw):
        return SimpleNamespace(sample=pred)

    run = SimpleNamespace(loaded=LoadedModel(SimpleNamespace(unet=unet), "epsilon", NoiseSchedule()),
                          runtime=Runtime(torch.device("cpu"), "fp32"))
    cfg = TrainConfig(loss_type="l2")
    args = (latents, noise, torch.tensor([10, 500, 900]), torch.zeros(3, 77, 8), torch.zeros(3, 8),
            torch.zeros(3, 6))
    per = per_sample_loss(pred, noise, "l2")
    w = torch.tensor([1.0, 0.3, 1.0])
    weighted = diffusion_loss(cfg, run, *args, snr_weighting=False, weights=w)
    assert weighted.item() == pytest.approx(((per[0] + 0.3 * per[1] + per[2]) / 3).item(), rel=1e-6)
    plain = diffusion_loss(cfg, run, *args, snr_weighting=False)
    assert plain.item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)


# ---- errors before the model loads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_missing_or_empty_reg_folder_fails_naming_it_before_the_model_loads(tmp_path, kind, monkeypatch):
    from trainer import build
    from trainer.train import train

    reg = tmp_path / "reg"
    if kind == "empty":
        (reg / "1_person").mkdir(parents=True)
    monkeypatch.setattr(build, "load_model", lambda *a: pytest.fail("the model loaded before the reg check"))
    cfg = tiny_config(tmp_path, reg_data=str(reg))
    with pytest.raises(DatasetError, match=f"^reg_data: .*regularization folder.*{reg}|^reg_data: no usable .*{reg}"):
        train(cfg)
    assert not (tmp_path / "out" / "runs").exists()


def test_cli_and_config_take_the_reg_options(tmp_path):
    from trainer.cli import build_parser

    args = build_parser().parse_args(["train", "--reg-data", str(tmp_path), "--prior-loss-weight", "0.5"])
    assert (args.reg_data, args.prior_loss_weight) == (str(tmp_path), 0.5)
    assert TrainConfig().prior_loss_weight == 1.0 and TrainConfig().reg_data is None
    with pytest.raises(ValueError, match="prior_loss_weight"):
        TrainConfig(prior_loss_weight=-1.0).validate(require_paths=False)


# ---- a real run: metadata, validation, resume --------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_training_with_reg_images_records_them_and_resumes_bit_identically(tmp_path):
    from trainer.train import Trainer, train

    reg = reg_folder(tmp_path / "reg", {"2_person": 3, "1_dog": 1})  # 7 reg samples before the balance
    opts = dict(steps=5, reg_data=str(reg), prior_loss_weight=0.5, validation_split=0.2, n_images=5,
                sizes=((64, 64), (96, 64)), flip_aug=True, eval_every=5)
    ref = train(tiny_config(tmp_path / "a", **opts))
    t = Trainer(tiny_config(tmp_path / "a2", **opts))
    t.setup()
    items = t.built.items
    n_train = sum(it.repeats for it in items if not it.is_reg)
    assert sum(it.repeats for it in items if it.is_reg) == n_train == 4  # 5 images, 1 held out for validation
    assert t.built.eval_batch.indices and not any(items[i].is_reg for i in t.built.eval_batch.indices)
    val_sizes = sum(len(b.indices) for b in t.built.val_batches)
    assert val_sizes == 1  # the held-out training image only; reg images are added after the hold-out
    t.close()
    t.release()
    with open(ref.lora_path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"2_person": {"n_repeats": 2, "img_count": 3},
                                                         "1_dog": {"n_repeats": 1, "img_count": 1}}
    assert header["ss_num_reg_images"] == "7" and float(header["ss_prior_loss_weight"]) == 0.5
    assert header["ss_num_train_images"] == "4"
    report = (Path(ref.run_dir) / "dataset.txt").read_text()
    # 1_dog's image (1 repeat), then 2_person's r0 (2) and r1 (cut to 1): 4 samples; r2 is left out
    assert "regularization:" in report and "1 reg image(s) not used" in report
    # stop at step 2 and resume: the same LoRA, bit for bit
    cfg = tiny_config(tmp_path / "b", **opts)

    def stop_at_2(info):
        if info["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop_at_2)
    run_dir = RunReader.list_runs(tmp_path / "b" / "out")[0]["run_dir"]
    resumed = train(resume_config(run_dir))
    assert resumed.steps_done == 5
    a, b = lora_tensors(ref.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dataset_node_takes_a_reg_folder_and_refuses_a_missing_one(tmp_path):
    from test_comfy_nodes import _tiny_dataset, sub

    ds, common = sub("nodes.dataset_spec"), sub("nodes._common")
    data = _tiny_dataset(tmp_path / "d", n=2)
    reg = reg_folder(tmp_path / "reg", {"3_person": 2})
    spec = ds.build_dataset(str(data), 64, True, 64, 1, False, reg_folder=str(reg), prior_loss_weight=0.4)
    assert spec.reg_images == 2
    assert spec.overrides()["reg_data"] == str(reg) and spec.overrides()["prior_loss_weight"] == 0.4
    assert f"regularization: 2 images in {reg}, loss weight 0.4" in ds.describe(spec)
    plain = ds.build_dataset(str(data), 64, True, 64, 1, False)
    assert "reg_data" not in plain.overrides() and "regularization" not in ds.describe(plain)
    with pytest.raises(common.EmoLoRAError, match=f"^EmoLoRA Dataset: reg_folder: regularization folder not "
                                                  f"found: {tmp_path / 'none'}"):
        ds.build_dataset(str(data), 64, True, 64, 1, False, reg_folder=str(tmp_path / "none"))


def test_a_rank_takes_its_rows_of_the_loss_weights_and_masks():
    """Under several ranks each takes its slice of the global batch: the reg weights and masks too."""
    from trainer.data import Batch
    from trainer.distributed import shard

    b = Batch([0, 1, 2, 3], list("abcd"), torch.zeros(4, 4, 2, 2), torch.zeros(4, 6),
              mask=torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2), weights=torch.tensor([1.0, 0.5, 1.0, 0.5]))
    part = shard(b, SimpleNamespace(enabled=True, rank=1), 2)
    assert part.indices == [2, 3] and part.weights.tolist() == [1.0, 0.5]
    assert part.mask[:, 0, 0, 0].tolist() == [2.0, 3.0] and (part.offset, part.global_rows) == (2, 4)
