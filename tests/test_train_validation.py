"""Validation split / folder, val-plateau auto-stop and masked loss, on the tiny SDXL checkpoint."""

import numpy as np
import pytest
import torch
from _trainer_helpers import lora_tensors, make_dataset, photo, tiny_config
from PIL import Image

from trainer.cli import build_parser
from trainer.data import DatasetError, plan_crop, scan_dataset, split_validation
from trainer.data.masks import latent_mask
from trainer.diffusion import per_sample_loss
from trainer.runstore import RunReader
from trainer.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the split ----------------------------------------------------------------------------------------------------
def test_split_is_seeded_by_content_not_file_order(tmp_path):
    items, _ = scan_dataset(make_dataset(tmp_path / "d", n=10))
    train_a, val_a = split_validation(items, 0.2, seed=1)
    train_b, val_b = split_validation(list(reversed(items)), 0.2, seed=1)
    assert len(val_a) == 2 and len(train_a) == 8
    assert {it.image for it in val_a} == {it.image for it in val_b}
    assert not {it.image for it in val_a} & {it.image for it in train_a}
    assert {it.image for it in split_validation(items, 0.2, seed=2)[1]} != {it.image for it in val_a}
    assert len(split_validation(items[:2], 0.9, seed=1)[0]) == 1  # something always trains
    with pytest.raises(DatasetError, match="at least 2 images"):
        split_validation(items[:1], 0.5, seed=1)


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["train", "--validation-split", "0.1", "--validation-every", "5",
                                      "--auto-stop-on", "val-plateau", "--mask", "alpha"])
    assert (args.validation_split, args.validation_every, args.auto_stop_on, args.mask) == (0.1, 5, "val-plateau",
                                                                                          "alpha")


def test_val_plateau_needs_validation_images(tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="val-plateau"):
        tiny_config(tmp_path, auto_stop_on="val-plateau")
    with pytest.raises(ConfigError, match="exclude each other"):
        tiny_config(tmp_path, validation_split=0.2, validation_data=str(tmp_path))


# ---- validation loss in a run -----------------------------------------------------------------------------------
def test_validation_loss_is_logged_on_held_out_images(tmp_path):
    t = Trainer(tiny_config(tmp_path, n_images=8, steps=4, validation_split=0.25, validation_every=2))
    try:
        t.setup()
        _, held = split_validation(scan_dataset(t.cfg.data)[0], 0.25, seed=t.cfg.seed)
        trained = {it.image for it in t.built.data.items}
        assert len(held) == 2 and not {it.image for it in held} & trained
        for b in t.built.val_batches:
            assert b.prompt_embeds is not None and b.latents.shape[0] == len(b.indices)
        assert sum(len(b.indices) for b in t.built.val_batches) == 2 and len(t.built.data.items) == 6
        first, again = t.validate(), t.validate()
        assert first == again  # fixed images, noise and timesteps: the same code on the same data
        result = t.run()
    finally:
        t.close()
    rows = {r["step"]: r for r in RunReader(result.run_dir).steps(since=-1)}
    assert [s for s, r in sorted(rows.items()) if "val_loss" in r] == [0, 2, 4]
    assert rows[0]["val_loss"] == pytest.approx(first)
    assert result.summary["val_loss_min"] == min(r["val_loss"] for r in rows.values() if "val_loss" in r)
    report = (tmp_path / "out" / "runs").glob("*/dataset.txt").__next__().read_text()
    assert "validation split: 2 images held out" in report and "6 images" in report.splitlines()[-1]


def test_validation_folder_and_val_plateau_stop(tmp_path, monkeypatch):
    val_dir = make_dataset(tmp_path / "val", n=2)
    values = iter([1.0, 0.9, 0.95, 0.97, 0.99, 1.2, 1.3])
    import trainer.train as train_module

    real = train_module.fixed_loss
    monkeypatch.setattr(train_module, "fixed_loss",
                        lambda cfg, run, batches, tag: next(values) if tag == "validation" else
                        real(cfg, run, batches, tag))
    result = train(tiny_config(tmp_path, steps=12, validation_data=str(val_dir), validation_every=1,
                               auto_stop="stop", auto_stop_on="val-plateau", val_patience=3))
    # minimum 0.9 at step 1; steps 2, 3, 4 make no new minimum -> stop after step 4, LoRA saved
    assert result.stop_reason == "val_plateau" and result.steps_done == 4
    assert lora_tensors(result.lora_path)
    events = RunReader(result.run_dir).events(kind="val_plateau")
    assert events and events[0]["data"]["best"] == 0.9


