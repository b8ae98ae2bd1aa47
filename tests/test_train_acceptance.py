"""The issue's acceptance checks on the tiny single-file SDXL checkpoint with generated photo-like images."""

import json
import re

import pytest
from _trainer_helpers import make_bad_folder, tiny_config
from safetensors import safe_open

from trainer.runstore import RunReader
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_eval_loss_drops_optimizer_feels_the_loss_and_export_is_kohya(tmp_path):
    cfg = tiny_config(tmp_path, n_images=8, steps=30, eval_every=10, eval_size=4, rank=8, lr=2e-3)
    result = train(cfg)
    s = result.summary
    assert s["eval_loss_end"] < 0.9 * s["eval_loss_start"], s
    rows = RunReader(result.run_dir).steps(since=0)
    emo = [r["emo_scalar"] for r in rows]
    assert len(set(emo)) > 10 and max(abs(v) for v in emo) > 1e-3  # EmoNavi felt the real loss
    with safe_open(result.lora_path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    pattern = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\w+"
                         r"\.(alpha|lora_down\.weight|lora_up\.weight)$")
    assert keys and all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)][:3]
    assert not any("down_blocks" in k or "mid_block" in k for k in keys)  # original names, not diffusers'
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_dim"] == "8" and meta["ss_steps"] == "30" and "EmoNavi" in meta["ss_optimizer"]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_sd_model_hash"]
    assert json.loads(meta["ss_tag_frequency"])["data"]["soft light"] == 8
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # The run's summary travels with the file: loss, eval loss and the optimizer's signal ranges.
    assert float(meta["emolora_loss_min"]) == pytest.approx(s["loss_min"])
    assert float(meta["emolora_eval_loss_end"]) == pytest.approx(s["eval_loss_end"])
    assert float(meta["emolora_emo_scalar_min"]) < float(meta["emolora_emo_scalar_max"])
    assert meta["emolora_stop_reason"] == "finished" and meta["emolora_optimizer"] == "EmoNavi"


@pytest.mark.slow
def test_bad_file_folder_reports_each_file_once_and_trains_on_the_good_ones(tmp_path, caplog):
    cfg = tiny_config(tmp_path, steps=2)
    _, bad = make_bad_folder(tmp_path / "bad")
    result = train(cfg.replace(data=str(tmp_path / "bad")))
    assert result.stop_reason == "finished"
    report = (tmp_path / "out" / "runs").glob("*/dataset.txt").__next__().read_text()
    for name in bad:
        assert sum(name in line for line in report.splitlines()[:-1]) == 1, name
    assert "7 images" in report.splitlines()[-1]
    ev = [e for e in RunReader(result.run_dir).events() if e["kind"] == "dataset"][0]
    assert len(ev["data"]["lines"]) == len(bad)
