"""The ComfyUI node pack without a ComfyUI: import cost, the specs' validation, the dataset scan, the telemetry
chart, the trainer wrapper (tiny model; Cancel leaves a saved LoRA) and the example workflow's shape."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "emolora_pack_under_test"


def load_pack():
    """Import the repository as a package the way ComfyUI does (custom_nodes/<folder>/__init__.py), under a name
    of its own."""
    from trainer.cli import load_pack as load

    return load(PACK)


def sub(name: str):
    load_pack()
    return importlib.import_module(f"{PACK}.{name}")


def test_pack_import_is_light_and_exports_the_entrypoint():
    code = f"""
import importlib.util, inspect, sys, time
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("emolora", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["emolora"] = mod; spec.loader.exec_module(mod)
dt = time.perf_counter() - t0
heavy = [m for m in ("torch", "diffusers", "transformers", "gradio", "comfy", "server", "folder_paths", "nodes")
         if m in sys.modules]
assert not heavy, heavy
assert mod.WEB_DIRECTORY == "./web/js"
assert inspect.iscoroutinefunction(mod.comfy_entrypoint)
assert not hasattr(mod, "NODE_CLASS_MAPPINGS")  # it would make ComfyUI ignore comfy_entrypoint
print(dt)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 0.5
    assert (ROOT / "web" / "js" / "emolora.js").is_file()


def test_node_modules_import_only_relative_and_lazily():
    banned = ("import comfy", "from comfy.", "import folder_paths", "from server", "import server", "import nodes",
              "from nodes", "from trainer", "import trainer")
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith(banned):  # module level only; inside functions (indented) is lazy and allowed
                pytest.fail(f"{path.name}:{n}: top-level host/absolute import: {line}")


# ---- Optimizer spec --------------------------------------------------------------------------------------------
WIDGETS = ("preset", "lr", "emopulse_scale", "beta1", "beta2", "weight_decay", "use_shadow", "trust_level",
           "emopulse_scheduler", "lr_scheduler", "warmup_steps")


def _spec(optimizer, **kw):
    """build_spec with the widget values the frontend shows for `optimizer` (its real defaults), changed by kw."""
    spec_mod = sub("nodes.optimizer_spec")
    args = dict(preset=spec_mod.AUTO_PRESET, lr=1e-4, emopulse_scale=1.0, beta1=0.9, beta2=0.999,
                weight_decay=0.0, use_shadow=False, trust_level=0.4, emopulse_scheduler=False,
                lr_scheduler="constant", warmup_steps=0)
    args.update(spec_mod.optimizer_defaults(optimizer, kw.get("preset", spec_mod.AUTO_PRESET)))
    args.update(kw)
    return spec_mod.build_spec(optimizer, **{k: args[k] for k in WIDGETS})


def _tiny_dataset(folder, n=2, masks=False):
    """n captioned 64x64 images (and white masks) in `folder` -> the folder."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 100, 50, 0)).save(folder / f"{i}.png")
        if masks:
            Image.new("L", (64, 64), 255).save(folder / f"{i}_mask.png")
        (folder / f"{i}.txt").write_text("tiny")
    return folder


def test_every_optimizer_builds_a_valid_immutable_spec():
    from trainer.config import OPTIMIZER_NAMES, build_config

    common = sub("nodes._common")
    assert common.optimizer_names()[0] == "AdamW"
    assert set(common.optimizer_names()) == set(OPTIMIZER_NAMES)
    for name in OPTIMIZER_NAMES:
        spec = _spec(name)
        assert hash(spec) and spec.optimizer == name
        cfg = build_config(presets=list(spec.presets), overrides={**spec.overrides(), "model": "m", "data": "d",
                                                                   "output": "o.safetensors"}, validate=False)
        assert cfg.optimizer == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.optimizer = "x"


def test_widget_defaults_are_what_the_cli_trains_with():
    """The Optimizer node's real defaults (no sentinels): for every optimizer and each of its presets, the values
    the widgets are filled with train exactly what the CLI trains with `--optimizer X [--preset P]`."""
    from trainer.config import build_config

    spec_mod = sub("nodes.optimizer_spec")
    table = spec_mod.defaults_table()
    assert set(table) == set(sub("nodes._common").optimizer_names())
    assert table["AutoTrustGO"]["autotrustgo-bold"]["trust_level"] == 0.5
    assert table["EmoNavi"][spec_mod.AUTO_PRESET]["lr"] == 6e-05
    assert table["AdamW"][spec_mod.AUTO_PRESET]["weight_decay"] == 0.01
    fixed = {"model": "m", "data": "d", "output": "o.safetensors"}
    for name, by_preset in table.items():
        for preset, values in by_preset.items():
            assert all(v is not None and v != -1 for v in values.values()), (name, preset, values)
            spec = _spec(name, preset=preset)
            node = build_config(presets=list(spec.presets), overrides={**spec.overrides(), **fixed}, validate=False)
            cli_presets = [] if preset == spec_mod.AUTO_PRESET else [preset]
            cli = build_config(presets=cli_presets, overrides={"optimizer": name, **fixed}, validate=False)
            assert cli.lr is not None and node.lr == cli.lr, (name, preset)
            for key, value in cli.optimizer_args.items():  # explicit in the preset: the node passes the same
                assert node.optimizer_args[key] == value, (name, preset, key)
            ctor = sub("trainer.optim").constructor_defaults(name)  # the rest: the constructor's own defaults
            for key, value in node.optimizer_args.items():
                if key not in cli.optimizer_args:
                    expected = list(value) if key == "betas" else value
                    assert (list(ctor[key]) if key == "betas" else ctor[key]) == expected, (name, key)
            assert (node.lr_scheduler, node.warmup_steps) == (cli.lr_scheduler, cli.warmup_steps)


def test_optimizer_family_parameters():
    err = sub("nodes._common").EmoLoRAError
    s = _spec("EmoSens", emopulse_scale=0.5, lr=0.1).overrides()
    assert s["lr"] == 0.5  # the EmoSens line's lr is the emoPulse scale
    s = _spec("AutoTrustGO", trust_level=0.8).overrides()
    assert s["optimizer_args"]["trust_level"] == 0.8
    s = _spec("EmoNavi", lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, use_shadow=True).overrides()
    assert s["optimizer_args"] == {"betas": [0.9, 0.99], "weight_decay": 0.0, "use_shadow": True}
    assert s["lr"] == 1e-4
    s = _spec("AdamW", emopulse_scheduler=True, emopulse_scale=2.0).overrides()
    assert s["lr_scheduler"] == "emopulse" and s["scheduler_args"] == {"base_lr": 2.0}
    s = _spec("AutoTrustGO", beta1=0.5, beta2=0.5, weight_decay=0.3).overrides()  # not its parameters: ignored
    assert s["optimizer_args"] == {"trust_level": 0.4}
    with pytest.raises(err, match="beta1 and beta2 must be in"):
        _spec("EmoNavi", beta1=-1.0)
    with pytest.raises(err, match="lr must be > 0"):
        _spec("AdamW", lr=0.0)
    with pytest.raises(err, match="no shadow"):
        _spec("AdamW", use_shadow=True)
    with pytest.raises(err, match="already takes its step size"):
        _spec("EmoCats", emopulse_scheduler=True)
    with pytest.raises(err, match="is for AutoTrustGO"):
        _spec("EmoNavi", preset="autotrustgo-bold")
    assert _spec("AutoTrustGO", preset="autotrustgo-bold").presets == ("autotrustgo-bold",)


# ---- Dataset spec ----------------------------------------------------------------------------------------------
def test_dataset_from_folder_counts_and_reports_skips(tmp_path):
    from PIL import Image

    ds = sub("nodes.dataset_spec")
    (tmp_path / "3_cat").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(tmp_path / "3_cat" / f"{i}.png")
    (tmp_path / "3_cat" / "broken.png").write_bytes(b"not a png")
    spec = ds.build_dataset(str(tmp_path), 512, True, 64, 1, False)
    assert spec.images == 2 and spec.samples_per_epoch == 6
    assert len(spec.skipped) == 1 and "broken.png" in spec.skipped[0]
    assert "skipped 1" in ds.describe(spec)
    assert spec.overrides()["resolution"] == 512 and spec.overrides()["data"] == str(tmp_path)
    with pytest.raises(sub("nodes._common").EmoLoRAError, match="^EmoLoRA Dataset: data folder not found"):
        ds.build_dataset(str(tmp_path / "missing"), 512, True, 64, 1, False)


def test_dataset_from_image_batch(tmp_path):
    import torch

    ds = sub("nodes.dataset_spec")
    images = torch.rand(3, 64, 48, 3)
    spec = ds.build_dataset("", 256, True, 64, 1, False, images=images, captions="a\nb\nc", images_root=str(tmp_path))
    assert spec.images == 3
    folder = Path(spec.folder)
    assert sorted(p.read_text() for p in folder.glob("*.txt")) == ["a", "b", "c"]
    again = ds.build_dataset("", 256, True, 64, 1, False, images=images, captions="a\nb\nc",
                             images_root=str(tmp_path))
    assert again == spec  # content-addressed: the same batch is the same folder
    with pytest.raises(sub("nodes._common").EmoLoRAError, match="3 images but 2 caption lines"):
        ds.build_dataset("", 256, True, 64, 1, False, images=images, captions="a\nb", images_root=str(tmp_path))


def test_dataset_validation_and_mask_options(tmp_path):
    from PIL import Image

    ds, err = sub("nodes.dataset_spec"), sub("nodes._common").EmoLoRAError
    data, val = tmp_path / "data", tmp_path / "val"
    for folder, n in ((data, 4), (val, 2)):
        folder.mkdir()
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a blob")
    Image.new("L", (64, 64), 255).save(data / "0_mask.png")
    spec = ds.build_dataset(str(data), 64, True, 64, 1, False, mask="file", validation_split=0.25)
    settings = spec.overrides()
    assert spec.images == 4 and spec.validation_images == 1  # 0_mask.png is a mask, not an image
    assert settings["mask"] == "file" and settings["validation_split"] == 0.25 and "validation_data" not in settings
    text = ds.describe(spec)
    assert "validation: 1 of these held out of training" in text and "masked loss: <name>_mask.png files" in text
    spec = ds.build_dataset(str(data), 64, True, 64, 1, False, validation_folder=str(val))
    assert spec.overrides()["validation_data"] == str(val) and spec.validation_images == 2
    assert f"validation: 2 images in {val}" in ds.describe(spec)
    with pytest.raises(err, match="^EmoLoRA Dataset: .*validation_split and validation_data exclude each other"):
        ds.build_dataset(str(data), 64, True, 64, 1, False, validation_split=0.25, validation_folder=str(val))
    with pytest.raises(err, match=f"^EmoLoRA Dataset: .*{tmp_path / 'nothing'}"):
        ds.build_dataset(str(data), 64, True, 64, 1, False, validation_folder=str(tmp_path / "nothing"))


# ---- Telemetry -------------------------------------------------------------------------------------------------
def test_telemetry_plot_from_a_run(tmp_path):
    from trainer.runstore import RunStore

    store = RunStore(tmp_path / "run")
    store.set_meta(optimizer="EmoNavi", run_name="run", status="finished")
    for step in range(1, 21):
        store.log_step(step, {"loss": 0.2 - step * 0.003, "emo_scalar": 0.1 * (-1) ** step, "lr": 1e-4,
                              "effective_lr": 1e-4 * step, "trust": 0.5, "should_stop": False})
    store.close()
    img = sub("nodes.plot").telemetry_image(str(tmp_path / "run"))
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[2] == 768
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert sub("nodes.plot").pick_series([{"step": 1, "loss": 1.0}], None)[0] == "loss"
    one = sub("nodes.plot").render([{"step": 1, "loss": 0.5}], "AdamW")  # a single point, constant series
    assert one.size[0] == 768


def test_event_payload_is_json_safe():
    training = sub("nodes.training")
    payload = training.event_payload({"step": 3, "steps_total": 9, "loss": float("nan"), "emo_scalar": 0.25,
                                      "should_stop": False, "lr": 1e-4}, "7", "EmoNavi")
    json.dumps(payload, allow_nan=False)
    assert payload["loss"] is None and payload["emo_scalar"] == 0.25 and payload["node"] == "7"
    throttle = sub("nodes._common").Throttle(10.0)
    assert throttle.ready() and not throttle.ready() and throttle.ready(force=True)
    assert training.safe_output_name("../my lora.safetensors") == "my_lora"


@pytest.mark.slow
def test_run_training_tiny_model_and_cancel_saves_the_lora(tmp_path, monkeypatch):

    from trainer.model import tiny_model_path

    common, training = sub("nodes._common"), sub("nodes.training")
    events = []
    monkeypatch.setattr(training, "send_event", lambda name, data: events.append((name, data)))
    dataset = sub("nodes.dataset_spec").build_dataset(str(_tiny_dataset(tmp_path)), 64, False, 64, 1, False)
    optimizer = _spec("EmoNavi")
    kw = dict(checkpoint=tiny_model_path(), dataset=dataset, optimizer=optimizer, lora_dir=str(tmp_path / "loras"),
              runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), node_id="3", device="cpu",
              rank=4, steps=3, mixed_precision="no", gradient_checkpointing=False)
    seen, previews = [], []

    def progress(step, total, preview=None):
        seen.append((step, total))
        if preview is not None:
            previews.append((step, preview.size))

    # the character preset under the node's values, previews every 2 steps (two prompts, 64 px, 1 step)
    out = training.run_training(output_name="ok", progress=progress, preset="character",
                                sample_prompts=["a red blob", "a cat"], sample_every=2, sample_size=64,
                                sample_steps=1, **kw)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert out["lora_name"] == "ok_00001.safetensors" and Path(out["lora_path"]).is_file()
    assert out["stop_reason"] == "finished"
    statuses = [d["status"] for n, d in events if n == common.TELEMETRY_EVENT]
    assert statuses[0] == "starting" and statuses[-1] == "done" and "running" in statuses
    assert "sample" in statuses
    # previews: the set made at step 2 went to the progress bar as one strip, and is the samples output
    assert previews == [(2, (128, 64))]
    assert [im.size for im in out["samples"]] == [(64, 64), (64, 64)]
    batch = sub("nodes.previews").to_image_batch(out["samples"])
    assert tuple(batch.shape) == (2, 64, 64, 3) and 0.0 <= float(batch.min()) <= float(batch.max()) <= 1.0
    # the preset merged under the node's values, as the CLI merges --preset character under its flags
    cfg = out["config"]
    assert (cfg.min_snr_gamma, cfg.noise_offset, cfg.shuffle_caption, cfg.keep_tokens, cfg.cache_text) == \
        (5.0, 0.0357, True, 1, "off")
    assert cfg.rank == 4 and cfg.resolution == 64  # the node's rank and the Dataset node's resolution win
    status = training.preset_status("character", cfg)
    assert "min_snr_gamma=5.0" in status and "rank=4 (preset 16)" in status

    class Cancelled(Exception):  # stands in for ComfyUI's InterruptProcessingException
        pass

    def cancel_at_2(step, total, preview=None):
        if step == 2:
            raise Cancelled()

    events.clear()
    with pytest.raises(Cancelled):
        training.run_training(output_name="ok", progress=cancel_at_2, **{**kw, "steps": 50})
    saved = tmp_path / "loras" / "ok_00002.safetensors"
    assert saved.is_file()  # the next free name; the earlier LoRA is never overwritten
    assert events[-1][1]["status"] == "interrupted"
    # Cancel while the checkpoint loads: no step runs, no LoRA is written, the interrupt propagates
    events.clear()
    phases, steps = [], []

    def cancel_during_load():
        phases.append("check")
        raise Cancelled()

    with pytest.raises(Cancelled):
        training.run_training(output_name="early", progress=lambda s, t, p=None: steps.append(s),
                              check_cancel=cancel_during_load, **kw)
    assert phases == ["check"] and steps == [] and not list((tmp_path / "loras").glob("early*"))
    assert events[-1][1]["status"] == "interrupted" and events[-1][1]["lora"] is None
    with pytest.raises(common.EmoLoRAError, match="^EmoLoRA Trainer: .*not an SDXL-family checkpoint"):
        bad = tmp_path / "bad.safetensors"
        import torch
        from safetensors.torch import save_file

        save_file({"cond_stage_model.transformer.x": torch.zeros(2), "model.diffusion_model.y": torch.zeros(2)},
                  str(bad))
        training.run_training(output_name="bad", progress=None, **{**kw, "checkpoint": str(bad)})


def test_sample_files_of_a_step_in_prompt_order(tmp_path):
    from PIL import Image

    previews = sub("nodes.previews")
    (tmp_path / "samples").mkdir()
    for i in (0, 2, 10, 1):
        Image.new("RGB", (32 + i, 16), (i * 20, 0, 0)).save(tmp_path / "samples" / f"step-000004-{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "step-000040-0.png")
    paths = previews.sample_paths(tmp_path, 4)
    assert [p.name for p in paths] == [f"step-000004-{i}.png" for i in (0, 1, 2, 10)]
    images = previews.load_images(paths)
    assert previews.strip(images).size == (32 * 4 + 13, 16)
    assert tuple(previews.to_image_batch(images).shape) == (4, 16, 32, 3)  # resized to the first one's size
    assert tuple(previews.to_image_batch([], fallback_size=96).shape) == (1, 96, 96, 3)
    assert previews.sample_paths(tmp_path, 5) == []


def test_validation_line_reports_the_minimum_and_should_stop():
    telemetry = sub("trainer.telemetry")  # the node's and the CLI's summary line
    summary = {"val_loss_start": 1.25, "val_loss_end": 0.95, "val_loss_min": 0.9, "val_loss_min_step": 300}
    assert telemetry.validation_line({}) == ""
    assert telemetry.validation_line(summary) == "validation loss 1.2500 -> 0.9500, lowest 0.9000 at step 300"
    assert telemetry.validation_line({**summary, "should_stop_step": 120}).endswith("should_stop rose at step 120")


@pytest.mark.slow
def test_run_training_loha_then_continue_it(tmp_path, monkeypatch, one_thread):
    """The Trainer node's network inputs reach the trainer: a LoHa file, then a run continued from it."""
    from safetensors import safe_open

    from trainer.model import tiny_model_path
    from trainer.runstore import RunReader

    training = sub("nodes.training")
    monkeypatch.setattr(training, "send_event", lambda name, data: None)
    data = _tiny_dataset(tmp_path / "data")
    kw = dict(checkpoint=tiny_model_path(), dataset=sub("nodes.dataset_spec").build_dataset(str(data), 64, False, 64,
                                                                                             1, False),
              optimizer=_spec("EmoNavi"), lora_dir=str(tmp_path / "loras"), runs_dir=str(tmp_path / "runs"),
              cache_dir=str(tmp_path / "cache"), device="cpu", rank=4, steps=1, mixed_precision="no",
              gradient_checkpointing=False)
    first = training.run_training(output_name="loha", network="loha", **kw)
    with safe_open(first["lora_path"], "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".hada_w1_a") for k in keys) and not any("lora_down" in k for k in keys)
    assert first["config"].network == "loha"
    # continued on an fp8 base (the node's base_dtype input): the same file layout continues
    again = training.run_training(output_name="loha", network="loha", network_weights=first["lora_path"],
                                  base_dtype="fp8", **kw)
    assert again["config"].network_weights == first["lora_path"] and again["lora_name"] == "loha_00002.safetensors"
    assert again["config"].base_dtype == "fp8"
    assert RunReader(again["run_dir"]).meta()["base_dtype"] == "float8_e4m3fn"


@pytest.mark.slow
def test_a_lora_that_barely_moves_is_warned_about_in_the_text_and_once_live(tmp_path, monkeypatch, one_thread):
    """AutoTrustGO at its preset LR moves the tiny model's LoRA ~300x less than AdamW (docs/sweep.md): the node's
    text output and one "warning" telemetry event carry the trainer's message; AdamW at the same LR has neither."""
    from trainer.model import tiny_model_path

    training = sub("nodes.training")
    events = []
    monkeypatch.setattr(training, "send_event", lambda name, data: events.append(data))
    dataset = sub("nodes.dataset_spec").build_dataset(str(_tiny_dataset(tmp_path / "data")), 64, False, 64, 1, False)
    kw = dict(checkpoint=tiny_model_path(), dataset=dataset, lora_dir=str(tmp_path / "loras"),
              runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), node_id="7", device="cpu",
              rank=4, steps=21, mixed_precision="no", gradient_checkpointing=False)  # the window: 20 steps
    slow_spec = _spec("AutoTrustGO")
    assert slow_spec.overrides()["lr"] == pytest.approx(1e-4)  # its preset LR
    slow = training.run_training(output_name="slow", optimizer=slow_spec, **kw)
    warned = [d for d in events if d.get("status") == "warning"]
    assert len(warned) == 1 and warned[0]["node"] == "7" and warned[0]["step"] == 21
    assert warned[0]["message"].startswith("AutoTrustGO at lr 0.0001 has barely changed the LoRA in 20 steps")
    assert warned[0]["message"].endswith("try a higher LR") and slow["barely_moving"] == warned[0]["message"]
    assert warned[0]["message"] in training.result_text(slow).splitlines()  # the node's text output
    json.dumps(warned[0])  # the browser's JSON
    assert events[-1]["status"] == "done"  # the warning did not end the run
    events.clear()
    moving = training.run_training(output_name="moving", optimizer=_spec("AdamW", lr=1e-4), **kw)
    assert moving["barely_moving"] == "" and not [d for d in events if d.get("status") == "warning"]
    assert "barely changed" not in training.result_text(moving)
    assert moving["stop_reason"] == slow["stop_reason"] == "finished"


@pytest.mark.slow
def test_run_training_with_validation_and_masks_from_the_nodes(tmp_path, monkeypatch, one_thread):
    """The Dataset node's validation split and masks and the Trainer node's validation inputs reach the trainer."""

    from trainer.model import tiny_model_path
    from trainer.runstore import RunReader

    training = sub("nodes.training")
    monkeypatch.setattr(training, "send_event", lambda name, data: None)
    data = _tiny_dataset(tmp_path / "data", n=3, masks=True)
    dataset = sub("nodes.dataset_spec").build_dataset(str(data), 64, False, 64, 1, False, mask="file",
                                                      validation_split=0.34)
    out = training.run_training(checkpoint=tiny_model_path(), dataset=dataset, optimizer=_spec("EmoNavi"),
                                lora_dir=str(tmp_path / "loras"), runs_dir=str(tmp_path / "runs"),
                                cache_dir=str(tmp_path / "cache"), output_name="val", device="cpu", rank=4, steps=2,
                                mixed_precision="no", gradient_checkpointing=False, validation_every=1,
                                auto_stop_on="val-plateau", val_patience=3, auto_stop="stop")
    cfg = out["config"]
    assert (cfg.mask, cfg.validation_split, cfg.validation_every, cfg.auto_stop_on) == ("file", 0.34, 1, "val-plateau")
    rows = [r for r in RunReader(out["run_dir"]).steps(since=-1) if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert out["validation"].startswith("validation loss ") and out["stop_reason"] == "finished"


# ---- Example workflow ------------------------------------------------------------------------------------------
def test_example_workflow_is_train_then_load_then_sample():
    wf = json.loads((ROOT / "example_workflows" / "emolora_train_then_sample.json").read_text())
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    for t in ("EmoLoRA_Optimizer", "EmoLoRA_Dataset", "EmoLoRA_SDXLTrainer", "EmoLoRA_LoadTrainedLoRA", "KSampler",
              "SaveImage", "EmoLoRA_TelemetryPlot"):
        assert t in types.values(), t
    edges = {(types[lk[1]], types[lk[3]]) for lk in wf["links"]}
    assert ("EmoLoRA_SDXLTrainer", "EmoLoRA_LoadTrainedLoRA") in edges
    assert ("EmoLoRA_LoadTrainedLoRA", "KSampler") in edges
    ids = {lk[0] for lk in wf["links"]}
    for n in wf["nodes"]:
        for inp in n.get("inputs", []):
            assert inp["link"] is None or inp["link"] in ids


def test_a_node_with_a_missing_dependency_is_left_out_with_a_reason(monkeypatch, caplog):
    nodes = sub("nodes")
    monkeypatch.setattr(nodes, "NODE_MODULES", (("_common", "NoSuchNode", None),
                                                ("_common", "Throttle", "no_such_check")))
    monkeypatch.setattr(nodes, "UNAVAILABLE", {})
    with caplog.at_level("WARNING", logger="emolora"):
        assert nodes.load_nodes() == []
    assert set(nodes.UNAVAILABLE) == {"NoSuchNode", "Throttle"}
    assert "node NoSuchNode is unavailable" in caplog.text


# ---- Trainer + Training Options: widget values to TrainConfig ---------------------------------------------------
def test_widgets_to_config_leaves_what_is_not_on_the_graph_to_the_preset():
    """The compact Trainer alone: the preset and the defaults fill everything it does not show; an Options node's
    values win over the preset; every widget of the v0.1.0 Trainer maps to a TrainConfig field."""
    from trainer.config import build_config

    training = sub("nodes.training")
    fixed = {"model": "m", "data": "d", "output": "o.safetensors"}
    trainer = {"ckpt_name": "x.safetensors", "preset": "character", "network": "lora", "rank": 4, "steps": 3,
               "sample_prompts": "", "sample_every": 100, "output_name": "y"}
    alone = build_config(presets=["character"], overrides={**training.widgets_to_config(trainer), **fixed},
                         validate=False)
    assert (alone.rank, alone.steps, alone.sample_every) == (4, 3, 0)  # no prompts, no samples
    assert (alone.alpha, alone.save_every, alone.cache_text, alone.seed) == (8, 250, "off", 42)  # preset, default
    options = {"alpha": 0.0, "precision": "fp32", "save_every": 0, "train_text_encoder": True, "seed": 7,
               "sample_size": 0, "network_weights": "none", "auto_stop": True}
    both = build_config(presets=["character"], validate=False,
                        overrides={**training.widgets_to_config({**options, **trainer}), **fixed})
    assert (both.alpha, both.mixed_precision, both.save_every, both.seed) == (4.0, "no", 0, 7)  # alpha 0: = rank
    assert (both.train_text_encoder, both.cache_text, both.sample_size, both.network_weights, both.auto_stop) == \
        (True, "off", None, None, "stop")
    saved = json.loads((ROOT / "tests" / "data" / "trainer_v0.1.0_prompt.json").read_text())["3"]["inputs"]
    legacy = training.widgets_to_config({k: v for k, v in saved.items() if not isinstance(v, list)})
    cfg = build_config(presets=[], overrides={**legacy, **fixed}, validate=False)
    assert (cfg.network, cfg.rslora, cfg.alpha, cfg.conv_rank, cfg.grad_accum, cfg.val_patience) == \
        ("loha", True, 2.0, 2, 2, 4)
