"""Load an SDXL-family base model (single-file checkpoint or diffusers folder) fully offline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from . import base_weights as BW
from . import clip_tokenizers, convert, detect, fp8_file, hashes, tensor_file
from . import sdxl_keys as K
from .errors import ModelError

# SDXL's training noise schedule (scheduler_config.json of the base model; kohya hard-codes the same).
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


@dataclass
class SDXLModel:
    unet: Any  # diffusers UNet2DConditionModel
    te1: Any  # transformers CLIPTextModel (CLIP ViT-L)
    te2: Any  # transformers CLIPTextModelWithProjection (OpenCLIP ViT-bigG)
    vae: Any  # diffusers AutoencoderKL
    tokenizer1: Any
    tokenizer2: Any
    prediction_type: str  # "epsilon" | "v_prediction"
    source: str  # the checkpoint file or diffusers folder
    arch: str  # "sdxl" | "ssd-1b" | "vega" | "sdxl-custom" | "tiny-sdxl"
    zero_terminal_snr: bool = False
    scheduler_config: dict = field(default_factory=lambda: dict(SDXL_SCHEDULER))
    tokenizer_source: tuple[str, str] = ("", "")
    hash_file: str = field(default="", repr=False)  # file hashed for model_hash (the checkpoint, or unet weights)
    # How the UNet's Linear/Conv weights are held (base_weights.py): "float8_e4m3fn", "bfloat16", ..., and how
    # many layers are stored in a dtype other than the compute dtype (0: a plain model).
    base_dtype: str = ""
    stored_layers: int = 0
    _hashes: dict = field(default_factory=dict, repr=False)

    @property
    def model_hash(self) -> str:
        """Whole-file SHA-256 of the base checkpoint (kohya ss_new_sd_model_hash); computed lazily and cached
        on disk per file version (hashes.cached_sha256), because hashing a 7 GB checkpoint takes a while."""
        if "sha256" not in self._hashes:
            self._hashes["sha256"] = hashes.cached_sha256(self.hash_file)
        return self._hashes["sha256"]

    @property
    def legacy_hash(self) -> str:
        """A1111's old 8-hex model hash (kohya ss_sd_model_hash)."""
        if "legacy" not in self._hashes:
            self._hashes["legacy"] = hashes.legacy_file_hash(self.hash_file)
        return self._hashes["legacy"]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.source))


def load_sdxl(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    tokenizer_dir=None,
    device="cpu",
    base_dtype: str = "auto",
) -> SDXLModel:
    """Load UNet, both text encoders, VAE and tokenizers; every network is frozen and in eval mode.

    The VAE defaults to fp32 because SDXL's VAE overflows to NaN in fp16. `dtype` is the compute dtype;
    base_dtype (auto|bf16|fp16|fp32|fp8) the storage of the UNet's Linear/Conv weights: fp8 quantizes them to
    float8_e4m3fn with a per-tensor scale; auto keeps an fp8 checkpoint's float8 weights (e4m3fn, e5m2, scaled)
    and is the compute dtype for any other file. A weight stored otherwise is upcast per layer in the forward.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"checkpoint not found: {path}")
    model = (
        _load_folder(path, dtype, vae_dtype, tokenizer_dir, base_dtype)
        if os.path.isdir(path)
        else _load_file(path, dtype, vae_dtype, tokenizer_dir, base_dtype)
    )
    for net in (model.unet, model.te1, model.te2, model.vae):
        net.requires_grad_(False)
        net.eval()
        net.to(device)  # dtypes were applied while loading
    return model


STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def storage_dtype(base_dtype: str, compute: torch.dtype, fp8_checkpoint: bool) -> torch.dtype:
    """The dtype the UNet's Linear/Conv weights are held in for a base_dtype setting."""
    if base_dtype == "fp8" or (base_dtype == "auto" and fp8_checkpoint):
        fp8 = BW.fp8_dtype()
        if fp8 is None:
            raise ModelError(f"base_dtype fp8 needs a torch with float8 dtypes (torch >= 2.1); this is torch "
                             f"{torch.__version__}")
        return fp8
    if base_dtype == "auto":
        return compute
    if base_dtype not in STORAGE:
        raise ModelError(f"base_dtype must be one of auto, bf16, fp16, fp32, fp8; got {base_dtype!r}")
    return STORAGE[base_dtype]


