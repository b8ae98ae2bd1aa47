"""LoRA injection, training, kohya export/import, and loading our exports into a diffusers SDXL pipeline."""

import io
import json
import logging
import os
import re
import warnings

import pytest
import torch
from _lora_helpers import unet_out
from conftest import require_module
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.atomic import default_mode
from trainer.model import (
    LoRAError,
    LoRANetwork,
    encode_prompts,
    hashes,
    kohya_metadata,
    load_sdxl,
    save_lora,
    tiny_model_path,
)
from trainer.model.lora import LoRAWrapper

NAME_RE = re.compile(
    r"^lora_(unet_(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_\w+|te[12]_text_model_\w+)$"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_path():
    return tiny_model_path()


@pytest.fixture
def model(tiny_path):
    return load_sdxl(tiny_path)  # fresh per test: networks mutate the UNet


def randomize_up(network, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)


def test_zero_init_leaves_outputs_unchanged_and_base_frozen(model):
    with torch.no_grad():
        base = unet_out(model)
    net = LoRANetwork(model, rank=4, alpha=2.0, conv_rank=2, train_te=True)
    with torch.no_grad():
        assert torch.equal(unet_out(model), base)
    params = net.trainable_parameters()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for m in (model.unet, model.te1, model.te2) for p in m.parameters())
    assert not {id(p) for p in params} & {id(p) for p in model.unet.parameters()}
    names = sorted(net.loras)
    assert [id(p) for p in params] == [
        id(p) for n in names for p in (net.loras[n].lora_down.weight, net.loras[n].lora_up.weight)
    ]
    for lora in net.loras.values():
        assert torch.count_nonzero(lora.lora_up.weight) == 0 and torch.count_nonzero(lora.lora_down.weight) > 0
    # while injected the host's state dict holds only base weights (under .base.); remove() restores the names
    assert any(".base." in k for k in model.unet.state_dict())
    assert not any("lora" in k for k in model.unet.state_dict())
    net.remove()
    assert not any(isinstance(m, LoRAWrapper) for m in model.unet.modules())
    assert all(".base." not in k for k in model.unet.state_dict())