# ---- masks ------------------------------------------------------------------------------------------------------
def _save_mask(path, size, left_white=True):
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[:, : w // 2] = 255 if left_white else 0
    Image.fromarray(arr, "L").save(path)


def test_mask_files_are_paired_checked_and_reported(tmp_path):
    d = make_dataset(tmp_path / "d", n=4, sizes=((96, 64),))
    _save_mask(d / "img00_mask.png", (96, 64))
    _save_mask(d / "img01_mask.png", (64, 64))  # wrong size
    (d / "img02_mask.png").write_bytes(b"not a png")  # unreadable
    items, report = scan_dataset(d, mask="file")
    by_name = {it.image.name: it for it in items}
    assert sorted(by_name) == ["img00.png", "img03.png"]  # bad masks skip their image
    assert by_name["img00.png"].mask == d / "img00_mask.png" and by_name["img03.png"].mask is None
    text = report.text()
    assert "skipped: " + str(d / "img01.png") + ": mask img01_mask.png is 64x64 but the image is 96x64" in text
    assert "unreadable mask img02_mask.png" in text and "no mask file (img03_mask.png)" in text
    assert not any(str(line.path).endswith("_mask.png") and line.action == "skipped" for line in report.lines)
    # with masks off, a mask file is not a training image: one "ignored" line
    items_off, report_off = scan_dataset(d, mask="off")
    assert len(items_off) == 4 and sum("a loss mask" in str(x) for x in report_off.lines) == 3


def test_alpha_mask_and_latent_grid_follow_the_crop(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    rgba = photo((64, 64), seed=3).convert("RGBA")
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, :32] = 255
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(d / "x.png")
    (d / "x.txt").write_text("a blob")
    photo((64, 64), seed=4).save(d / "y.png")
    (d / "y.txt").write_text("no alpha")
    items, report = scan_dataset(d, mask="alpha")
    x = next(it for it in items if it.image.name == "x.png")
    assert x.mask == d / "x.png" and x.mask_channel == "A"
    assert "has no alpha channel: the whole image trains" in report.text()
    from trainer.data.masks import read_mask

    grey = read_mask(x.mask, "A", x.size)
    straight = latent_mask(grey, plan_crop(x.size, (64, 64)))
    flipped = latent_mask(grey, plan_crop(x.size, (64, 64), flip=True))
    assert straight.shape == (1, 8, 8)
    assert torch.equal(straight[0, :, :4], torch.ones(8, 4)) and torch.equal(straight[0, :, 4:], torch.zeros(8, 4))
    assert torch.equal(flipped, straight.flip(-1))


def test_masked_loss_weights_positions():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).expand(2, 1, 2, 2)
    assert torch.allclose(per_sample_loss(pred, target, "l2", mask=mask), torch.full((2,), 1.5 / 4))


@pytest.mark.parametrize("white", [False, True])
def test_black_masks_teach_nothing(tmp_path, white):
    cfg = tiny_config(tmp_path, n_images=4, sizes=((64, 64),), steps=2, optimizer="AdamW", mask="file")
    for i in range(4):
        arr = np.full((64, 64), 255 if white else 0, np.uint8)
        Image.fromarray(arr, "L").save(tmp_path / "data" / f"img{i:02d}_mask.png")
    result = train(cfg)
    assert result.stop_reason == "finished"
    ups = [v for k, v in lora_tensors(result.lora_path).items() if k.endswith("lora_up.weight")]
    moved = any(v.abs().sum() > 0 for v in ups)
    assert moved is white  # an all-black mask zeroes the loss, so lora_up (initialised at 0) never moves