# ------------------------------------------------------------------ single file
def _load_file(path: str, dtype, vae_dtype, tokenizer_dir, base_dtype="auto") -> SDXLModel:
    info = detect.read_header(path)
    components = (K.UNET_PREFIX, K.TE1_PREFIX, K.TE2_PREFIX, K.VAE_PREFIX)  # the tensors that are read
    fp8_file.check_dtypes(path, {k: v for k, v in info.dtypes.items() if k.startswith(components)},
                          tensor_file.DTYPES)
    cfg = detect.infer_configs(info)  # rejects non-SDXL files before any tensor is read
    storage = storage_dtype(base_dtype, dtype, fp8_file.is_fp8_unet(info.shapes, info.dtypes))
    tok_dirs = clip_tokenizers.resolve(path, tokenizer_dir)
    tok1, tok2 = clip_tokenizers.load_pair(*tok_dirs, max_length=cfg.te1["max_position_embeddings"])
    _check_vocab(path, tok1, cfg.te1["vocab_size"], tok2, cfg.te2["vocab_size"])

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Token ids of the tokenizer actually used: HF pools text_embeds at the first EOS id.
    ids = {"bos_token_id": tok1.bos_token_id, "eos_token_id": tok1.eos_token_id, "pad_token_id": tok1.eos_token_id}
    sd = _read_tensors(path, dtype, vae_dtype, info.dtypes)
    unet_names = {sgm: name for name, sgm in K.unet_module_map(cfg.layout).items()}  # SGM -> diffusers module
    kept = fp8_file.resolve_scales(path, sd, lambda key: _stays_fp8(key, storage, unet_names),
                                   lambda key: vae_dtype if key.startswith(K.VAE_PREFIX) else dtype)
    file_scales = {unet_names[k[len(K.UNET_PREFIX):].removesuffix(".weight")]: s for k, s in kept.items()}
    for what, left in convert.unplaced(convert.split_components(sd), cfg.layout).items():
        _no_leftovers(path, what, left)
    with torch.device("meta"):  # shapes only: no random init, no second copy; the checkpoint tensors are adopted
        unet = UNet2DConditionModel(**cfg.unet)
        te1 = CLIPTextModel(CLIPTextConfig(**cfg.te1, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg.te2, **ids))
        vae = AutoencoderKL(**cfg.vae)
    try:
        sds = convert.to_diffusers(sd, cfg.unet, cfg.vae, te2)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: the checkpoint does not convert to the inferred SDXL layout ({exc!r})") from exc
    del sd
    unet = _adopt(unet, sds.pop("unet"), dtype, path, "UNet")
    stored = BW.store_unet(unet, storage, dtype, file_scales) if storage != dtype or file_scales else 0
    te1 = _adopt(te1, sds.pop("te1"), dtype, path, "CLIP-L", te=True)
    te2 = _adopt(te2, sds.pop("te2"), dtype, path, "bigG", te=True)
    vae = _adopt(vae, sds.pop("vae"), vae_dtype, path, "VAE")
    sched = dict(SDXL_SCHEDULER, prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr)
    return SDXLModel(
        unet=unet,
        te1=te1,
        te2=te2,
        vae=vae,
        tokenizer1=tok1,
        tokenizer2=tok2,
        prediction_type=cfg.prediction_type,
        source=path,
        arch=cfg.arch,
        zero_terminal_snr=cfg.zero_terminal_snr,
        scheduler_config=sched,
        tokenizer_source=tok_dirs,
        hash_file=path,
        base_dtype=_dtype_name(storage),
        stored_layers=stored,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stays_fp8(key: str, storage: torch.dtype, unet_names: dict[str, str]) -> bool:
    """A float8 checkpoint tensor keeps its bytes: an fp8 storage, and a storable UNet Linear/Conv weight."""
    if not BW.is_fp8(storage) or not key.startswith(K.UNET_PREFIX) or not key.endswith(".weight"):
        return False
    name = unet_names.get(key[len(K.UNET_PREFIX):].removesuffix(".weight"))
    return name is not None and not BW.keeps_compute_dtype(name)


def _read_tensors(path: str, dtype, vae_dtype, stored: dict[str, str]) -> dict[str, torch.Tensor]:
    """The four components' tensors (prefixed keys), in their load dtype, owned and aligned (tensor_file).
    float8 tensors are read as stored: their scales (fp8_file) are applied, or they stay float8."""
    prefixes = (K.UNET_PREFIX, K.TE1_PREFIX, K.TE2_PREFIX)

    def dtype_of(key: str):
        load = dtype if key.startswith(prefixes) else vae_dtype if key.startswith(K.VAE_PREFIX) else None
        if load is None:
            return None
        if stored.get(key) in BW.FP8_NAMES:
            return tensor_file.DTYPES[stored[key]]
        return torch.float32 if key.endswith((fp8_file.SCALE, fp8_file.INPUT_SCALE)) else load

    try:
        return tensor_file.read_tensors(path, dtype_of)
    except Exception as exc:
        raise ModelError(f"{path}: failed reading tensors ({exc}); the file may be truncated") from exc


def _no_leftovers(path: str, what: str, left: list[str]) -> None:
    if left:
        raise ModelError(
            f"{path}: {len(left)} {what} tensors do not fit the inferred SDXL layout, e.g. {sorted(left)[:4]}"
        )


def _adopt(net, sd: dict, dtype, path: str, what: str, te: bool = False):
    """Give a module built on the meta device the checkpoint's tensors (owned, in `dtype`)."""
    if te:
        sd = convert.te_keys_for(sd, net)
    sd = {k: v if _is_whole(v, _load_dtype(v, dtype)) else owned(v, _load_dtype(v, dtype)) for k, v in sd.items()}
    result = net.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{path}: {what} weights do not match the inferred architecture "
            f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    for module in net.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name != "position_ids":
                    raise ModelError(f"{path}: {what} buffer {name} has no value")
                # CLIP's non-persistent position index buffer is not stored in checkpoints.
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return net


def _load_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floats take `dtype`, except float8 weights kept as stored (fp8_file); integers keep theirs."""
    return dtype if v.is_floating_point() and not BW.is_fp8(v.dtype) else v.dtype


def owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous copy in `dtype` (torch's CPU allocator aligns to 64 bytes; see tensor_file for why)."""
    return torch.empty(tensor.shape, dtype=dtype, device="cpu").copy_(tensor)


def _is_whole(t: torch.Tensor, dtype) -> bool:
    """t is a whole allocation of its own in `dtype` (as tensor_file reads them), not a view (q/k/v chunks)."""
    return (
        t.dtype == dtype
        and t.is_contiguous()
        and t.storage_offset() == 0
        and (t.untyped_storage().nbytes() == t.numel() * t.element_size())
    )


def _own_all(net) -> None:
    """Replace every parameter and buffer of a from_pretrained module (a view of the file's memory map,
    unaligned) by an owned copy."""
    for t in (*net.parameters(), *net.buffers()):
        t.data = owned(t.data, t.dtype)


def _check_vocab(path: str, tok1, vocab1: int, tok2, vocab2: int) -> None:
    for tok, size, which in ((tok1, vocab1, "CLIP-L"), (tok2, vocab2, "bigG")):
        if len(tok) > size:
            raise ModelError(
                f"{path}: tokenizer has {len(tok)} tokens but the {which} text encoder only {size} embeddings; "
                "use the tokenizer that belongs to this checkpoint"
            )


# ------------------------------------------------------------------ diffusers folder
def _load_folder(path: str, dtype, vae_dtype, tokenizer_dir, base_dtype="auto") -> SDXLModel:
    need = ["unet", "text_encoder", "text_encoder_2", "vae"]
    missing = [d for d in need if not os.path.isfile(os.path.join(path, d, "config.json"))]
    if missing:
        found = "no text_encoder_2 (an SD1.x/SD2.x pipeline)" if missing == ["text_encoder_2"] else f"missing {missing}"
        raise ModelError(f"{path} is not a diffusers SDXL folder: {found}")
    with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
        unet_cfg = json.load(f)
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise ModelError(
            f"{path} is not an SDXL-family diffusers folder: UNet addition_embed_type "
            f"{unet_cfg.get('addition_embed_type')!r}, context {unet_cfg.get('cross_attention_dim')}"
        )
    tok_dirs = clip_tokenizers.resolve(path, tokenizer_dir)
    tok1, tok2 = clip_tokenizers.load_pair(*tok_dirs)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def load(cls, sub, dt):
        kwargs = {"local_files_only": True}
        folder = os.path.join(path, sub)
        names = os.listdir(folder)
        if not any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names) and any(
            ".fp16." in n for n in names
        ):
            kwargs["variant"] = "fp16"
        diffusers_cls = cls.__module__.startswith("diffusers")
        if diffusers_cls:
            kwargs["torch_dtype"] = dt
        try:
            net = cls.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise ModelError(f"{path}: cannot load {sub}/ ({exc})") from exc
        # transformers renamed torch_dtype -> dtype across versions; a cast works in all of them.
        net = net if diffusers_cls else net.to(dt)
        _own_all(net)
        return net

    storage = storage_dtype(base_dtype, dtype, False)
    unet = load(UNet2DConditionModel, "unet", dtype)
    stored = BW.store_unet(unet, storage, dtype) if storage != dtype else 0
    te1 = load(CLIPTextModel, "text_encoder", dtype)
    te2 = load(CLIPTextModelWithProjection, "text_encoder_2", dtype)
    vae = load(AutoencoderKL, "vae", vae_dtype)
    sched = dict(SDXL_SCHEDULER)
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_file):
        with open(sched_file, encoding="utf-8") as f:
            raw = json.load(f)
        sched.update({k: raw[k] for k in SDXL_SCHEDULER if k in raw})
    ctx, w1, w2 = unet.config.cross_attention_dim, te1.config.hidden_size, te2.config.hidden_size
    if ctx != w1 + w2:
        raise ModelError(f"{path}: UNet context {ctx} != text encoder widths {w1} + {w2}")
    _check_vocab(path, tok1, te1.config.vocab_size, tok2, te2.config.vocab_size)
    layout = K.layout_from_diffusers_config(dict(unet.config))
    flat = tuple(d for lvl in layout.down_depths for d in lvl)
    standard = ctx == 2048 and unet.config.projection_class_embeddings_input_dim == 2816
    arch = detect.KNOWN_DEPTHS.get(flat, "sdxl-custom") if standard else "tiny-sdxl"
    weights = [n for n in sorted(os.listdir(os.path.join(path, "unet"))) if n.endswith((".safetensors", ".bin"))]
    return SDXLModel(
        unet=unet,
        te1=te1,
        te2=te2,
        vae=vae,
        tokenizer1=tok1,
        tokenizer2=tok2,
        prediction_type=sched["prediction_type"],
        source=path,
        arch=arch,
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr")),
        scheduler_config=sched,
        tokenizer_source=tok_dirs,
        hash_file=os.path.join(path, "unet", weights[0]) if weights else "",
        base_dtype=_dtype_name(storage),
        stored_layers=stored,
    )
