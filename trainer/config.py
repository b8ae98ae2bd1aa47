"""One TrainConfig, merged from (lowest first) defaults < presets < a JSON/TOML config file < command-line flags.

Presets live in `presets/*.json` at the repository root: {"description", "kind", "extends"?, "settings"}.
When no source names a learning rate, the optimizer's own preset (presets/<optimizer lowercased>.json)
supplies it, so `--optimizer EmoLynx` alone trains at EmoLynx's recommended SDXL-LoRA settings.
This module imports no torch: the nodes read it to build their widgets.
"""

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .oft_rules import refusal

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# Mirrors trainer.optim's registry (checked by a test) so that a bad name fails before torch is imported.
OPTIMIZER_NAMES = (
    "EmoNavi", "EmoFact", "EmoLynx", "EmoClan", "EmoZeal", "EmoNeco", "EmoSens", "EmoAiry", "EmoCats", "EmoTion",
    "EmoVoid", "RefAdamWminiScheduleFree", "AutoTrustGO", "AdamW",
)
PATH_FIELDS = ("model", "data", "output", "tokenizer", "runs_dir", "cache_dir", "resume", "validation_data",
               "network_weights", "reg_data")

CHOICES = {
    "network": ("lora", "loha", "lokr", "oft", "boft"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "base_dtype": ("auto", "bf16", "fp16", "fp32", "fp8"),
    "device": None,  # free-form: auto, cpu, cuda, cuda:1, mps
    "attention": ("sdpa", "default"),
    "prediction_type": ("auto", "epsilon", "v_prediction"),
    "loss_type": ("l2", "l1", "huber"),
    "lr_scheduler": ("constant", "cosine", "linear", "emopulse"),
    "cache_latents": ("off", "memory", "disk"),
    "cache_text": ("off", "memory", "disk"),
    "save_dtype": ("fp32", "fp16", "bf16"),
    "auto_stop": ("stop", "mark", "off"),
    "auto_stop_on": ("should_stop", "val-plateau"),
    "mask": ("off", "file", "alpha"),
    "optimizer_loss": ("raw", "normalized", "withheld"),
}


class ConfigError(ValueError):
    """A bad option: the message names the option and the value."""


@dataclass
class TrainConfig:
    # ---- paths
    model: str = ""  # SDXL single-file checkpoint (.safetensors) or diffusers folder
    data: str = ""  # image folder (recursive, .txt/.caption captions, kohya N_name folders)
    output: str = ""  # the final LoRA, FILE.safetensors
    tokenizer: str | None = None  # folder with tokenizer/ and tokenizer_2/, or one CLIP tokenizer for both
    run_name: str | None = None  # default: <output stem>-<date>-<time>
    runs_dir: str | None = None  # default: <output folder>/runs
    cache_dir: str | None = None  # disk caches; default: <output folder>/cache
    resume: str | None = None  # a run folder to continue
    # ---- network
    rank: int = 16
    alpha: float | None = None  # None: equal to rank (scale 1)
    network_dropout: float = 0.0
    conv_rank: int = 0  # > 0 adds LoCon 3x3 conv LoRA
    conv_alpha: float = 1.0
    network: str = "lora"  # adapter type: lora (LoCon on convs), loha, lokr, oft (Diag-OFT), boft (LyCORIS layouts)
    dora: bool = False  # weight-decomposed adapters (DoRA); files carry dora_scale
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank) (files store alpha * sqrt(rank))
    lokr_factor: int = -1  # LoKr's LyCORIS factor: -1 splits each dimension as evenly as it divides
    lokr_full_matrix: bool = False  # LoKr: w2 a full matrix instead of a rank-r pair
    lokr_decompose_both: bool = False  # LoKr: w1 a rank-r pair too (where that is smaller)
    tucker: bool = False  # LyCORIS's use_tucker: a Tucker core for 3x3 conv factors (conv_rank > 0; lora, loha)
    oft_rescale: bool = False  # BOFT: LyCORIS's `rescaled`, a trained per-channel factor (not Diag-OFT: oft_rules.py)
    oft_constraint: float = 0.0  # OFT/BOFT: LyCORIS's constraint; only 0 is applied alike by ComfyUI and LyCORIS
    network_weights: str | None = None  # a LoRA/LoHa/LoKr/OFT/BOFT file to continue from (ours, kohya's, LyCORIS's)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: lr (only with train_text_encoder)
    # ---- optimizer and schedule
    optimizer: str = "EmoNavi"
    lr: float | None = None  # None: the optimizer's recommended SDXL-LoRA value (for the EmoSens line: emoScope)
    optimizer_args: dict = field(default_factory=dict)  # upstream keyword arguments (betas, trust_level, ...)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear end at lr * min_lr_ratio
    scheduler_args: dict = field(default_factory=dict)  # EmoPulseScheduler: base_lr, stopcoef
    # The loss handed to optimizer.step(loss=...): "raw" (the step's loss), "normalized" (divided by a running mean
    # of the loss at the step's timesteps, so the emotion reacts to progress rather than to the timestep draw) or
    # "withheld" (step() without a loss, as other trainers call it: the sweep's loss control).
    optimizer_loss: str = "raw"
    # ---- loop
    steps: int = 1000  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 42
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 on CUDA, fp32 on the CPU
    device: str = "auto"
    # Storage dtype of the frozen UNet's Linear/Conv weights. auto: fp8 for an fp8 checkpoint, else the compute
    # dtype; fp8: float8_e4m3fn (per-tensor scale), upcast per layer inside the forward (docs/low-vram-fp8.md).
    base_dtype: str = "auto"
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    compile: bool = False  # torch.compile each UNet transformer block (regional compilation)
    # ---- low VRAM (trainer/offload.py, trainer/vram.py)
    offload: str = "none"  # "blocks": the UNet's down/mid/up blocks stream from host memory; "blocks:N": the N largest
    rollback_on_host: bool = False  # the rollback's copy of LoRA + optimizer state in pinned host memory, not the GPU
    # ---- diffusion
    prediction_type: str = "auto"  # auto: what the checkpoint declares
    noise_offset: float = 0.0  # 0.0357 is a common SDXL value
    min_snr_gamma: float = 0.0  # 0: off; 5 is the usual value
    loss_type: str = "l2"
    huber_c: float = 0.1
    timestep_min: int = 0
    timestep_max: int = 1000  # exclusive
    # ---- data
    resolution: int = 1024
    enable_buckets: bool = True
    bucket_step: int = 64
    bucket_min_side: int | None = None  # None: resolution / 2
    bucket_max_side: int | None = None  # None: resolution * 2
    caption_extensions: list = field(default_factory=lambda: [".txt", ".caption"])
    default_repeats: int = 1
    random_crop: bool = False
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    cache_latents: str = "memory"
    cache_text: str = "memory"
    vae_batch_size: int = 1
    # ---- saving and stopping
    save_every: int = 0  # steps between LoRA saves (<output stem>-step000500.safetensors); 0: only the end
    save_state_every: int = 0  # steps between resumable states; 0: at every LoRA save and at the end
    save_dtype: str = "fp16"
    # What the optimizer's should_stop does: "stop" (save and end), "mark" (an event only) or "off". Not "stop" by
    # default: the v3.x Emo optimizers latch it after 32 calm steps, which a slowly moving LoRA loss often is.
    auto_stop: str = "mark"
    max_consecutive_skips: int = 50  # non-finite steps in a row before the run is abandoned
    # Updates in a row that made the LoRA non-finite (each rolled back) before the run stops as "diverged".
    max_consecutive_bad_steps: int = 3
    # ---- evaluation, samples, telemetry
    eval_every: int = 0  # steps between losses of a fixed batch at fixed timesteps; 0: off
    eval_size: int = 4
    sample_every: int = 0  # steps between sample images; 0: off
    sample_prompts: list = field(default_factory=list)
    sample_negative: str = ""
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_seed: int = 0
    sample_size: int | None = None  # None: resolution
    tensorboard: bool = False  # also write TensorBoard events (when tensorboard is installed)
    # ---- validation and masked loss
    validation_split: float = 0.0  # fraction of the images held out of training (picked by seed); 0: none
    validation_data: str | None = None  # a folder of held-out images instead of a split
    validation_every: int = 0  # steps between validation losses; 0: eval_every, else 50
    # What auto_stop acts on: the optimizer's should_stop, or a validation loss that made no new minimum for
    # val_patience validations in a row ("val-plateau").
    auto_stop_on: str = "should_stop"
    val_patience: int = 5
    mask: str = "off"  # masked loss: "file" (<stem>_mask.png beside the image) or "alpha" (its alpha channel)
    # ---- regularization (class) images, as kohya's reg_data_dir: each epoch as many reg samples as training ones
    reg_data: str | None = None  # a folder in kohya's layout (N_class folders); None: none
    prior_loss_weight: float = 1.0  # the weight of a reg sample's loss (kohya's prior_loss_weight)
    comment: str = ""

    # ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return _from_dict({**self.to_dict(), **changes}, "replace()")

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_split or self.validation_data)

    @property
    def validation_interval(self) -> int:
        """Steps between validation losses (0: no validation)."""
        if not self.has_validation:
            return 0
        return self.validation_every or self.eval_every or 50

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self, *, require_paths: bool = True) -> "TrainConfig":
        """Raise ConfigError naming the first bad option; return self."""
        if require_paths:
            for name in ("model", "data", "output"):
                if not getattr(self, name):
                    raise ConfigError(f"{name} is required")
        if self.output and not self.output.lower().endswith(".safetensors"):
            raise ConfigError(f"output must be a .safetensors file, got {self.output!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            near = difflib.get_close_matches(self.optimizer, OPTIMIZER_NAMES, n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; choose one of {', '.join(OPTIMIZER_NAMES)}"
            raise ConfigError(f"optimizer: unknown name {self.optimizer!r}{hint}")
        for name, choices in CHOICES.items():
            if choices and getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        positive = ("rank", "steps", "batch_size", "grad_accum", "resolution", "bucket_step", "vae_batch_size",
                    "sample_steps", "eval_size", "max_consecutive_skips",
                    "max_consecutive_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("conv_rank", "warmup_steps", "max_grad_norm", "noise_offset", "min_snr_gamma",
                        "keep_tokens", "save_every", "save_state_every", "eval_every", "sample_every",
                        "default_repeats", "conv_alpha", "min_lr_ratio")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor must be -1 or >= 1, got {self.lokr_factor}")
        offload_block_count(self.offload)  # raises on a bad value
        if self.offload != "none" and self.compile:
            raise ConfigError("offload and compile exclude each other: the offload hooks swap the weights that "
                              "compiled blocks are specialised on")
        if self.tucker and not self.conv_rank:
            raise ConfigError("tucker needs conv_rank > 0: its cores belong to the 3x3 conv adapters")
        if self.tucker and self.network == "lokr":
            raise ConfigError("tucker works with network lora or loha: ComfyUI cannot apply LoKr's Tucker cores")
        why = refusal(self.network, dora=self.dora, rslora=self.rslora, tucker=self.tucker,
                      dropout=self.network_dropout, rescale=self.oft_rescale, constraint=self.oft_constraint)
        if why:
            raise ConfigError(why)
        for name in ("lr", "alpha", "text_encoder_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.prior_loss_weight >= 0:
            raise ConfigError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0, got {self.huber_c}")
        for name in ("network_dropout", "caption_dropout", "tag_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.timestep_min < self.timestep_max <= 1000:
            raise ConfigError(f"timestep range must satisfy 0 <= timestep_min < timestep_max <= 1000, got "
                              f"{self.timestep_min}..{self.timestep_max}")
        if self.bucket_step % 32:
            raise ConfigError(f"bucket_step must be a multiple of 32 (SDXL downsamples latents 4x), "
                              f"got {self.bucket_step}")
        for name in ("resolution", "bucket_min_side", "bucket_max_side", "sample_size"):
            v = getattr(self, name)
            if v is not None and (v < 32 or v % 32):
                raise ConfigError(f"{name} must be a positive multiple of 32, got {v}")
        if self.enable_buckets and self.resolution % self.bucket_step:
            raise ConfigError(f"resolution {self.resolution} must be a multiple of bucket_step {self.bucket_step}")
        if self.cache_latents != "off" and self.random_crop:
            raise ConfigError("random_crop needs cache_latents='off': a cached latent holds one fixed crop")
        if self.cache_text != "off":
            for name in ("shuffle_caption", "caption_dropout", "tag_dropout", "train_text_encoder"):
                if getattr(self, name):
                    raise ConfigError(f"{name} needs cache_text='off': cached text-encoder outputs are of one "
                                      "fixed caption from frozen encoders")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_data:
            raise ConfigError("validation_split and validation_data exclude each other: hold out a share of data "
                              "or name a separate folder")
        if self.validation_every < 0 or self.val_patience < 1:
            raise ConfigError(f"validation_every must be >= 0 and val_patience >= 1, got {self.validation_every} "
                              f"and {self.val_patience}")
        if self.auto_stop_on == "val-plateau" and not self.has_validation:
            raise ConfigError("auto_stop_on='val-plateau' needs validation images (validation_split or "
                              "validation_data)")
        if self.sample_every and not self.sample_prompts:
            raise ConfigError("sample_every needs sample_prompts (a list of prompts)")
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError("sample_prompts must be a list of strings")
        if not self.caption_extensions:
            raise ConfigError("caption_extensions must name at least one extension")
        return self


def offload_block_count(value: str) -> int | None:
    """The `offload` option as a count: 0 for "none", None for "blocks" (all of them), N for "blocks:N"."""
    if value == "none":
        return 0
    if value == "blocks":
        return None
    head, _, n = str(value).partition(":")
    if head == "blocks" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ConfigError(f"offload must be none, blocks or blocks:N (N >= 1 UNet blocks), got {value!r}")


# ---- typed construction ---------------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, source: str):
    hint = _HINTS[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{name} cannot be empty (in {source})")
    for t in allowed:
        if t is type(None):
            continue
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t in (int, float) and isinstance(value, str):
            try:
                return t(value)
            except ValueError:
                continue
        if t is list and isinstance(value, (list, tuple)):
            return list(value)
        if t is dict and isinstance(value, dict):
            return dict(value)
        if t is str and isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    want = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{name} must be {want}, got {value!r} (in {source})")


def _check_keys(d: dict, source: str) -> None:
    for k in d:
        if k not in _FIELDS:
            near = difflib.get_close_matches(k, _FIELDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown option {k!r} in {source}{hint}")


def _from_dict(d: dict, source: str) -> TrainConfig:
    _check_keys(d, source)
    return TrainConfig(**{k: _coerce(k, v, source) for k, v in d.items()})


# ---- presets --------------------------------------------------------------------------------------------------
def list_presets() -> list[dict]:
    """[{name, kind, description}] of every preset file, sorted by kind then name."""
    out = []
    for path in sorted(PRESETS_DIR.glob("*.json")):
        data = _read_json(path)
        out.append({"name": path.stem, "kind": data.get("kind", "training"),
                    "description": data.get("description", "")})
    return sorted(out, key=lambda p: (p["kind"], p["name"]))


def load_preset(name: str, _seen=()) -> dict:
    """The settings of preset `name` (file stem in presets/), its `extends` chain applied first."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        names = [p.stem for p in sorted(PRESETS_DIR.glob("*.json"))]
        near = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; available: {', '.join(names)}"
        raise ConfigError(f"unknown preset {name!r}{hint}")
    if name in _seen:
        raise ConfigError(f"preset {name!r} extends itself (via {' -> '.join(_seen)})")
    data = _read_json(path)
    settings = dict(data.get("settings", {}))
    _check_keys(settings, f"preset {path.name}")
    if parent := data.get("extends"):
        settings = {**load_preset(parent, (*_seen, name)), **settings}
    return settings


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def optimizer_preset_name(optimizer: str) -> str | None:
    name = optimizer.lower()
    return name if (PRESETS_DIR / f"{name}.json").is_file() else None


# ---- config files ---------------------------------------------------------------------------------------------
def load_config_file(path) -> dict:
    """A JSON or TOML file of options (tables such as [data] are flattened). Relative paths inside are taken
    relative to the file's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"config file must be .json or .toml, got {path.name}")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object/table of options")
    flat: dict = {}
    for k, v in data.items():
        if isinstance(v, dict) and _HINTS.get(k) is not dict:  # a section: [data], [training], ...
            flat.update(v)
        else:
            flat[k] = v
    for k in PATH_FIELDS:
        if isinstance(flat.get(k), str) and flat[k] and not Path(flat[k]).expanduser().is_absolute():
            flat[k] = str((path.parent / flat[k]).resolve())
    return flat


# ---- merging --------------------------------------------------------------------------------------------------
def build_config(*, presets=(), config_file=None, overrides: dict | None = None, base: dict | None = None,
                 validate: bool = True) -> TrainConfig:
    """Merge: defaults < base (a resumed run's config) < optimizer preset < presets < config file < overrides.

    `presets` is a list of names (or one comma-separated string); a config file may name more under
    "preset". `overrides` are the command-line flags (None values are ignored).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_layer = load_config_file(config_file) if config_file else {}
    names = _split(file_layer.pop("preset", None)) + _split(presets) + _split(overrides.pop("preset", None))
    preset_layers = [(f"preset {n!r}", load_preset(n)) for n in names]
    layers = [("the resumed run's config", dict(base or {})), *preset_layers,
              (f"config file {config_file}", file_layer), ("the command line", overrides)]
    # The optimizer's own preset sits just above the base, so any explicit source wins over it.
    optimizer = TrainConfig.optimizer
    for _, layer in layers:
        optimizer = layer.get("optimizer", optimizer)
    opt_preset = optimizer_preset_name(str(optimizer)) if not base else None
    if opt_preset and opt_preset not in names:
        layers.insert(1, (f"preset {opt_preset!r}", load_preset(opt_preset)))
    merged: dict = {}
    for source, layer in layers:
        _check_keys(layer, source)
        for k, v in layer.items():
            merged[k] = _coerce(k, v, source)
    cfg = TrainConfig(**merged)
    return cfg.validate(require_paths=not cfg.resume) if validate else cfg


def _split(value) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v and v.strip()]


def load_run_config(run_dir) -> dict:
    """The config.json a run folder was started with."""
    path = Path(run_dir).expanduser() / "config.json"
    if not path.is_file():
        raise ConfigError(f"not a run folder (no config.json): {run_dir}")
    data = _read_json(path)
    return {k: v for k, v in data.items() if k in _FIELDS}


# What a resumed run may change: how long it trains, what it saves, shows and stops on, where it runs. Everything
# else decides the numbers (model, data, network, optimizer, seed, batch) and stays the run's.
RESUME_MAY_CHANGE = ("steps", "save_every", "save_state_every", "sample_every", "sample_prompts", "sample_negative",
                     "sample_steps", "sample_cfg", "sample_seed", "sample_size", "auto_stop", "auto_stop_on",
                     "val_patience", "validation_every", "tensorboard", "compile", "gradient_checkpointing",
                     "comment")
_RESUME_HOST = ("output", "runs_dir", "cache_dir", "device", "run_name", "resume", "tokenizer")  # the run's own


def resume_conflicts(run_config: dict, asked: TrainConfig) -> list[str]:
    """The options `asked` sets differently from the run it would resume, as "name: V here, W in the run".
    An unset (None) value is no conflict: the run's value stands for it."""
    run = _from_dict(run_config, "the run's config.json")
    out = []
    for name in _FIELDS:
        if name in RESUME_MAY_CHANGE or name in _RESUME_HOST:
            continue
        mine, theirs = getattr(asked, name), getattr(run, name)
        if mine is None:
            continue
        if json.dumps(mine, sort_keys=True, default=str) != json.dumps(theirs, sort_keys=True, default=str):
            out.append(f"{name}: {mine!r} here, {theirs!r} in the run")
    return out


def resume_config(run_dir, **overrides) -> TrainConfig:
    """The config to continue `run_dir`: its saved config, with `overrides` (e.g. steps=2000) on top."""
    return build_config(base=load_run_config(run_dir), overrides={**overrides, "resume": str(run_dir)})
