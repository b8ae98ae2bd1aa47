"""Loading SDXL-family checkpoints offline: tiny single file, diffusers folder, rejections, tokenizers."""

import hashlib
import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.model import (
    ModelError,
    build_tiny_sdxl,
    clip_tokenizers,
    encode_latents,
    encode_prompts,
    hashes,
    load_sdxl,
    loader,
    tiny_model_path,
)
from trainer.model.tiny import TINY_MERGES, build_vega_layout, tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_path():
    return tiny_model_path()


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_sdxl(tiny_path)


def copy_without_tokenizer(src, folder, extra=None):
    """The tiny checkpoint (optionally with extra tensors) in a folder with no tokenizer beside it."""
    dst = os.path.join(folder, "model.safetensors")
    if extra:
        sd = load_file(src)
        sd.update(extra)
        save_file(sd, dst)
    else:
        shutil.copy(src, dst)
    return dst


def test_tiny_is_small_deterministic_and_cached(tiny_path, tmp_path):
    assert os.path.getsize(tiny_path) < 20e6
    assert os.path.isdir(clip_tokenizers.sidecar_dir(tiny_path))
    a, b = build_tiny_sdxl(tmp_path / "a.safetensors"), build_tiny_sdxl(tmp_path / "b.safetensors")
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b, tiny_path)]
    assert digest[0] == digest[1] == digest[2]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # the atomic writer's temporaries
    assert tiny_model_path() == tiny_path


def test_tiny_cache_root_env(tmp_path, monkeypatch, tiny_path):
    monkeypatch.setenv("EMOLORA_CACHE", str(tmp_path))
    path = tiny_model_path()
    assert path.startswith(str(tmp_path)) and os.path.isfile(path)
    assert os.path.isdir(os.path.join(tmp_path, "models", "tiny-sdxl-v1_tokenizer", "tokenizer_2"))


def test_tiny_loads_with_the_config_it_was_built_with(tiny, tiny_path):
    vocab = len(tiny.tokenizer1)
    built = tiny_configs(vocab)
    for key, value in built["unet"].items():
        assert tiny.unet.config[key] == value, key
    for key, value in built["vae"].items():
        assert tiny.vae.config[key] == value, key
    for te, cfg in ((tiny.te1, built["te1"]), (tiny.te2, built["te2"])):
        for key, value in cfg.items():
            assert getattr(te.config, key) == value, key
    assert tiny.arch == "tiny-sdxl" and tiny.prediction_type == "epsilon" and not tiny.zero_terminal_snr
    assert tiny.vae.dtype == torch.float32 and tiny.unet.dtype == torch.float32
    assert not any(p.requires_grad for p in tiny.unet.parameters()) and not tiny.unet.training
    assert tiny.tokenizer_source[0].endswith(os.path.join("tiny-sdxl-v1_tokenizer", "tokenizer"))
    assert tiny.model_hash == hashlib.sha256(open(tiny_path, "rb").read()).hexdigest()
    with open(tiny_path, "rb") as f:
        f.seek(0x100000)
        assert tiny.legacy_hash == hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    # fp16 on disk, fp32 in memory: the weights are exactly the stored ones.
    raw = load_file(tiny_path)
    q = tiny.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(q, raw["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"].float())


def test_loaded_tensors_are_owned_and_aligned(tiny_path, tmp_path):
    """Fresh 64-byte-aligned copies, not views of the file's memory map (whose offsets follow the header and make
    the BLAS pick other kernels): overwriting the file in place afterwards changes nothing that was loaded."""
    path = copy_without_tokenizer(tiny_path, tmp_path)
    model = load_sdxl(path, dtype=torch.float16, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_path))  # as stored
    tensors = [t for net in (model.unet, model.te1, model.te2, model.vae) for t in (*net.parameters(), *net.buffers())]
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
    before = [t.clone() for t in tensors]
    with open(path, "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start)
        f.write(b"\xff" * (os.path.getsize(path) - data_start))  # same inode: a mapped tensor would see this
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))


