"""fp8 base weights (issue 17, parts 1-2): the frozen UNet's Linear/Conv weights held in float8 and upcast per
layer; fp8 checkpoints (e4m3fn, e5m2, ComfyUI's scaled fp8) that stay fp8; the bad-input errors."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from _lora_helpers import CONFIGS, NET, randomize, rel_err, unet_out
from _trainer_helpers import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import ConfigError
from trainer.model import LoRANetwork, ModelError, clip_tokenizers, detect, hashes, load_sdxl, tiny_model_path
from trainer.model import base_weights as BW

ROOT = Path(__file__).resolve().parent.parent
E4M3 = torch.float8_e4m3fn
UNET = "model.diffusion_model."
pytestmark = pytest.mark.usefixtures("one_thread")


def _stored(unet) -> dict:
    """diffusers module name -> weight dtype of every stored layer."""
    return {n: m.weight.dtype for n, m in unet.named_modules() if isinstance(m, BW.StoredLayer)}


# ---- the stored layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.Linear(48, 40), lambda: nn.Conv2d(8, 12, 3, padding=1, stride=2)])
def test_stored_layer_computes_with_the_upcast_weight_and_saves_no_upcast_copy(make):
    torch.manual_seed(0)
    layer = make()
    w = layer.weight.detach().clone()
    BW.store(layer, *BW.quantize(w, E4M3))
    assert isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight.dtype == E4M3
    assert not layer.weight.requires_grad and layer.weight_scale.dtype == torch.float32
    dense = BW.dense_weight(layer)
    # e4m3fn keeps 3 mantissa bits: each weight within 2^-4 relative (or one subnormal step) of the original
    assert ((dense - w).abs() <= w.abs() / 16 + float(layer.weight_scale) * 2**-9).all()
    assert rel_err(w, dense) > 0  # it did round
    x = torch.randn(3, 48) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 9, 9)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    g = x.grad.clone()
    # no upcast copy kept for backward: the one weight-sized tensor saved is the stored (fp8) weight itself
    assert [t.data_ptr() for t in saved if t.shape == w.shape] == [layer.weight.data_ptr()]
    x.grad = None
    op = nn.functional.linear if isinstance(layer, nn.Linear) else (
        lambda x, w, b: nn.functional.conv2d(x, w, b, stride=2, padding=1))
    y_ref = op(x, dense, layer.bias)
    y_ref.square().sum().backward()
    assert rel_err(y_ref.detach(), y.detach()) < 1e-6 and rel_err(x.grad, g) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_a_file_scale_that_is_not_a_power_of_two_is_applied_in_float32():
    q = torch.tensor([[448.0, -3.0], [0.5, 1.0]]).to(E4M3)
    scale = torch.tensor(1 / 3)
    layer = nn.Linear(2, 2, bias=False)
    BW.store(layer, q, scale)
    assert not layer.scale_exact
    want = (q.float() * scale).to(torch.bfloat16)
    assert torch.equal(layer.upcast_weight(torch.bfloat16), want)  # one rounding, from float32


# ---- the full-size UNet --------------------------------------------------------------------------------------------
def test_full_size_sdxl_unet_holds_at_most_52_percent_of_its_bf16_bytes_under_fp8():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from diffusers import UNet2DConditionModel
    from random_sdxl import SDXL_UNET

    with torch.device("meta"):  # SDXL base 1.0's config; shapes and dtypes only
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
    bf16 = BW.weight_bytes(unet)
    assert bf16 == {"bfloat16": 2 * sum(p.numel() for p in unet.parameters())}
    assert BW.store_unet(unet, E4M3, torch.bfloat16) > 700  # every attention/FF/resnet Linear and Conv
    fp8 = BW.weight_bytes(unet)
    share = sum(fp8.values()) / sum(bf16.values())
    print(f"SDXL UNet: bf16 {bf16}, fp8 {fp8}: {share:.2%}")
    assert share <= 0.52
    assert fp8["float8_e4m3fn"] > 0.97 * sum(fp8.values())  # 97.96%: what stays bf16 is small
    for name in ("conv_in", "time_embedding.linear_1", "add_embedding.linear_2", "down_blocks.0.resnets.0.norm1",
                 "down_blocks.0.resnets.0.time_emb_proj"):
        assert unet.get_submodule(name).weight.dtype == torch.bfloat16, name


# ---- adapters on an fp8 base ---------------------------------------------------------------------------------------
def test_every_adapter_type_on_an_fp8_base_computes_as_on_its_dequantized_weights():
    """LoRA, DoRA, rsLoRA, LoHa, LoKr, Tucker, OFT, BOFT on the float8 base give the output and gradients of the
    same adapter on a plain model holding the upcast weights (the adapters read the base only through
    forward/dense_weight)."""
    tiny = tiny_model_path()
    fp8, plain = load_sdxl(tiny, base_dtype="fp8"), load_sdxl(tiny)
    with torch.no_grad():
        for module, dt in _stored(fp8.unet).items():
            assert dt == E4M3
            plain.unet.get_submodule(module).weight.copy_(BW.dense_weight(fp8.unet.get_submodule(module)))
    for name, kw in CONFIGS.items():
        outs, grads = [], []
        for model in (fp8, plain):
            torch.manual_seed(3)
            net = LoRANetwork(model, **{**NET, **kw})
            randomize(net)
            out = unet_out(model)
            out.square().mean().backward()
            outs.append(out.detach())
            # the text encoders' adapters get none here (unet_out encodes the prompts without grad)
            grads.append(torch.cat([p.grad.flatten() for p in net.trainable_parameters() if p.grad is not None]))
            net.remove()
        assert rel_err(outs[1], outs[0]) < 1e-5, name
        assert grads[0].numel() == grads[1].numel() > 0 and grads[0].abs().max() > 0, name
        assert rel_err(grads[1], grads[0]) < 1e-4, name


# ---- training ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp8_base_loss_after_30_steps_is_within_2_percent_of_bf16_base_and_the_file_layout_is_the_same(tmp_path):
    """Both bases computed in float32 (the CPU's precision), so the only difference is how the weights are held."""
    from trainer.runstore import RunReader
    from trainer.train import train

    results = {}
    for base in ("bf16", "fp8"):
        cfg = tiny_config(tmp_path / base, n_images=8, steps=30, eval_every=30, eval_size=4, rank=8, lr=2e-3,
                          base_dtype=base)
        results[base] = train(cfg)
        assert results[base].stop_reason == "finished"
    metas = {b: RunReader(r.run_dir).meta() for b, r in results.items()}
    assert metas["bf16"]["base_dtype"] == "bfloat16" and metas["fp8"]["base_dtype"] == "float8_e4m3fn"
    a, b = (results[k].summary["eval_loss_end"] for k in ("bf16", "fp8"))
    print(f"eval loss after 30 steps: bf16 base {a:.5f}, fp8 base {b:.5f} ({(b - a) / a:+.2%})")
    assert a < 0.95 * results["bf16"].summary["eval_loss_start"]  # it trained
    assert abs(b - a) / a < 0.02
    files = {}
    for base, r in results.items():
        with safe_open(r.lora_path, "pt") as f:
            files[base] = ({k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()},
                           f.metadata())
    assert files["fp8"][0] == files["bf16"][0]  # the same tensors, shapes and dtypes
    assert set(files["fp8"][1]) == set(files["bf16"][1])  # the same metadata keys
    assert files["fp8"][1]["ss_fp8_base"] == "True" and files["bf16"][1]["ss_fp8_base"] == "False"
    sd = load_file(results["fp8"].lora_path)
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert any(k.endswith("lora_up.weight") and t.abs().max() > 0 for k, t in sd.items())  # it learned


# ---- fp8 checkpoints -----------------------------------------------------------------------------------------------
def _fp8_checkpoint(path, kind: str) -> Path:
    """The tiny checkpoint with its UNet's Linear/Conv weights in float8: plain e4m3fn or e5m2 as ComfyUI and
    kohya cast them, or ComfyUI's scaled fp8 (marker + a float32 scale_weight per Linear, e4m3fn convs unscaled)."""
    sd = load_file(tiny_model_path())
    out = {}
    for k, v in sd.items():
        if not (k.startswith(UNET) and v.dim() >= 2):
            out[k] = v
        elif kind == "scaled" and v.dim() == 2:
            scale = v.float().abs().max() / 448
            out[k] = (v.float() / scale).to(E4M3)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.float8_e5m2 if kind == "e5m2" else E4M3)
    if kind == "scaled":
        out[UNET + "scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(out, path)
    return Path(path)


def _load(path, **kw):
    return load_sdxl(path, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_model_path()), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["e4m3fn", "e5m2", "scaled"])
