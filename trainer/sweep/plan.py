"""The sweep's plan: which runs, each an ordinary TrainConfig, checked before any model loads.

Every run starts from the same base config (data, model, network, seed, steps, validation) and differs only in
the optimizer with its preset (its recommended LR and settings; --lr overrides), the LR multiple, the seed and
what the optimizer is handed as the loss (raw, normalized, or withheld for the control). A row therefore
equals `trainer train` with that run's config (plan.runs[i].cfg).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import OPTIMIZER_NAMES, ConfigError, TrainConfig, load_preset, optimizer_preset_name

# The optimizers whose update reads the loss: the Emo family, and RefAdamW, whose optional loss drives its
# divergence check and its mid-run injection (AutoTrustGO takes step(loss=) but never uses it; AdamW has no such
# argument). Checked against the classes' reads_loss by a test.
EMO = tuple(n for n in OPTIMIZER_NAMES if n.startswith("Emo"))
LOSS_READERS = EMO + ("RefAdamWminiScheduleFree",)
LOSS_MODES = ("raw", "normalized")
PER_RUN = ("optimizer", "lr", "steps", "seed", "optimizer_loss", "output", "run_name", "runs_dir", "resume")
DEFAULT_HOLDOUT = 0.2  # the validation share when neither validation_split nor validation_data is given


def parse_optimizer_list(text) -> list[str]:
    """"all", "emo" or a comma list (any case) -> canonical names, in order. Unknown names and duplicates raise
    ConfigError naming them and the valid names."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t and t.strip()]
    if not items:
        raise ConfigError("optimizers: name at least one (a comma list, 'all' or 'emo')")
    if len(items) == 1 and items[0].lower() in ("all", "emo"):
        return list(OPTIMIZER_NAMES if items[0].lower() == "all" else EMO)
    canon = {n.lower(): n for n in OPTIMIZER_NAMES}
    unknown = [t for t in items if t.lower() not in canon]
    if unknown:
        raise ConfigError(f"optimizers: unknown name(s) {', '.join(unknown)}; valid: {', '.join(OPTIMIZER_NAMES)}, "
                          "or all / emo")
    names = [canon[t.lower()] for t in items]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"optimizers: listed twice: {', '.join(dups)}")
    return names


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: its row's identity and the config it trains with."""

    label: str  # e.g. "EmoSens lr=1 x0.3 normalized seed=2" (unique in the sweep)
    name: str  # the run folder's name under <output>/runs, and the LoRA's file stem
    optimizer: str
    lr: float
    lr_scale: float
    loss_fed: str  # "fed" or "withheld"
    optimizer_loss: str  # "raw", "normalized" or "withheld"
    seed: int
    cfg: TrainConfig


@dataclass
class SweepPlan:
    base: TrainConfig
    optimizers: list
    steps: int
    seeds: list  # the seeds, base.seed upward
    loss_control: bool
    optimizer_loss_modes: tuple
    lr_scales: tuple
    lr: float | None  # one LR for every optimizer instead of their presets
    output_dir: Path
    explicit: dict = field(default_factory=dict)  # options the user set: they win over the optimizers' presets
    runs: list = field(default_factory=list)  # RunSpec, in the order they run
    notes: list = field(default_factory=list)  # what the plan decided for the user (e.g. the 20% held out)

    def to_dict(self) -> dict:
        """What sweep.json keeps: enough to rebuild the plan for --resume (plan_from_dict)."""
        return {"base": self.base.to_dict(), "optimizers": list(self.optimizers), "steps": self.steps,
                "seeds": len(self.seeds), "loss_control": self.loss_control,
                "optimizer_loss_modes": list(self.optimizer_loss_modes), "lr_scales": list(self.lr_scales),
                "lr": self.lr, "output_dir": str(self.output_dir), "explicit": dict(self.explicit),
                "notes": list(self.notes), "runs": [r.label for r in self.runs]}


def plan_from_dict(d: dict) -> SweepPlan:
    plan = plan_sweep(TrainConfig(**d["base"]), d["optimizers"], seeds=d["seeds"], loss_control=d["loss_control"],
                      optimizer_loss_modes=tuple(d["optimizer_loss_modes"]), lr_scales=tuple(d["lr_scales"]),
                      steps=d["steps"], output_dir=d["output_dir"], lr=d.get("lr"), explicit=d.get("explicit"),
                      check_data=False)
    plan.notes = list(d.get("notes") or [])
    return plan


def _fmt(x: float) -> str:
    return f"{x:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def preset_settings(optimizer: str) -> dict:
    """The optimizer's own preset (its recommended LR, scheduler and arguments), as `trainer train
    --optimizer X` applies it."""
    name = optimizer_preset_name(optimizer)
    settings = dict(load_preset(name)) if name else {}
    settings.setdefault("optimizer_args", {})  # another optimizer's arguments must not carry over
    return settings


