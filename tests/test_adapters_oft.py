"""OFT and BOFT (LyCORIS's Diag-OFT and butterfly OFT): LyCORIS's block layouts, our output-side forward against
LyCORIS's merged-weight formula (written here independently, BOFT as explicit permutation matrices), continuing
from a LyCORIS-layout file, the file's metadata, the refused settings, and runs through the trainer (two
optimizers, a stopped-and-resumed run bit-identical, the CLI continuing its own file). ComfyUI applying our files
exactly is in test_adapters_comfy.py (CONFIGS)."""

import json

import pytest
import torch
import torch.nn.functional as F
from _lora_helpers import CONFIGS, NET, make, unet_out
from _trainer_helpers import make_dataset, trained_then_resumed
from safetensors import safe_open
from safetensors.torch import save_file
from test_train_resume import assert_same_lora, losses
from torch import nn

from trainer.config import ConfigError, TrainConfig
from trainer.model import LoRAError, LoRANetwork, kohya_metadata, load_sdxl, save_lora, tiny_model_path
from trainer.model.adapters import ADAPTERS, factorization
from trainer.oft_rules import boft_layout, boft_stages, boft_width_error, oft_layout

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a 64 x 64 linear of the tiny UNet
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # a 3x3 conv, 32 outputs (conv_rank 2)
SDXL_UNET_WIDTHS = (320, 640, 1280, 2560, 5120, 10240)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path()


# ---------------------------------------------------------------------------------------------- layouts
def test_block_layouts_follow_lycoris():
    # Diag-OFT: {dim, out/dim} when dim divides out (dim is the block COUNT when dim^2 > out), else balanced
    assert oft_layout(320, 4) == (4, 80) and oft_layout(320, 16) == (16, 20) and oft_layout(320, 32) == (10, 32)
    assert oft_layout(640, 64) == (10, 64) and oft_layout(13, 2) == (1, 13)
    for dim in (13, 96, 250, 320, 360, 768, 1280):
        for f in (3, 7, 12, 33):
            if dim % f:  # where f does not divide, LyCORIS's factorization is LoKr's (tested against ComfyUI's)
                assert oft_layout(dim, f) == factorization(dim, f), (dim, f)
    # BOFT: the largest even block size <= dim leaving a power-of-two block count; stages = log2(blocks) + 1
    assert boft_layout(320, 16) == (10, 32) and boft_stages(32) == 6
    assert boft_layout(640, 16) == (10, 64) and boft_stages(64) == 7 and boft_layout(320, 32) == (20, 16)
    assert boft_layout(768, 6) == (6, 128) and boft_layout(64, 4) == (4, 16) and boft_stages(1) == 1
    assert boft_layout(320, 8) is None and boft_layout(7, 100) is None
    # SDXL's UNet widths are 5 * 2^k: BOFT needs rank >= 10 there, which the message says
    assert boft_width_error(SDXL_UNET_WIDTHS, 10) is None
    msg = boft_width_error(SDXL_UNET_WIDTHS, 8)
    assert msg.startswith("network boft cannot split a layer of width 320 with rank 8") and "rank >= 10" in msg


# ---------------------------------------------------------------------------------------------- the maths
def lycoris_rotation(blocks, multiplier=1.0):
    """Cayley R = (I + Q) @ inverse(I - Q) per block, LyCORIS's get_r, blended as r * s + (1 - s) * I."""
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.inverse(eye - q) * multiplier + (1 - multiplier) * eye


def lycoris_oft_weight(w, blocks, multiplier=1.0):
    r = lycoris_rotation(blocks, multiplier)
    k, n, _ = blocks.shape
    return torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(k, n, *w.shape[1:])).reshape(w.shape)