def test_fp8_checkpoint_loads_detects_as_sdxl_and_trains_with_its_unet_held_in_fp8(tmp_path, kind):
    from trainer.train import Trainer

    path = _fp8_checkpoint(tmp_path / f"{kind}.safetensors", kind)
    stored = torch.float8_e5m2 if kind == "e5m2" else E4M3
    info = detect.read_header(str(path))
    assert detect.infer_configs(info).unet == detect.infer_configs(detect.read_header(tiny_model_path())).unet
    file_sd = load_file(path)
    # base_dtype fp32: the same file upcast (scales applied); auto and fp8 keep it fp8
    upcast = _load(path, base_dtype="fp32")
    assert upcast.stored_layers == 0 and not any(BW.is_fp8(p.dtype) for p in upcast.unet.parameters())
    w = upcast.unet.down_blocks[1].attentions[0].proj_in.weight
    key = UNET + "input_blocks.4.1.proj_in.weight"
    scale = file_sd.get(key[: -len(".weight")] + ".scale_weight", torch.tensor(1.0))
    assert torch.equal(w, file_sd[key].float() * scale)
    cfg = tiny_config(tmp_path, model=str(path), tokenizer=str(clip_tokenizers.sidecar_dir(tiny_model_path())),
                      steps=2, base_dtype="auto", gradient_checkpointing=kind == "e4m3fn")
    t = Trainer(cfg).setup()
    try:
        model = t.built.model
        assert model.arch == "tiny-sdxl" and model.base_dtype == "float8_e4m3fn"
        layers = _stored(model.unet)
        assert len(layers) == model.stored_layers > 100 and set(layers.values()) == {stored}
        live = BW.weight_bytes(model.unet)  # bytes of the live tensors
        n_fp8 = sum(v.numel() for k, v in file_sd.items() if k.startswith(UNET) and BW.is_fp8(v.dtype)
                    and not BW.keeps_compute_dtype(_diffusers_name(model, k)))
        assert live[str(stored).removeprefix("torch.")] == n_fp8
        proj_in = model.unet.down_blocks[1].attentions[0].proj_in.base  # under its LoRA wrapper
        assert torch.equal(BW.dense_weight(proj_in), w)  # the same values as the upcast load
        result = t.run()
    finally:
        t.close()
    assert result.stop_reason == "finished" and result.steps_done == 2
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_new_sd_model_hash"] == hashes.sha256_file(str(path))
    assert meta["ss_sd_model_name"] == path.name and meta["ss_sd_model_hash"] == hashes.legacy_file_hash(str(path))
    assert meta["ss_fp8_base"] == "True"