def test_weights_match_diffusers_single_file_converters(tiny, tiny_path):
    """Independent check of every converted tensor against diffusers' own LDM converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    raw = {k: v.float() for k, v in load_file(tiny_path).items()}
    ours = tiny.unet.state_dict()
    theirs = convert_ldm_unet_checkpoint(raw, dict(tiny.unet.config))
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    ours = tiny.vae.state_dict()
    theirs = convert_ldm_vae_checkpoint(raw, dict(tiny.vae.config))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    ours = tiny.te2.state_dict()
    theirs = convert_open_clip_checkpoint(tiny.te2, raw, prefix="conditioner.embedders.1.model.")
    assert set(theirs) == {k for k in ours if not k.endswith("position_ids")}
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_checkpoint_hash_is_cached_per_file_version(tmp_path, tiny_path, monkeypatch, caplog):
    """A second start reads the hash from the cache (only the file's metadata); a touched, edited or replaced
    file is hashed again."""
    monkeypatch.setenv("EMOLORA_CACHE", str(tmp_path / "cache"))
    path = copy_without_tokenizer(tiny_path, tmp_path)
    calls = []
    real = hashes.sha256_file
    monkeypatch.setattr(hashes, "sha256_file", lambda p: calls.append(p) or real(p))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    first = load_sdxl(path, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_path))
    assert first.model_hash == digest and len(calls) == 1
    second = load_sdxl(path, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_path))
    assert second.model_hash == digest and len(calls) == 1  # no byte of the body was hashed
    assert json.loads((tmp_path / "cache" / "model_hashes.json").read_text())[path]["sha256"] == digest

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert hashes.cached_sha256(path) == digest and len(calls) == 2
    assert hashes.cached_sha256(path) == digest and len(calls) == 2
    # replaced by a same-size file with the old mtime (cp -p, a rename over it): the inode tells
    edited = tmp_path / "edited.safetensors"
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    edited.write_bytes(bytes(data))
    st = os.stat(path)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(edited, path)
    assert hashes.cached_sha256(path) == hashlib.sha256(data).hexdigest() and len(calls) == 3
    # an unreadable cache costs a rehash, not the run
    (tmp_path / "cache" / "model_hashes.json").write_text("{half")
    assert hashes.cached_sha256(path) == hashlib.sha256(data).hexdigest() and len(calls) == 4
    assert "unreadable" in caplog.text


def test_encode_prompts_and_latents(tiny):
    captions = ["a photo of the cat", ""]
    embeds, pooled = encode_prompts(tiny, captions)
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
    assert not embeds.requires_grad
    ids1 = tiny.tokenizer1(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = tiny.tokenizer2(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = tiny.tokenizer1.eos_token_id
    assert ids1[1, 2:].eq(eos).all() and ids2[1, 2:].eq(0).all()  # CLIP-L pads with EOS, bigG with "!" (id 0)
    assert tiny.tokenizer2.convert_ids_to_tokens(0) == "!"
    with torch.no_grad():
        h1 = tiny.te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = tiny.te2(ids2, output_hidden_states=True)
    assert torch.equal(embeds, torch.cat([h1, out2.hidden_states[-2]], -1))
    assert torch.equal(pooled, out2.text_embeds)
    # pooled = projection of the (final-normed) last hidden state at the first EOS token
    eos_pos = ids2[0].tolist().index(eos)
    manual = tiny.te2.text_projection(out2.last_hidden_state)[0, eos_pos]
    assert torch.allclose(pooled[0], manual, atol=1e-6)

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = encode_latents(tiny, images, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 8, 8) and lat.dtype == torch.float32
    assert torch.equal(lat, encode_latents(tiny, images, generator=torch.Generator().manual_seed(0)))
    mode = encode_latents(tiny, images, sample=False)
    with torch.no_grad():
        expect = tiny.vae.encode(images).latent_dist.mode() * 0.13025
    assert torch.allclose(mode, expect)
    with pytest.raises(ValueError):
        encode_latents(tiny, torch.zeros(1, 4, 64, 64))


def test_diffusers_folder_loads_the_same_model(tiny, tmp_path):
    from diffusers import EulerDiscreteScheduler

    folder = tmp_path / "pipe"
    for sub, net in (("unet", tiny.unet), ("text_encoder", tiny.te1), ("text_encoder_2", tiny.te2), ("vae", tiny.vae)):
        net.save_pretrained(folder / sub)
    tiny.tokenizer1.save_pretrained(folder / "tokenizer")
    tiny.tokenizer2.save_pretrained(folder / "tokenizer_2")
    sched = {k: v for k, v in tiny.scheduler_config.items() if k != "clip_sample"}
    EulerDiscreteScheduler(**dict(sched, prediction_type="v_prediction")).save_pretrained(folder / "scheduler")
    model = load_sdxl(folder)
    assert model.arch == "tiny-sdxl" and model.prediction_type == "v_prediction"
    assert model.tokenizer_source == (str(folder / "tokenizer"), str(folder / "tokenizer_2"))
    assert dict(model.unet.config)["transformer_layers_per_block"] == tiny.unet.config.transformer_layers_per_block
    # The weights are the same bits; the modules are built by two code paths (meta + assign vs from_pretrained),
    # whose kernels may differ, so their outputs are compared with float32's rounding slack (see assert_same_maths).
    for ours, theirs in ((tiny.unet, model.unet), (tiny.te1, model.te1), (tiny.te2, model.te2), (tiny.vae, model.vae)):
        sd_a, sd_b = ours.state_dict(), theirs.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        assert all(t.data_ptr() % 64 == 0 for t in (*theirs.parameters(), *theirs.buffers()))
    a, pa = encode_prompts(tiny, ["the cat"])
    b, pb = encode_prompts(model, ["the cat"])
    assert_same_maths(a, b)
    assert_same_maths(pa, pb)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = {"text_embeds": pa, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():  # the same inputs for both, so only the UNets are compared
        assert_same_maths(
            tiny.unet(x, t, a, added_cond_kwargs=cond).sample, model.unet(x, t, a, added_cond_kwargs=cond).sample
        )
    assert len(model.model_hash) == 64


def assert_same_maths(expected, actual):
    """Equal up to float32 rounding: a different kernel (BLAS, CPU, alignment, threads) sums in another order,
    moving a result by a few ulps of the largest terms (the AMD EPYC case: 2.4e-7 on pooled values of order 1).
    1e-6 of the tensor's largest magnitude is ~8 ulps at that scale; a wrong weight, transpose or layer moves
    the outputs by 1e-2 or more."""
    assert torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale)


def test_folder_without_text_encoder_2_is_rejected(tmp_path, tiny):
    folder = tmp_path / "sd15"
    tiny.te1.save_pretrained(folder / "text_encoder")
    for sub in ("unet", "vae"):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no text_encoder_2"):
        load_sdxl(folder)


def _fake(path, tensors):
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in tensors.items()}, str(path))
    return str(path)


UNET_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize(
    "kind, tensors, found",
    [
        ("sd15", {UNET_K: (8, 768), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
         "SD1.x layout .*context 768"),
        ("sd2", {UNET_K: (8, 1024), "cond_stage_model.model.ln_final.weight": (1024,)}, "SD2.x layout .*context 1024"),
        ("flux", {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (8, 4),
                  "model.diffusion_model.img_in.weight": (8, 4)}, "Flux"),
        ("flux_bare", {"double_blocks.0.img_attn.qkv.weight": (8, 4), "img_in.weight": (8, 4)}, "Flux"),
        ("refiner", {UNET_K: (8, 1280), "conditioner.embedders.0.model.ln_final.weight": (1280,)}, "refiner"),
        ("lora", {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 8)}, "LoRA"),
        ("vae_only", {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}, "no UNet weights"),
    ],
)  # fmt: skip
def test_non_sdxl_checkpoints_are_rejected_before_loading(tmp_path, monkeypatch, kind, tensors, found):
    path = _fake(tmp_path / f"{kind}_model.safetensors", tensors)

    def boom(*a, **k):
        raise AssertionError("tensors were read before the family check")

    monkeypatch.setattr(loader, "_read_tensors", boom)
    with pytest.raises(ModelError, match=f"{kind}_model.safetensors") as err:
        load_sdxl(path)
    assert "not an SDXL-family checkpoint" in str(err.value)
    assert re.search(found, str(err.value)), str(err.value)


def test_missing_corrupt_and_wrong_type_files(tmp_path, tiny_path):
    with pytest.raises(ModelError, match="not found: .*nope.safetensors"):
        load_sdxl(tmp_path / "nope.safetensors")
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_sdxl(bad)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(tiny_path, "rb").read()[:2_000_000])
    with pytest.raises(ModelError, match="cut.safetensors"):
        load_sdxl(truncated)
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelError, match="old.ckpt"):
        load_sdxl(ckpt)


@pytest.mark.parametrize("key, what", [
    ("model.diffusion_model.input_blocks.1.0.extra.weight", "UNet"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.extra", "OpenCLIP bigG"),
    ("first_stage_model.encoder.mid.attn_1.extra.weight", "VAE"),
])  # fmt: skip
def test_a_tensor_without_a_place_is_refused_not_dropped(tmp_path, tiny_path, key, what):
    path = copy_without_tokenizer(tiny_path, tmp_path, {key: torch.zeros(2, dtype=torch.float16)})
    with pytest.raises(ModelError, match=f"model.safetensors: 1 {what} tensors do not fit .*extra"):
        load_sdxl(path, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_path))


def test_v_pred_and_ztsnr_keys_are_detected(tmp_path, tiny_path):
    path = copy_without_tokenizer(tiny_path, tmp_path, {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    model = load_sdxl(path, tokenizer_dir=clip_tokenizers.sidecar_dir(tiny_path))
    assert model.prediction_type == "v_prediction" and model.zero_terminal_snr
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True


def test_tokenizer_resolution(tmp_path, tiny_path, monkeypatch):
    monkeypatch.setattr(clip_tokenizers, "comfy_tokenizer_dir", lambda: None)
    path = copy_without_tokenizer(tiny_path, tmp_path)
    with pytest.raises(ModelError, match="--tokenizer DIR"):
        load_sdxl(path)
    with pytest.raises(ModelError, match="neither tokenizer/"):
        load_sdxl(path, tokenizer_dir=tmp_path)
    # one plain CLIP vocab folder serves both encoders; bigG still pads with "!"
    single = os.path.join(clip_tokenizers.sidecar_dir(tiny_path), "tokenizer")
    model = load_sdxl(path, tokenizer_dir=single)
    assert model.tokenizer_source == (single, single)
    assert model.tokenizer2.pad_token_id == 0 and model.tokenizer1.pad_token == "<|endoftext|>"
    # a vocabulary larger than the text encoders' embeddings is refused up front
    big = tmp_path / "big"
    clip_tokenizers.write_bpe(str(big), TINY_MERGES + [f"{a} {b}" for a in "xyz" for b in "xyzw"])
    with pytest.raises(ModelError, match="tokenizer has .* tokens"):
        load_sdxl(path, tokenizer_dir=big)


def test_comfyui_bundled_tokenizer_is_found_without_importing_comfy(tmp_path, tiny_path, monkeypatch):
    pkg = tmp_path / "site" / "comfy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('comfy must not be imported')\n")
    shutil.copytree(os.path.join(clip_tokenizers.sidecar_dir(tiny_path), "tokenizer"), pkg / "sd1_tokenizer")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = copy_without_tokenizer(tiny_path, tmp_path)
    model = load_sdxl(path)
    assert model.tokenizer_source[0] == str(pkg / "sd1_tokenizer") == model.tokenizer_source[1]
    assert model.tokenizer2.pad_token_id == 0
    assert "comfy" not in sys.modules


def test_sdxl_scheduler_defaults(tiny):
    cfg = tiny.scheduler_config
    assert (cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], cfg["num_train_timesteps"]) == (
        0.00085, 0.012, "scaled_linear", 1000
    )  # fmt: skip
    json.dumps(cfg)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("EMOLORA_SLOW_TESTS"), reason="builds a 3.3 GB checkpoint; set EMOLORA_SLOW_TESTS=1"
)
def test_vega_layout_builds_and_loads(tmp_path):
    path = build_vega_layout(tmp_path / "vega.safetensors")
    model = load_sdxl(path, dtype=torch.float16)
    assert model.arch == "vega"
    assert model.unet.config.cross_attention_dim == 2048 and model.te2.config.num_hidden_layers == 32
