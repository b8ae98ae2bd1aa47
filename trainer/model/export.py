"""Write a trained LoRA as a kohya-format .safetensors with kohya ss_* / sshs_* and modelspec metadata.

ss_base_model_version must start with "sdxl_": A1111/Forge treat a LoRA whose metadata lacks it as SD1.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import torch

from ..atomic import atomic_write_bytes
from ..oft_rules import LYCORIS_ALGO
from . import hashes
from .errors import NonFiniteLoRAError

BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's value for every SDXL-family base, v-pred included
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's value for SDXL LoRA
MODELSPEC_VERSION = "1.0.1"  # what current kohya sd-scripts writes


def _str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _resolution(res) -> tuple[int, int]:
    if isinstance(res, int):
        return res, res
    w, h = res
    return int(w), int(h)


def kohya_metadata(
    *,
    network,
    model=None,
    output_name: str,
    steps: int,
    epoch: int,
    resolution=1024,
    learning_rate: float,
    unet_lr: float | None = None,
    text_encoder_lr=None,
    optimizer: str = "",
    optimizer_args: dict | str | None = None,
    num_train_images: int = 0,
    tag_frequency: dict | None = None,
    training_started_at: float | None = None,
    training_finished_at: float | None = None,
    seed: int | None = None,
    title: str | None = None,
    timestep_range: tuple[int, int] | None = None,
    hash_base_model: bool = True,
    extra: dict | None = None,
    **ss,
) -> dict[str, str]:
    """kohya-compatible metadata (all values strings; None values are left out).

    Any further keyword becomes `ss_<name>` (e.g. lr_scheduler="cosine" -> ss_lr_scheduler), so every
    kohya key can be written without changing this signature. `extra` is copied verbatim: use it for
    `emolora_*` keys (dicts/lists are JSON-encoded). sshs_model_hash / sshs_legacy_hash are hashes of
    the LoRA file itself and are added by save_lora.
    """
    w, h = _resolution(resolution)
    now = time.time()
    started = training_started_at if training_started_at is not None else now
    finished = training_finished_at if training_finished_at is not None else now
    network_module, net_args = network_module_and_args(network)
    steps_before = int(getattr(network, "steps_before", 0) or 0)
    if isinstance(optimizer_args, dict):
        optimizer_args = ",".join(f"{k}={v}" for k, v in optimizer_args.items())
    meta = {
        "ss_v2": "False",
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": network_module,
        "ss_network_dim": network.rank,
        "ss_network_alpha": network.alpha,
        "ss_network_args": net_args,
        "ss_network_dropout": network.dropout,
        "ss_output_name": output_name,
        "ss_training_started_at": started,
        "ss_training_finished_at": finished,
        "ss_steps": steps + steps_before,  # cumulative over continued files
        "ss_epoch": epoch,
        "ss_resolution": f"({w}, {h})",
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr if unet_lr is not None else learning_rate,
        "ss_text_encoder_lr": text_encoder_lr if network.train_te else None,
        "ss_optimizer": f"{optimizer}({optimizer_args})" if optimizer_args else optimizer,
        "ss_num_train_images": num_train_images,
        "ss_tag_frequency": tag_frequency if tag_frequency is not None else {},
        "ss_seed": seed,
    }
    if model is not None:
        meta["ss_sd_model_name"] = model.name
        if hash_base_model and model.hash_file and os.path.isfile(model.hash_file):
            meta["ss_sd_model_hash"] = model.legacy_hash
            meta["ss_new_sd_model_hash"] = model.model_hash
        if getattr(model, "zero_terminal_snr", False):
            meta.setdefault("ss_zero_terminal_snr", True)
    for key, value in ss.items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = value
    vpred = model is not None and model.prediction_type == "v_prediction"
    meta.update(
        {
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": ARCHITECTURE,
            "modelspec.implementation": IMPLEMENTATION,
            "modelspec.title": title or output_name,
            "modelspec.resolution": f"{w}x{h}",
            "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
            "modelspec.prediction_type": "v" if vpred else "epsilon",
            "modelspec.timestep_range": f"{timestep_range[0]},{timestep_range[1]}" if timestep_range else None,
        }
    )
    if steps_before or getattr(network, "weights_source", None):
        meta.update(emolora_steps_before=steps_before, emolora_network_weights=network.weights_source)
    meta.update(extra or {})
    return {k: _str(v) for k, v in meta.items() if v is not None}


def network_module_and_args(network) -> tuple[str, dict]:
    """ss_network_module and ss_network_args as kohya (plain LoRA/LoCon) or LyCORIS (anything else) write them:
    LyCORIS's own argument names, every value a string."""
    args = {}
    kind = getattr(network, "network_type", "lora")
    if network.conv_rank:
        args.update(conv_dim=str(network.conv_rank), conv_alpha=str(network.conv_alpha))
    tucker = getattr(network, "tucker", False) and network.conv_rank > 0  # Tucker cores exist on 3x3 convs only
    if kind == "lora" and not getattr(network, "dora", False) and not getattr(network, "rslora", False) \
            and not tucker:
        return "networks.lora", args
    if kind in LYCORIS_ALGO:  # LyCORIS's network_args for Diag-OFT / BOFT: constraint 0, rescaled when trained
        args = {"algo": LYCORIS_ALGO[kind], **args, "constraint": "0"}
        if getattr(network, "oft_rescale", False):
            args["rescaled"] = "True"
        return "lycoris.kohya", args
    args = {"algo": kind, **args}
    if network.dora:
        args.update(dora_wd="True", wd_on_output="False")  # input-axis magnitudes: see adapters/base.py
    if network.rslora:
        args["rs_lora"] = "True"
    if tucker:
        args["use_tucker"] = "True"
    if kind == "lokr":
        opts = network.lokr_options
        args["factor"] = str(opts["lokr_factor"])
        if opts["lokr_full_matrix"]:
            args["full_matrix"] = "True"
        if opts["lokr_decompose_both"]:
            args["decompose_both"] = "True"
    return "lycoris.kohya", args


def save_lora(path, network, metadata: dict, dtype: torch.dtype = torch.float16) -> str:
    """Write the LoRA atomically (temp file in the same folder, then os.replace), adding kohya's
    sshs_model_hash / sshs_legacy_hash computed over the file as serialised with only ss_* metadata. Returns the
    path written: where another program holds `path` open (Windows), a new name beside it (atomic.free_name)."""
    from safetensors.torch import save

    path = os.fspath(path)
    sd = network.kohya_state_dict(dtype)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # the last guard: a file that would load as NaN is never written (the previous one stays)
        raise NonFiniteLoRAError(f"{path}: not written: {len(bad)} of {len(sd)} tensors are not finite "
                                 f"(in {dtype}), e.g. {bad[0]}")
    meta = {str(k): _str(v) for k, v in metadata.items() if v is not None}
    probe = save(sd, {k: v for k, v in meta.items() if k.startswith("ss_")})
    meta["sshs_model_hash"] = hashes.safetensors_data_hash(probe)
    meta["sshs_legacy_hash"] = hashes.legacy_bytes_hash(probe)
    del probe
    return os.fspath(atomic_write_bytes(path, save(sd, meta), new_name_if_held=True))
