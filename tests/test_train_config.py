import json
import math

import pytest

from trainer.config import (
    OPTIMIZER_NAMES,
    PRESETS_DIR,
    ConfigError,
    TrainConfig,
    build_config,
    list_presets,
    load_preset,
    resume_config,
)
from trainer.schedule import lr_factor

PATHS = {"model": "/m.safetensors", "data": "/d", "output": "/o/x.safetensors"}


def test_optimizer_names_mirror_the_registry_and_each_has_a_preset():
    from trainer.optim import OPTIMIZERS

    assert set(OPTIMIZER_NAMES) == set(OPTIMIZERS) | {"AdamW"}
    for name in OPTIMIZER_NAMES:
        cfg = build_config(overrides={**PATHS, "optimizer": name})
        assert cfg.lr is not None and cfg.optimizer == name


def test_optimizer_presets_carry_upstream_recommendations():
    lr = {n: build_config(overrides={**PATHS, "optimizer": n}).lr for n in OPTIMIZER_NAMES}
    assert lr["EmoNavi"] == 6e-5 and lr["EmoFact"] == 1e-4 and lr["EmoLynx"] == 8e-5
    for n in ("EmoSens", "EmoAiry", "EmoCats", "EmoTion", "EmoVoid"):
        assert lr[n] == 1.0  # emoScope
    for name, trust in (("autotrustgo-cautious", 0.3), ("autotrustgo-balanced", 0.4), ("autotrustgo-bold", 0.5)):
        cfg = build_config(presets=[name], overrides=PATHS)
        assert cfg.optimizer == "AutoTrustGO" and cfg.lr == 1e-4 and cfg.optimizer_args == {"trust_level": trust}
    assert build_config(overrides={**PATHS, "optimizer": "AutoTrustGO"}).optimizer_args == {"trust_level": 0.4}


def test_every_preset_file_is_valid():
    presets = list_presets()
    kinds = {p["kind"] for p in presets}
    assert kinds == {"optimizer", "training"}
    assert {"character", "style", "concept", "low-vram"} <= {p["name"] for p in presets}
    for p in presets:
        assert p["description"]
        build_config(presets=[p["name"]], overrides=PATHS)  # validates


def test_merge_order_preset_then_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('rank = 24\nlr = 2e-4\n[data]\nresolution = 768\nflip_aug = false\ndata = "imgs"\n')
    cfg = build_config(presets="style", config_file=toml, overrides={**PATHS, "data": None, "lr": 3e-4})
    assert cfg.rank == 24  # file over preset (style says 32)
    assert cfg.resolution == 768 and cfg.flip_aug is False  # a [data] table is flattened
    assert cfg.lr == 3e-4  # flag over file
    assert cfg.data == str(tmp_path / "imgs")  # relative paths in a file are relative to the file
    assert cfg.shuffle_caption is True  # still from the preset
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"preset": "character", "steps": 77}))
    cfg = build_config(config_file=js, overrides=PATHS)
    assert cfg.steps == 77 and cfg.keep_tokens == 1 and cfg.lr == 6e-5  # EmoNavi's preset under it all


def test_bad_values_name_the_option():
    cases = [
        ({"rank": 0}, "rank must be >= 1"),
        ({"optimizer": "EmoNavy"}, "did you mean 'EmoNavi'"),
        ({"resolution": 1000}, "resolution must be a positive multiple of 32"),
        ({"loss_type": "l3"}, "loss_type must be one of"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"output": "/o/x.ckpt"}, "output must be a .safetensors"),
        ({"caption_dropout": 1.5}, "caption_dropout must be in"),
        ({"shuffle_caption": True}, "shuffle_caption needs cache_text='off'"),
        ({"random_crop": True}, "random_crop needs cache_latents='off'"),
        ({"timestep_min": 900, "timestep_max": 100}, "timestep range"),
        ({"sample_every": 10}, "sample_prompts"),
        ({"resolutoin": 1024}, "unknown option 'resolutoin'.*did you mean 'resolution'"),
        ({"steps": "many"}, "steps must be int"),
        ({"tucker": True}, "tucker needs conv_rank > 0"),
        ({"tucker": True, "conv_rank": 4, "network": "lokr"}, "tucker works with network lora or loha"),
    ]
    for change, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            build_config(overrides={**PATHS, **change})
    with pytest.raises(ConfigError, match="model is required"):
        build_config(overrides={"data": "/d", "output": "/o.safetensors"})
    with pytest.raises(ConfigError, match="unknown preset 'charcter'.*did you mean 'character'"):
        build_config(presets="charcter", overrides=PATHS)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(config_file="/nope.toml", overrides=PATHS)


def test_strings_from_the_command_line_are_coerced():
    cfg = build_config(overrides={**PATHS, "steps": "12", "lr": "1e-4", "flip_aug": "true", "alpha": 8})
    assert cfg.steps == 12 and cfg.lr == 1e-4 and cfg.flip_aug is True and cfg.alpha == 8.0
    assert TrainConfig(rank=8).network_alpha == 8.0


def test_resume_config_uses_the_saved_config(tmp_path):
    saved = build_config(overrides={**PATHS, "rank": 12, "lr": 5e-5}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = resume_config(tmp_path, steps=3000)
    assert cfg.rank == 12 and cfg.lr == 5e-5 and cfg.steps == 3000 and cfg.resume == str(tmp_path)
    with pytest.raises(ConfigError, match="not a run folder"):
        resume_config(tmp_path / "nope")


def test_lr_schedules():
    c = TrainConfig(steps=100, lr_scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(c, 0) == pytest.approx(0.1) and lr_factor(c, 9) == 1.0
    assert lr_factor(c, 10) == pytest.approx(1.0) and lr_factor(c, 100) == pytest.approx(0.1)
    assert lr_factor(c, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = TrainConfig(steps=10, lr_scheduler="linear")
    assert [round(lr_factor(lin, s), 3) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(TrainConfig(lr_scheduler="constant"), 500) == 1.0


def test_presets_folder_is_found_from_the_package():
    assert PRESETS_DIR.is_dir() and load_preset("emonavi")["lr"] == 6e-5
