"""LoRA-family adapters (LoRA/LoCon, DoRA, rsLoRA, LoHa, LoKr): layout and metadata of the files, continuing from
them (ours, LyCORIS's, ComfyUI's trainer's), the errors on a mismatch, every optimizer on every type, and the
forward computing in the autocast dtype."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _lora_helpers import CONFIGS, make, randomize, unet_out
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.model import LoRAError, kohya_metadata, save_lora, tiny_model_path
from trainer.model.adapters import ADAPTERS, factorization
from trainer.model.lora import LoRAWrapper

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a 64 x 64 linear of the tiny UNet
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # a 3x3 conv (conv_rank 2)
TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path()


def test_factorization_follows_lycoris():
    # LyCORIS's rule: factor itself when it divides and factor^2 <= dim, else the divisor pair nearest sqrt(dim)
    # whose smaller part is at most factor (the same numbers ComfyUI's copy gives: test_adapters_comfy.py)
    assert factorization(128) == (8, 16) and factorization(127) == (1, 127) and factorization(640) == (20, 32)
    assert factorization(360) == (18, 20) and factorization(1280) == (32, 40) and factorization(64) == (8, 8)
    assert factorization(128, 4) == (4, 32) and factorization(250, 8) == (5, 50) and factorization(32, 2) == (2, 16)
    assert factorization(7, 2) == (1, 7)


def test_export_layout_and_metadata_of_every_type(tiny, tmp_path):
    expect = {
        "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "rslora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr-decomposed": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "lora-tucker": {"lora_down.weight", "lora_up.weight", "alpha"},
        "loha-tucker": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    }
    tucker_cores = {"lora-tucker": {"lora_mid.weight"}, "loha-tucker": {"hada_t1", "hada_t2"}}
    for name, suffixes in expect.items():
        model, net = make(tiny, **CONFIGS[name])
        sd = net.kohya_state_dict(torch.float16)
        for module in net.loras:
            want = suffixes | (tucker_cores.get(name, set()) if net.loras[module].weight_shape[2:] == (3, 3) else set())
            assert {k.split(".", 1)[1] for k in sd if k.split(".", 1)[0] == module} == want, (name, module)
        if name == "dora":  # input-axis magnitudes, the orientation every loader applies correctly
            assert sd[f"{Q}.dora_scale"].shape == (1, 64) and sd[f"{CONV}.dora_scale"].shape == (1, 32, 1, 1)
        if name == "loha":
            assert sd[f"{CONV}.hada_w1_a"].shape == (32, 2) and sd[f"{CONV}.hada_w1_b"].shape == (2, 32 * 9)
        if name == "loha-tucker":  # LyCORIS's Tucker layout: w_a (r, out), w_b (r, in), t (r, r, 3, 3)
            assert sd[f"{CONV}.hada_w1_a"].shape == (2, 32) and sd[f"{CONV}.hada_w1_b"].shape == (2, 32)
            assert sd[f"{CONV}.hada_t1"].shape == (2, 2, 3, 3)
        if name == "lora-tucker":
            assert sd[f"{CONV}.lora_down.weight"].shape == (2, 32, 1, 1)
            assert sd[f"{CONV}.lora_mid.weight"].shape == (2, 2, 3, 3)
            assert sd[f"{CONV}.lora_up.weight"].shape == (32, 2, 1, 1)
        # loaders apply alpha / rank; rsLoRA's trained scale alpha / sqrt(rank) is stored as alpha * sqrt(rank)
        want = 3.0 * math.sqrt(4) if name == "rslora" else 3.0
        assert float(sd[f"{Q}.alpha"]) == pytest.approx(want) and sd[f"{Q}.alpha"].dtype == torch.float32
        assert net.loras[Q].scale == pytest.approx(3.0 / (2.0 if name == "rslora" else 4.0))
        meta = kohya_metadata(network=net, output_name="x", steps=5, epoch=1, learning_rate=1e-4)
        path = save_lora(tmp_path / f"{name}.safetensors", net, meta)
        with safe_open(path, "pt") as f:
            md = f.metadata()
        args = json.loads(md["ss_network_args"])
        if name == "lora":
            assert md["ss_network_module"] == "networks.lora" and args == {"conv_dim": "2", "conv_alpha": "1.5"}
        else:
            assert md["ss_network_module"] == "lycoris.kohya"
            assert args["algo"] == CONFIGS[name]["network"] and args["conv_dim"] == "2"
        assert args.get("use_tucker") == ("True" if name.endswith("-tucker") else None)
        assert ("dora_wd" in args) == (name == "dora") and ("rs_lora" in args) == (name == "rslora")
        if name == "dora":
            assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
        if name == "lokr-decomposed":
            assert args["factor"] == "2" and args["decompose_both"] == "True"
        assert md["ss_steps"] == "5" and "emolora_steps_before" not in md
    # LoKr with both factors full: loaders ignore alpha, so the scale is 1 and alpha is stored as the rank
    model, net = make(tiny, network="lokr")
    full = [a for a in net.loras.values() if a.scale_is_fixed]
    assert full and all(a.scale == 1.0 and a.file_alpha() == 4.0 for a in full)
    assert any(not a.scale_is_fixed and a.scale == 0.75 for a in net.loras.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_continue_from_every_type_gives_the_same_model(tiny, tmp_path, name):
    model, net = make(tiny, **CONFIGS[name])
    randomize(net)
    with torch.no_grad():
        expected = unet_out(model)
    path = save_lora(tmp_path / "a.safetensors", net, {"ss_steps": "7"}, dtype=torch.float32)
    other, net2 = make(tiny, **CONFIGS[name], alpha=11.0)  # the file's alpha wins
    info = net2.load_weights(path)
    assert info == {"loaded": len(net.loras), "missing": [], "unknown": [], "steps_before": 7}
    with torch.no_grad():
        assert torch.equal(unet_out(other), expected)
    a, b = net.kohya_state_dict(torch.float32), net2.kohya_state_dict(torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the step count carries on in the metadata of what the continued network saves
    meta = kohya_metadata(network=net2, output_name="b", steps=3, epoch=1, learning_rate=1e-4)
    assert meta["ss_steps"] == "10" and meta["emolora_steps_before"] == "7"
    assert meta["emolora_network_weights"] == "a.safetensors"


def test_continue_from_comfyui_trainer_and_diffusers_spelled_keys(tiny):
    model, net = make(tiny, conv_rank=0, train_te=False)
    randomize(net)
    sd = net.kohya_state_dict(torch.float32)
    comfy = {}
    for key, value in sd.items():  # ComfyUI's TrainLoraNode: diffusion_model.<original dotted path>.<tensor>
        module, _, suffix = key.partition(".")
        path = module[len("lora_unet_"):].replace("_", ".")
        path = path.replace("input.blocks", "input_blocks").replace("output.blocks", "output_blocks")
        path = path.replace("middle.block", "middle_block").replace("transformer.blocks", "transformer_blocks")
        path = path.replace("proj.in", "proj_in").replace("proj.out", "proj_out").replace("to.", "to_")
        comfy[f"diffusion_model.{path}.{suffix}"] = value
    other, net2 = make(tiny, conv_rank=0, train_te=False)
    assert net2.load_weights(comfy)["loaded"] == len(net.loras)
    with torch.no_grad():
        assert torch.equal(unet_out(other), unet_out(model))


def test_a_lycoris_output_axis_dora_file_continues_with_lycoris_semantics(tiny):
    """LyCORIS's default wd_on_output=True: magnitudes per output row, W' = (W + dW) * m / ||W + dW||_row."""
    model, net = make(tiny, dora=True, conv_rank=0, train_te=False)
    randomize(net)
    sd = net.kohya_state_dict(torch.float32)
    base = {w.lora.lora_name: w.base for _, _, w in net._wrapped}[Q]
    row_norm = base.weight.norm(dim=1, keepdim=True)
    sd[f"{Q}.dora_scale"] = row_norm * 1.5
    net.load_weights(sd)
    adapter = net.loras[Q]
    assert adapter.dora_on_output and adapter.dora_scale.shape == (64, 1)
    x = torch.randn(3, 64)
    with torch.no_grad():
        merged = base.weight + adapter.delta_weight(torch.float32)
        want = F.linear(x, merged * (row_norm * 1.5) / (merged.norm(dim=1, keepdim=True) + 1.1920929e-07), base.bias)
        got = adapter(base, x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mismatches_name_the_file_and_the_key(tiny, tmp_path):
    files = {}
    for name in ("lora", "loha", "dora", "lokr-decomposed"):
        model, net = make(tiny, **CONFIGS[name])
        files[name] = save_lora(tmp_path / f"{name}.safetensors", net, {})
    _, lora = make(tiny)
    with pytest.raises(LoRAError, match=r"loha\.safetensors: lora_\w+\.hada_w1_a is a loha module but this network "
                                         r"trains lora: start with --network loha"):
        lora.load_weights(files["loha"])
    with pytest.raises(LoRAError, match=r"dora\.safetensors: lora_\w+\.dora_scale: the file has DoRA"):
        lora.load_weights(files["dora"])
    _, rank8 = make(tiny, rank=8)
    with pytest.raises(LoRAError, match=r"lora\.safetensors: lora_\w+\.lora_down\.weight: rank mismatch, the file "
                                         r"has rank 4 and the network rank 8"):
        rank8.load_weights(files["lora"])
    _, lokr = make(tiny, network="lokr")
    with pytest.raises(LoRAError, match=r"lokr-decomposed\.safetensors: lora_\w+\.lokr_w\w+: the file's lokr factors"):
        lokr.load_weights(files["lokr-decomposed"])
    _, no_te = make(tiny, train_te=False)
    with pytest.raises(LoRAError, match=r"lora\.safetensors: \d+ modules have no counterpart .*lora_te"):
        no_te.load_weights(files["lora"])
    _, no_conv = make(tiny, conv_rank=0)
    sd = load_file(files["lora"])
    partial = {k: v for k, v in sd.items() if not k.startswith(Q + ".")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(LoRAError, match=rf"partial\.safetensors lacks 1 of this network's modules, e.g. '{Q}'"):
        make(tiny)[1].load_weights(tmp_path / "partial.safetensors")
    with pytest.raises(LoRAError, match=r"key 'lora_unet_x\.weird' is not a LoRA"):
        no_conv.load_weights({"lora_unet_x.weird": torch.zeros(1)})
    _, tucker = make(tiny, tucker=True)
    with pytest.raises(LoRAError, match=rf"lora\.safetensors: {CONV}\.lora_mid\.weight: the file does not use "
                                         r"Tucker cores .* set tucker to False"):
        tucker.load_weights(files["lora"])
    tucker_file = save_lora(tmp_path / "tucker.safetensors", tucker, {})
    with pytest.raises(LoRAError, match=rf"tucker\.safetensors: {CONV}\.lora_mid\.weight: the file uses Tucker "
                                         r"cores .* set tucker to True \(--tucker\)"):
        make(tiny)[1].load_weights(tucker_file)
    with pytest.raises(LoRAError, match=r"lokr_t2: LoKr with Tucker cores is not supported"):
        no_conv.load_weights({f"{Q}.lokr_t2": torch.zeros(1), f"{Q}.lokr_w2_a": torch.zeros(1)}, strict=False)
    with pytest.raises(LoRAError, match="tucker works with network lora or loha"):
        make(tiny, network="lokr", tucker=True)
    with pytest.raises(LoRAError, match="cannot read LoRA file .*missing.safetensors"):
        no_conv.load_weights(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- every optimizer
def _layers():
    """Small stand-ins with the awkward shapes: prime sizes (LoKr factors of 1 x 1, 1-row and 1-column pairs)."""
    torch.manual_seed(0)
    return [nn.Linear(32, 64), nn.Linear(7, 13), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(5, 3, 1)]


TYPES = {"lora": {}, "dora": dict(dora=True), "rslora": dict(rslora=True), "loha": {}, "lokr": {},
         "lokr-decomposed": dict(lokr_factor=2, lokr_decompose_both=True), "lora-tucker": dict(tucker=True),
         "loha-tucker": dict(tucker=True)}


def _network(kind: str) -> str:
    return "lokr" if kind.startswith("lokr") else ("loha" if kind.startswith("loha") else "lora")


def _adapters(kind):
    network = _network(kind)
    layers = _layers()
    adapters = [ADAPTERS[network](f"m{i}", layer, 2, 1.0, **TYPES[kind]) for i, layer in enumerate(layers)]
    return layers, adapters


def _loss(layers, adapters):
    g = torch.Generator().manual_seed(3)
    total = 0.0
    for layer, adapter in zip(layers, adapters):
        shape = (4, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 5, 5)
        total = total + adapter(layer, torch.randn(shape, generator=g)).square().mean()
    return total


@pytest.mark.parametrize("kind", list(TYPES))
def test_every_optimizer_steps_every_adapter_type(kind):
    from trainer.optim import OPTIMIZER_INFO, OPTIMIZERS, create_optimizer

    shapes = {tuple(p.shape) for a in _adapters(kind)[1] for p in a.trainable()}
    if kind == "lokr":
        assert (1, 1) in shapes  # kron factors of prime sizes
    if kind == "lokr-decomposed":
        assert any(1 in s for s in shapes if len(s) == 2)
    if kind.endswith("-tucker"):
        assert (2, 2, 3, 3) in shapes  # the Tucker cores
    for name in OPTIMIZERS:
        layers, adapters = _adapters(kind)
        params = [p for a in adapters for p in a.trainable()]
        before = [p.detach().clone() for p in params]
        opt = create_optimizer(name, params, lr=OPTIMIZER_INFO[name].recommended_lr)
        first = None
        for _ in range(3):
            opt.zero_grad()
            loss = _loss(layers, adapters)
            loss.backward()
            if first is None:  # at the zero init only the zero factor has a gradient
                first = [bool(p.grad.abs().max() > 0) for p in params]
            opt.step(loss=loss.detach())
        assert all(torch.isfinite(p).all() for p in params), (name, kind)
        moved = [not torch.equal(a, b) for a, b in zip(before, params)]
        assert any(first) and all(m for m, f in zip(moved, first) if f), (name, kind, moved, first)


# ---------------------------------------------------------------------------------------------- compute dtype
class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor):
            self.ops.append((str(func.overloadpacket.__name__), first.dtype, first.numel()))
        return out


@pytest.mark.parametrize("kind", [k for k in TYPES if not k.endswith("-tucker")])  # tucker: convs only
def test_forward_computes_in_the_autocast_dtype_without_fp32_activations(kind):
    """bf16 autocast on the CPU: the fp32 master weights are cast down (one cast each), the activations are never
    copied to float32, and the gradients arrive in float32."""
    network = _network(kind)
    base = nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    adapter = ADAPTERS[network]("m", base, 4, 4.0, **TYPES[kind])
    randomize_one(adapter)
    wrapper = LoRAWrapper(base, adapter)
    x = torch.randn(2, 77, 64, dtype=torch.bfloat16)  # activations: 9856 elements, the weight 4096
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with OpLog() as log:
            out = wrapper(x)
    assert out.dtype == torch.bfloat16
    fp32_activations = [op for op in log.ops if op[1] == torch.float32 and op[2] >= x.numel()]
    assert fp32_activations == [], fp32_activations
    casts = [op for op in log.ops if op[0] == "_to_copy"]
    assert all(numel <= 64 * 64 for _, _, numel in casts), casts  # weights only, never an activation
    assert len(casts) <= len(adapter.trainable()) + (2 if kind == "dora" else 0), casts
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in adapter.trainable())
    print(f"{kind}: {len(log.ops)} aten ops, {len(casts)} casts per wrapped forward")


def randomize_one(adapter):
    with torch.no_grad():
        for p in adapter.factors():
            p.normal_(0, 0.1)


def test_loha_hadamard_gradients_equal_plain_autograd():
    from trainer.model.adapters.loha import HadamardProduct

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((6, 3), (3, 5), (6, 3), (3, 5))]
    assert torch.autograd.gradcheck(HadamardProduct.apply, factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside autocast the product stays in the factors' dtype
        low = [f.detach().to(torch.bfloat16).requires_grad_() for f in factors]
        out = HadamardProduct.apply(*low)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert all(f.grad.dtype == torch.bfloat16 for f in low)