def _diffusers_name(model, key: str) -> str:
    from trainer.model import sdxl_keys as K

    names = {sgm: name for name, sgm in K.unet_module_map(K.layout_from_diffusers_config(dict(model.unet.config)))
             .items()}
    return names.get(key[len(UNET):].removesuffix(".weight"), "")


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_scaled_fp8_file_without_a_scale_names_the_file_and_the_tensor(tmp_path):
    path = _fp8_checkpoint(tmp_path / "scaled.safetensors", "scaled")
    sd = load_file(path)
    del sd[UNET + "input_blocks.4.1.proj_in.scale_weight"]
    save_file(sd, tmp_path / "noscale.safetensors")
    with pytest.raises(ModelError, match=r"noscale\.safetensors.*input_blocks\.4\.1\.proj_in\.weight"):
        _load(tmp_path / "noscale.safetensors")
    sd = load_file(path)
    sd[UNET + "input_blocks.4.1.proj_in.scale_weight"] = torch.ones(3)  # per-channel: not ComfyUI's layout
    save_file(sd, tmp_path / "perchannel.safetensors")
    with pytest.raises(ModelError, match=r"perchannel\.safetensors.*proj_in\.scale_weight.*per-tensor"):
        _load(tmp_path / "perchannel.safetensors")


def test_a_dtype_the_loader_cannot_read_names_the_file_and_the_tensor(tmp_path, monkeypatch):
    from trainer.model import tensor_file

    sd = load_file(tiny_model_path())
    key = UNET + "input_blocks.4.1.proj_in.weight"
    sd[key] = sd[key].to(E4M3)
    save_file(sd, tmp_path / "odd.safetensors")
    _relabel(tmp_path / "odd.safetensors", key, "F8_E8M0")  # a format with no mantissa: not a weight dtype
    with pytest.raises(ModelError, match=rf"odd\.safetensors: tensor {key} is stored as F8_E8M0"):
        _load(tmp_path / "odd.safetensors")
    save_file(sd, tmp_path / "fp8.safetensors")
    monkeypatch.setitem(tensor_file.DTYPES, "F8_E4M3", None)  # a torch without float8 dtypes
    with pytest.raises(ModelError, match=rf"fp8\.safetensors: tensor {key} is stored as F8_E4M3: this torch has "
                                         "no float8 dtypes"):
        _load(tmp_path / "fp8.safetensors")


def _relabel(path, key: str, dtype: str) -> None:
    """Rewrite one tensor's dtype name in a safetensors header (same byte size, so the file stays consistent)."""
    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header[key]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (math.ceil(len(raw) / 8) * 8 - len(raw))
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_base_dtype_fp8_on_a_torch_without_float8_fails_before_the_model_loads(tmp_path, monkeypatch):
    from trainer import build

    cfg = tiny_config(tmp_path, base_dtype="fp8")
    monkeypatch.setattr(BW, "fp8_dtype", lambda name=BW.FP8_TRAINING: None)
    with pytest.raises(ConfigError, match="base_dtype fp8 needs a torch with float8 dtypes"):
        build.scan_and_place(cfg)


def test_base_dtype_option_and_flag(tmp_path, monkeypatch):
    from trainer import cli
    from trainer.config import TrainConfig

    assert TrainConfig().base_dtype == "auto"
    with pytest.raises(ConfigError, match="base_dtype must be one of auto, bf16, fp16, fp32, fp8"):
        TrainConfig(base_dtype="int8").validate(require_paths=False)
    seen = []

    def run(cfg, progress):  # stands in for training: record the merged config, stop
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_run", run)
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(SystemExit):
        cli.main(["train", "--base-dtype", "fp8", "--model", tiny_model_path(), "--data", str(data), "--output",
                  str(tmp_path / "o.safetensors")])
    assert seen[0].base_dtype == "fp8"  # the flag reaches the config