def plan_sweep(base_cfg: TrainConfig, optimizers, *, seeds: int = 1, loss_control: bool = False,
               optimizer_loss_modes=("raw",), lr_scales=(1.0,), steps: int, output_dir, lr: float | None = None,
               explicit: dict | None = None, check_data: bool = True) -> SweepPlan:
    """Validate the sweep and lay out its runs. Raises ConfigError (a one-line message) on bad input, before
    any model loads: unknown or repeated optimizers, seeds < 1, a loss control without an optimizer that reads
    the loss, an empty held-out set, ...

    explicit: the options the user set (CLI flags, --set, node inputs); they win over each optimizer's preset,
    as they do in `trainer train`. Without validation_split/validation_data, 20% of the images are held out."""
    names = parse_optimizer_list(optimizers)
    explicit = {k: v for k, v in dict(explicit or {}).items() if v is not None and k not in PER_RUN}
    if int(seeds) < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    modes = tuple(optimizer_loss_modes)
    if not modes or any(m not in LOSS_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"optimizer_loss modes must be distinct values of {', '.join(LOSS_MODES)}; got "
                          f"{', '.join(map(str, modes)) or 'none'}")
    scales = tuple(float(s) for s in lr_scales)
    if not scales or any(not s > 0 for s in scales) or len(set(scales)) != len(scales):
        raise ConfigError(f"lr_scale values must be distinct and > 0; got {', '.join(map(_fmt, scales)) or 'none'}")
    if lr is not None and not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    readers = [n for n in names if n in LOSS_READERS]
    if loss_control and not readers:
        raise ConfigError("loss_control needs an optimizer whose update reads the loss (an Emo optimizer or "
                          f"RefAdamWminiScheduleFree); {', '.join(names)} never read it, so there is nothing to "
                          "withhold")
    notes = []
    base = base_cfg
    if not base.has_validation:
        base = base.replace(validation_split=DEFAULT_HOLDOUT)
        notes.append(f"no validation set given: holding out {DEFAULT_HOLDOUT:.0%} of the images "
                     "(validation_split); set validation_split or validation_data to choose")
    out = Path(output_dir).expanduser().resolve()
    every = base.validation_every or max(1, int(steps) // 20)  # about 20 points per validation curve
    common = dict(steps=int(steps), validation_every=every, runs_dir=str(out / "runs"), resume=None,
                  cache_dir=base.cache_dir or str(out / "cache"))
    runs = []
    seed_list = [base.seed + i for i in range(int(seeds))]
    for name in names:
        settings = {**preset_settings(name), **explicit}
        lr0 = lr if lr is not None else settings.get("lr") or None
        if lr0 is None:
            from ..optim import OPTIMIZER_INFO

            lr0 = OPTIMIZER_INFO[name].recommended_lr
        variants = [("fed", m) for m in (modes if name in LOSS_READERS else ("raw",))]
        if loss_control and name in LOSS_READERS:
            variants.append(("withheld", "withheld"))
        for scale in scales:
            for fed, mode in variants:
                for seed in seed_list:
                    run_lr = lr0 * scale
                    label = " ".join([name, f"lr={_fmt(run_lr)}"] + ([f"x{_fmt(scale)}"] if len(scales) > 1 else [])
                                     + [mode, f"seed={seed}"])
                    slug = _slug(f"{len(runs) + 1:03d}-{label}")
                    cfg = base.replace(**{**settings, **common, "optimizer": name, "lr": run_lr, "seed": seed,
                                          "optimizer_loss": mode, "run_name": slug,
                                          "output": str(out / "loras" / f"{slug}.safetensors")})
                    runs.append(RunSpec(label, slug, name, run_lr, scale, fed, mode, seed, cfg.validate()))
    plan = SweepPlan(base, names, int(steps), seed_list, bool(loss_control), modes, scales, lr, out, explicit,
                     runs, notes)
    if check_data:
        check_holdout(plan)
    return plan


def check_holdout(plan: SweepPlan) -> None:
    """Scan the data and hold out the validation images as every run will (per seed): both sets must be
    non-empty. Cheap (image headers), before the model loads."""
    from ..data import scan_dataset, split_validation

    cfg = plan.base
    items, _ = scan_dataset(cfg.data, caption_extensions=cfg.caption_extensions,
                            default_repeats=cfg.default_repeats, mask=cfg.mask)
    if cfg.validation_data:
        val, _ = scan_dataset(cfg.validation_data, caption_extensions=cfg.caption_extensions, default_repeats=1,
                              mask=cfg.mask)
        if not val:
            raise ConfigError(f"validation_data {cfg.validation_data}: no usable images, the held-out set is empty")
        return
    for seed in plan.seeds:
        train_items, val = split_validation(items, cfg.validation_split, seed)
        if not val or not train_items:
            raise ConfigError(f"{cfg.data}: {len(items)} image(s) leave nothing to hold out for validation")