def boft_matrix(blocks, out_dim, multiplier=1.0):
    """The whole out x out BOFT map as a product of stage matrices P_i^T diag(R_i) P_i, the permutation P_i taken
    from LyCORIS's index shuffle applied to arange(out)."""
    r = lycoris_rotation(blocks, multiplier)
    m, _, b, _ = blocks.shape
    total = torch.eye(out_dim, dtype=blocks.dtype)
    for i in range(m):
        k = 2 ** i * (b // 2)
        perm = torch.arange(out_dim).unflatten(0, (-1, 2, k)).transpose(1, 2).flatten()
        p = torch.eye(out_dim, dtype=blocks.dtype)[perm]  # (p @ v)[j] = v[perm[j]]
        total = p.T @ torch.block_diag(*r[i]) @ p @ total
    return total


def lycoris_boft_weight(w, blocks, rescale=None, multiplier=1.0):
    out = (boft_matrix(blocks, w.shape[0], multiplier) @ w.flatten(1)).reshape(w.shape)
    return out if rescale is None else out * rescale


def _layer_out(layer, x, w):
    return F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else F.conv2d(x, w, layer.bias, padding=1)


@pytest.mark.parametrize("network,rescale", [("oft", False), ("boft", False), ("boft", True)])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_forward_is_lycoris_merged_weight(network, rescale, multiplier):
    """Our forward rotates the layer's output; LyCORIS (and ComfyUI at strength 1) rotate the weight's rows."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for layer, x in ((nn.Linear(24, 64).double(), torch.randn(3, 5, 24, dtype=torch.float64)),
                     (nn.Conv2d(8, 16, 3, padding=1).double(), torch.randn(2, 8, 5, 5, dtype=torch.float64))):
        adapter = ADAPTERS[network]("m", layer, 4, None, oft_rescale=rescale).double()
        adapter.multiplier = multiplier
        with torch.no_grad():
            adapter.oft_blocks.copy_(torch.randn(adapter.oft_blocks.shape, generator=g, dtype=torch.float64) * 0.3)
            if rescale:
                adapter.rescale.copy_(1 + 0.2 * torch.randn(adapter.rescale.shape, generator=g, dtype=torch.float64))
            blocks = adapter.oft_blocks.detach()
            if network == "oft":
                want_w = lycoris_oft_weight(layer.weight, blocks, multiplier)
            else:
                want_w = lycoris_boft_weight(layer.weight, blocks, adapter.rescale if rescale else None, multiplier)
            got, want = adapter(layer, x), _layer_out(layer, x, want_w)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), float((got - want).abs().max())
        assert not torch.allclose(got, layer(x), atol=1e-3)  # the rotation does act
        assert torch.allclose(adapter.merged_weight(layer.weight).double(), want_w.float().double(), atol=1e-6)


def test_zero_blocks_start_at_the_base_model_and_every_optimizer_moves_them():
    from trainer.optim import OPTIMIZER_INFO, OPTIMIZERS, create_optimizer

    torch.manual_seed(0)
    layers = [nn.Linear(32, 64), nn.Linear(7, 8), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(5, 4, 1)]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 32, generator=g), torch.randn(4, 7, generator=g), torch.randn(2, 8, 5, 5, generator=g),
          torch.randn(2, 5, 5, 5, generator=g)]
    for network, rescale in (("oft", False), ("boft", True)):
        fresh = [ADAPTERS[network](f"m{i}", layer, 2, None, oft_rescale=rescale) for i, layer in enumerate(layers)]
        with torch.no_grad():
            assert all(torch.allclose(a(layer, x), layer(x), atol=1e-6) for a, layer, x in zip(fresh, layers, xs))
        for name in OPTIMIZERS:
            adapters = [ADAPTERS[network](f"m{i}", layer, 2, None, oft_rescale=rescale)
                        for i, layer in enumerate(layers)]
            params = [p for a in adapters for p in a.trainable()]
            before = [p.detach().clone() for p in params]
            opt = create_optimizer(name, params, lr=OPTIMIZER_INFO[name].recommended_lr)
            for _ in range(3):
                opt.zero_grad()
                loss = sum(a(layer, x).square().mean() for a, layer, x in zip(adapters, layers, xs))
                loss.backward()
                opt.step(loss=loss.detach())
            assert all(torch.isfinite(p).all() for p in params), (name, network)
            assert all(not torch.equal(a, b) for a, b in zip(before, params)), (name, network)


# ---------------------------------------------------------------------------------------------- files
def test_export_layout_and_metadata(tiny, tmp_path):
    for name, algo in (("oft", "diag-oft"), ("boft", "boft"), ("boft-rescale", "boft")):
        model, net = make(tiny, **CONFIGS[name])
        sd = net.kohya_state_dict(torch.float16)
        rescaled = name == "boft-rescale"
        for module in net.loras:
            assert {k.split(".", 1)[1] for k in sd if k.split(".", 1)[0] == module} == \
                {"oft_blocks", "alpha", *(["rescale"] if rescaled else [])}, module
            assert float(sd[f"{module}.alpha"]) == 0.0 and sd[f"{module}.alpha"].dtype == torch.float32
        if name == "oft":  # rank 4 on 64 outputs: 16 blocks of 4; conv_rank 2 on 32: 16 blocks of 2
            assert sd[f"{Q}.oft_blocks"].shape == (16, 4, 4) and sd[f"{CONV}.oft_blocks"].shape == (16, 2, 2)
        else:  # rank 6 on 64: blocks of 4, 16 blocks, 5 stages; conv_rank 2 on 32: 16 blocks of 2
            assert sd[f"{Q}.oft_blocks"].shape == (5, 16, 4, 4) and sd[f"{CONV}.oft_blocks"].shape == (5, 16, 2, 2)
        if rescaled:
            assert sd[f"{Q}.rescale"].shape == (64, 1) and sd[f"{CONV}.rescale"].shape == (32, 1, 1, 1)
        meta = kohya_metadata(network=net, output_name="x", steps=5, epoch=1, learning_rate=1e-4)
        path = save_lora(tmp_path / f"{name}.safetensors", net, meta)
        with safe_open(path, "pt") as f:
            md = f.metadata()
        assert md["ss_network_module"] == "lycoris.kohya"
        want = {"algo": algo, "conv_dim": "2", "conv_alpha": "1.5", "constraint": "0"}
        assert json.loads(md["ss_network_args"]) == ({**want, "rescaled": "True"} if rescaled else want)
        assert md["ss_network_dim"] == str(NET["rank"] if name == "oft" else 6)


def _lycoris_file(net, network, rescale, g):
    """What LyCORIS's kohya wrapper saves for this network: oft_blocks per module, the constraint buffer
    `alpha` (0, cast to the save dtype like every tensor) and `rescale` when rescaled."""
    sd = {}
    for name, adapter in net.loras.items():
        b, n = adapter.block_size, adapter.block_num
        shape = (n, b, b) if network == "oft" else (boft_stages(n), n, b, b)
        sd[f"{name}.oft_blocks"] = (torch.randn(shape, generator=g) * 0.2).half()
        sd[f"{name}.alpha"] = torch.tensor(0.0).half()
        if rescale:
            sd[f"{name}.rescale"] = (1 + 0.1 * torch.randn(adapter.rescale.shape, generator=g)).half()
    return sd


@pytest.mark.parametrize("name", ["oft", "boft-rescale"])
def test_continue_from_a_lycoris_file_gives_lycoris_model(tiny, tmp_path, name):
    kw = {**CONFIGS[name], "train_te": False}
    network, rescale = kw["network"], kw.get("oft_rescale", False)
    model, net = make(tiny, **kw)
    sd = _lycoris_file(net, network, rescale, torch.Generator().manual_seed(5))
    meta = {"ss_network_module": "lycoris.kohya", "ss_steps": "40",
            "ss_network_args": json.dumps({"algo": "diag-oft" if network == "oft" else "boft", "constraint": "0"})}
    save_file(sd, tmp_path / "lycoris.safetensors", meta)
    info = net.load_weights(tmp_path / "lycoris.safetensors")
    assert info["loaded"] == len(net.loras) and info["steps_before"] == 40
    with torch.no_grad():
        ours = unet_out(model)
    # the same model with LyCORIS's merged weights in place of every adapted layer
    merged = load_sdxl(tiny)
    view = LoRANetwork(merged, **{**NET, **kw}, multiplier=0.0)
    with torch.no_grad():
        for _, _, wrapper in view._wrapped:
            name_, base = wrapper.lora.lora_name, wrapper.base
            blocks = sd[f"{name_}.oft_blocks"].double()
            w = base.weight.double()
            if network == "oft":
                w = lycoris_oft_weight(w, blocks)
            else:
                w = lycoris_boft_weight(w, blocks, sd[f"{name_}.rescale"].double() if rescale else None)
            base.weight.copy_(w.float())
        theirs = unet_out(merged)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4


def _with_rescale(sd):
    return {**sd, **{k.replace(".alpha", ".rescale"): torch.ones(1) for k in sd if k.endswith(".alpha")}}


def test_refused_files_name_the_key_and_the_fix(tiny, tmp_path):
    _, oft = make(tiny, network="oft", train_te=False)
    sd = oft.kohya_state_dict(torch.float32)
    # ComfyUI's TrainLoraNode writes alpha = 1.0: a constraint the two loaders read differently
    constrained = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    with pytest.raises(LoRAError, match=r"the state dict: lora_\w+\.alpha: oft_constraint 1.0 is not supported: "
                                         r"ComfyUI 0.3.75 limits"):
        oft.load_weights(constrained)
    with_rescale = _with_rescale(sd)
    with pytest.raises(LoRAError, match=r"\.rescale: oft_rescale works with network boft only: ComfyUI 0.3.75 loads "
                                         r"an OFT file's rescale but ignores it; such a file cannot be continued"):
        oft.load_weights(with_rescale)
    _, boft = make(tiny, network="boft", rank=6, train_te=False)
    boft_sd = boft.kohya_state_dict(torch.float32)
    with_rescale = _with_rescale(boft_sd)
    with pytest.raises(LoRAError, match=r"\.rescale: the file has a rescale and the network does not train one: "
                                         r"set oft_rescale to True"):
        boft.load_weights(with_rescale)
    with pytest.raises(LoRAError, match=r"\.oft_blocks is a oft module but this network trains boft: start with "
                                         r"--network oft"):
        boft.load_weights(sd)
    _, rank2 = make(tiny, network="oft", rank=2, train_te=False)
    with pytest.raises(LoRAError, match=r"lora_unet_\w+\.oft_blocks has shape \(\d+, 4, 4\), this network's oft "
                                         r"module needs \(\d+, 2, 2\): train with rank 4"):
        rank2.load_weights(sd)


def test_refused_settings_are_one_line_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys):
    base = dict(model="m.safetensors", data="d", output="o.safetensors")
    cases = [
        (dict(network="oft", oft_rescale=True), "oft_rescale works with network boft only: ComfyUI 0.3.75 loads"),
        (dict(network="lora", oft_rescale=True), "oft_rescale works with network boft only"),
        (dict(network="boft", oft_constraint=0.01), "oft_constraint 0.01 is not supported"),
        (dict(network="boft", dora=True), "dora does not apply to network boft"),
        (dict(network="oft", rslora=True), "rslora does not apply to network oft"),
        (dict(network="oft", network_dropout=0.1), "network_dropout does not apply to network oft"),
        (dict(network="oft", conv_rank=2, tucker=True), "tucker does not apply to network oft"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**base, **kw).validate()
    with pytest.raises(LoRAError, match="oft_rescale works with network boft only"):
        make(tiny, network="oft", oft_rescale=True)
    # a width the rank cannot split: the network names the module, the CLI stops before loading the model
    with pytest.raises(LoRAError, match=r"lora_te2_\w+: network boft cannot split a layer of width 48 with rank 4"
                                        r".*use rank >= 6"):
        make(tiny, network="boft", rank=4)
    import trainer.build

    monkeypatch.setattr(trainer.build, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    from trainer.cli import main

    data = make_dataset(tmp_path / "data", n=1)
    code = main(["train", "--model", tiny, "--data", str(data), "--output", str(tmp_path / "x.safetensors"),
                 "--network", "boft", "--rank", "6", "--set", "conv_rank=1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "network boft cannot split a layer of width 32 with conv_rank 1" in err[0] and "conv_rank >= 2" in err[0]
    code = main(["train", "--model", tiny, "--data", str(data), "--output", str(tmp_path / "x.safetensors"),
                 "--network", "oft", "--oft-rescale", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "oft_rescale works with network boft only" in err[0], err


# ---------------------------------------------------------------------------------------------- the trainer
STEADY = dict(steps=4, grad_accum=2, flip_aug=True, cache_text="off", shuffle_caption=True, caption_dropout=0.2,
              noise_offset=0.05, min_snr_gamma=5.0, conv_rank=2)


@pytest.mark.slow
def test_boft_stop_at_k_and_resume_is_bit_identical(tmp_path):
    kw = dict(STEADY, network="boft", rank=6, oft_rescale=True, optimizer="EmoFact", lr=1e-3)
    ref, resumed = trained_then_resumed(tmp_path, 2, **kw)
    assert resumed.steps_done == 4
    assert_same_lora(ref.lora_path, resumed.lora_path)
    assert losses(ref.run_dir) == losses(resumed.run_dir)
    with safe_open(ref.lora_path, "pt") as f:
        blocks = [f.get_tensor(k) for k in f.keys() if k.endswith(".oft_blocks")]
        rescales = [f.get_tensor(k) for k in f.keys() if k.endswith(".rescale")]
    assert blocks and all(b.dim() == 4 for b in blocks) and any(b.abs().max() > 0 for b in blocks)  # it trained
    assert len(rescales) == len(blocks) and any(not torch.equal(r, torch.ones_like(r)) for r in rescales)


@pytest.mark.slow
def test_cli_trains_an_oft_and_continues_it_from_its_file(tmp_path):
    from trainer.cli import main

    data = make_dataset(tmp_path / "data", n=2)
    common = ["train", "--model", tiny_model_path(), "--data", data, "--resolution", "64", "--rank", "4",
              "--optimizer", "AdamW", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--network", "oft",
              "--set", "bucket_step=32", "--set", "gradient_checkpointing=false", "--set", "save_dtype=fp32"]
    first = tmp_path / "out" / "first.safetensors"
    assert main([*map(str, common), "--output", str(first), "--steps", "3"]) == 0
    with safe_open(first, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        trained = any(f.get_tensor(k).abs().max() > 0 for k in keys if k.endswith(".oft_blocks"))
    assert trained and meta["ss_network_module"] == "lycoris.kohya" and meta["ss_steps"] == "3"
    assert json.loads(meta["ss_network_args"]) == {"algo": "diag-oft", "constraint": "0"}
    second = tmp_path / "out" / "second.safetensors"
    assert main([*map(str, common), "--output", str(second), "--steps", "2", "--network-weights", str(first)]) == 0
    with safe_open(second, "pt") as f:
        assert set(f.keys()) == keys and f.metadata()["ss_steps"] == "5"