def test_sgd_steps_change_outputs_and_only_lora_moves(model):
    net = LoRANetwork(model, rank=4, alpha=4.0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with torch.no_grad():
        base = unet_out(model)
    target = torch.randn_like(base)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(unet_out(model), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert not torch.allclose(unet_out(model), base)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(torch.count_nonzero(lora.lora_up.weight) for lora in net.loras.values())


def test_lora_stays_fp32_on_a_bf16_base(tiny_path):
    model = load_sdxl(tiny_path, dtype=torch.bfloat16)
    net = LoRANetwork(model, rank=4, train_te=True)
    randomize_up(net)
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())
    out = unet_out(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    # (CLIP-L's last layer feeds no SDXL output: SDXL uses its penultimate hidden states)
    used = [n for n in net.loras if n.startswith(("lora_unet", "lora_te2")) or "layers_0_" in n]
    assert all(net.loras[n].lora_down.weight.grad.dtype == torch.float32 for n in used)


def test_text_encoder_lora_gets_gradients_through_encode_prompts(model):
    net = LoRANetwork(model, rank=2, train_te=True, te_rank=3)
    assert net.loras["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].rank == 3
    assert net.loras["lora_te2_text_model_encoder_layers_2_mlp_fc2"].rank == 3
    assert net.loras["lora_unet_input_blocks_4_1_proj_in"].rank == 2
    embeds, pooled = encode_prompts(model, ["the cat"])
    assert embeds.requires_grad and pooled.requires_grad
    (embeds.sum() + pooled.sum()).backward()
    assert net.loras["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].lora_up.weight.grad is not None
    groups = net.param_groups(1e-4, (1e-5, 2e-5))
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("te1", 1e-5), ("te2", 2e-5)]
    assert sum(len(g["params"]) for g in groups) == len(net.trainable_parameters())
    assert [g["lr"] for g in net.param_groups(1e-4)] == [1e-4] * 3


def test_dropout_and_multiplier(model):
    net = LoRANetwork(model, rank=4, dropout=0.5)
    randomize_up(net)
    model.unet.train()
    with torch.no_grad():
        a, b = unet_out(model), unet_out(model)
    assert not torch.equal(a, b)
    model.unet.eval()
    with torch.no_grad():
        c, d = unet_out(model), unet_out(model)
        assert torch.equal(c, d)
        net.set_multiplier(0.0)
        e = unet_out(model)
        net.remove()
        assert torch.equal(e, unet_out(model))


def test_kohya_export_names_and_atomic_save(model, tmp_path):
    net = LoRANetwork(model, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_te=True)
    randomize_up(net)
    sd = net.kohya_state_dict(torch.float16)
    modules = {k.split(".")[0] for k in sd}
    assert modules == set(net.loras)
    for m in modules:
        assert NAME_RE.match(m), m
        assert sd[f"{m}.lora_down.weight"].dtype == torch.float16
        assert sd[f"{m}.alpha"].ndim == 0
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_input_blocks_3_0_op" in modules  # LoCon downsampler
    assert float(sd["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0
    assert float(sd["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 2.0

    meta = kohya_metadata(
        network=net, model=model, output_name="emo", steps=10, epoch=2, resolution=64, learning_rate=1e-4,
        text_encoder_lr=5e-5, optimizer="emonavi.EmoNavi", optimizer_args={"betas": (0.9, 0.99)},
        num_train_images=3, tag_frequency={"1_cat": {"cat": 3}}, seed=7, lr_scheduler="constant",
        extra={"emolora_optimizer_telemetry": {"emotion": [0.1, 0.2]}},
    )  # fmt: skip
    path = save_lora(tmp_path / "out" / "emo.safetensors", net, meta)
    assert os.listdir(tmp_path / "out") == ["emo.safetensors"]
    assert os.stat(path).st_mode & 0o777 == default_mode()  # not mkstemp's 0600
    with safe_open(path, "pt") as f:
        md = f.metadata()
        assert set(f.keys()) == set(sd)
    assert all(isinstance(v, str) for v in md.values())
    expect = {
        "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", "ss_network_dim": "4",
        "ss_network_alpha": "2.0", "ss_v2": "False", "ss_steps": "10", "ss_epoch": "2", "ss_resolution": "(64, 64)",
        "ss_optimizer": "emonavi.EmoNavi(betas=(0.9, 0.99))", "ss_seed": "7", "ss_lr_scheduler": "constant",
        "ss_num_train_images": "3", "ss_text_encoder_lr": "5e-05", "ss_sd_model_name": "tiny-sdxl-v1.safetensors",
        "ss_new_sd_model_hash": model.model_hash, "ss_sd_model_hash": model.legacy_hash,
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon", "modelspec.title": "emo",
        "emolora_optimizer_telemetry": '{"emotion": [0.1, 0.2]}',
    }  # fmt: skip
    for key, value in expect.items():
        assert md[key] == value, key
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert json.loads(md["ss_tag_frequency"]) == {"1_cat": {"cat": 3}}
    for key in ("ss_training_started_at", "ss_training_finished_at", "modelspec.date", "modelspec.sai_model_spec"):
        assert md[key]
    # kohya's sshs hashes: over the file serialised with only the ss_* metadata
    from safetensors.torch import save

    probe = save(load_file(path), {k: v for k, v in md.items() if k.startswith("ss_")})
    assert md["sshs_model_hash"] == hashes.safetensors_data_hash(probe)
    assert md["sshs_legacy_hash"] == hashes.legacy_bytes_hash(probe)


def test_save_failure_leaves_no_partial_file(model, tmp_path, monkeypatch):
    net = LoRANetwork(model, rank=2)
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"previous good file")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        save_lora(target, net, {"ss_network_dim": "2"})
    assert target.read_bytes() == b"previous good file"
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_load_kohya_round_trip_and_errors(model, tiny_path, tmp_path):
    net = LoRANetwork(model, rank=4, alpha=0.3, conv_rank=2, train_te=True)
    randomize_up(net)
    with torch.no_grad():
        expected = unet_out(model)
    path = save_lora(tmp_path / "a.safetensors", net, {}, dtype=torch.float32)

    other = load_sdxl(tiny_path)
    net2 = LoRANetwork(other, rank=4, alpha=16.0, conv_rank=2, train_te=True)
    info = net2.load_kohya(path)
    assert info == {"loaded": len(net.loras), "missing": [], "unknown": [], "steps_before": 0}
    a, b = net.kohya_state_dict(torch.float32), net2.kohya_state_dict(torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert net2.loras["lora_unet_input_blocks_4_1_proj_in"].alpha == pytest.approx(0.3)
    with torch.no_grad():
        assert torch.equal(unet_out(other), expected)

    # kohya files spelled with diffusers module names load too
    diff = {k.replace("lora_unet_input_blocks_4_1_", "lora_unet_down_blocks_1_attentions_0_"): v for k, v in a.items()}
    net2.load_kohya(diff)

    third = load_sdxl(tiny_path)
    wrong_rank = LoRANetwork(third, rank=8, conv_rank=2, train_te=True)
    with pytest.raises(LoRAError, match=r"a\.safetensors: .*lora_down\.weight: rank mismatch.* rank 4 .* rank 8"):
        wrong_rank.load_kohya(path)
    wrong_rank.remove()
    unet_only = LoRANetwork(third, rank=4)
    with pytest.raises(LoRAError, match="no counterpart"):
        unet_only.load_kohya(path)
    info = unet_only.load_kohya(path, strict=False)
    assert info["loaded"] == len(unet_only.loras) and info["unknown"]
    with pytest.raises(LoRAError, match="hada_w1_a is a loha module but this network trains lora"):
        unet_only.load_kohya({"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(LoRAError, match="cannot read"):
        unet_only.load_kohya(tmp_path / "missing.safetensors")
    with pytest.raises(LoRAError, match="already carries"):
        LoRANetwork(third, rank=4)


def _capture_lib_logs():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    # Another test (ComfyUI in-process) may have set these libraries' verbosity to errors only.
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)

    def done():
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)

    return buf, done


def _pipeline(model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sched = EulerDiscreteScheduler(
        **{k: v for k, v in model.scheduler_config.items() if k not in ("clip_sample", "rescale_betas_zero_snr")}
    )
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.te1, text_encoder_2=model.te2, tokenizer=model.tokenizer1,
        tokenizer_2=model.tokenizer2, unet=model.unet, scheduler=sched,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of the cat", height=64, width=64, num_inference_steps=2, output_type="np", generator=g).images


def _load_clean(pipe, src):
    buf, done = _capture_lib_logs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(src)
    finally:
        done()
    text = buf.getvalue() + "\n".join(str(w.message) for w in caught)
    return text


# what diffusers/peft say about keys they could not place (the wording varies with what was logged before)
COMPLAINT = r"unexpected|missing|not loaded|not found|unmatched|incompatible|did not match|ignored"


def test_diffusers_pipeline_loads_our_export_without_key_problems(tiny_path, tmp_path):
    require_module("peft", "diffusers' load_lora_weights needs peft (requirements-dev.txt)")
    trained = load_sdxl(tiny_path)
    net = LoRANetwork(trained, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_te=True)
    randomize_up(net, std=0.5)
    path = save_lora(tmp_path / "lora.safetensors", net, {"ss_network_dim": "4"}, dtype=torch.float32)

    pipe = _pipeline(load_sdxl(tiny_path))
    before = _image(pipe)
    log_text = _load_clean(pipe, str(path))
    assert not re.search(COMPLAINT, log_text, re.I), log_text
    after = _image(pipe)
    assert before.shape == (1, 64, 64, 3)
    assert abs(after - before).max() > 1e-3

    # diffusers applies exactly the network we trained (same modules, same alpha/rank scale)
    with torch.no_grad():
        ours, theirs = unet_out(trained), unet_out(_model_view(pipe, trained))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # negative control: the capture does see diffusers' complaint about a module that does not exist
    bogus = load_file(path)
    k = "lora_unet_output_blocks_0_1_transformer_blocks_7_attn1_to_q"
    bogus[f"{k}.lora_down.weight"], bogus[f"{k}.lora_up.weight"] = torch.zeros(4, 64), torch.zeros(64, 4)
    bogus[f"{k}.alpha"] = torch.tensor(4.0)
    pipe2 = _pipeline(load_sdxl(tiny_path))
    assert re.search(COMPLAINT, _load_clean(pipe2, bogus), re.I)


def _model_view(pipe, like):
    """An SDXLModel-like view of the pipeline's (LoRA-carrying) networks, for unet_out()."""
    from types import SimpleNamespace

    return SimpleNamespace(
        unet=pipe.unet,
        te1=pipe.text_encoder,
        te2=pipe.text_encoder_2,
        tokenizer1=like.tokenizer1,
        tokenizer2=like.tokenizer2,
    )


def test_diffusers_applies_rslora_as_trained_and_drops_dora(tiny_path, tmp_path):
    """rsLoRA files are plain kohya LoRA with alpha * sqrt(rank): diffusers applies the trained scale. diffusers
    (0.42) drops every dora_scale of a kohya SDXL file, so a DoRA loads there as its plain LoRA part only (the
    README says so; this test notices when that changes)."""
    require_module("peft", "diffusers' load_lora_weights needs peft (requirements-dev.txt)")
    for kind in ("rslora", "dora"):
        trained = load_sdxl(tiny_path)
        net = LoRANetwork(trained, rank=4, alpha=3.0, conv_rank=2, train_te=True, **{kind: True})
        randomize_up(net, std=0.5)
        path = save_lora(tmp_path / f"{kind}.safetensors", net, {}, dtype=torch.float32)
        pipe = _pipeline(load_sdxl(tiny_path))
        log_text = _load_clean(pipe, str(path))
        with torch.no_grad():
            ours, theirs = unet_out(trained), unet_out(_model_view(pipe, trained))
        err = float((ours - theirs).abs().max() / ours.abs().max())
        if kind == "rslora":
            assert not re.search(COMPLAINT, log_text, re.I), log_text
            assert err < 1e-4, err
        else:
            assert "filter out the keys associated to 'dora_scale`" in log_text
            assert err > 1e-3
