"""LoRA files: where they go, writing them, and the kohya ss_* metadata they carry.

The resumable training state (weights, optimizer, RNGs, position) is state.py's business.
"""

import logging
from pathlib import Path

from .distributed import world_size
from .parts import DTYPES, LoopState, RunSetup

log = logging.getLogger("emolora.train")


def step_path(output, step: int) -> Path:
    """The intermediate LoRA of `step` beside the final one: <stem>-step000123.safetensors."""
    out = Path(output).expanduser()
    return out.with_name(f"{out.stem}-step{step:06d}{out.suffix}")


def save_lora(cfg, run: RunSetup, loop: LoopState, store, path=None, *, stop_reason=None,
              summary: dict | None = None) -> str | None:
    """Write the LoRA (kohya keys, ss_* metadata, the run's summary as emolora_*) atomically; default: the
    configured output. Returns the path written (a new name beside `path` when another program holds it open,
    on Windows), or None when the weights are not finite in the save dtype: nothing is written (any
    earlier file stays) and a "save_refused" event records it."""
    from . import model as M
    from .model.errors import NonFiniteLoRAError

    path = Path(path or cfg.output).expanduser()
    meta = kohya_metadata(cfg, run, loop, stop_reason, summary or {})
    try:
        written = M.save_lora(path, run.network, meta, dtype=DTYPES[cfg.save_dtype])
    except NonFiniteLoRAError as e:
        log.error("%s", e)
        store.event(loop.step, "save_refused", {"error": str(e), "path": str(path)})
        return None
    if Path(written) != path:  # `path` was held open by another program (Windows): the weights went beside it
        store.event(loop.step, "save_renamed", {"path": str(written), "held": str(path)})
    store.event(loop.step, "save", {"path": str(written)})
    log.info("saved %s (step %d)", written, loop.step)
    return str(written)


def kohya_metadata(cfg, run: RunSetup, loop: LoopState, stop_reason, summary: dict) -> dict:
    from . import model as M

    data, report = run.data, run.report
    buckets = {f"{w}x{h}": n for (w, h), n in data.bucket_counts().items()}
    return M.kohya_metadata(
        network=run.network, model=run.model, output_name=Path(cfg.output).stem, steps=loop.step,
        epoch=loop.epoch, resolution=cfg.resolution, learning_rate=cfg.lr, optimizer=f"emolora.{cfg.optimizer}",
        text_encoder_lr=cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr,
        optimizer_args=cfg.optimizer_args or None, num_train_images=report.samples_per_epoch,
        tag_frequency=tag_frequency(run.items, cfg.caption_separator),
        training_started_at=run.started_at, seed=cfg.seed,
        timestep_range=(cfg.timestep_min, cfg.timestep_max),
        lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.warmup_steps, max_train_steps=cfg.steps,
        max_grad_norm=cfg.max_grad_norm, gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=run.runtime.precision,
        fp8_base=str(getattr(run.model, "base_dtype", "")).startswith("float8"),  # kohya's key, always written
        cache_latents=cfg.cache_latents != "off", noise_offset=cfg.noise_offset or None,
        min_snr_gamma=cfg.min_snr_gamma or None, loss_type=cfg.loss_type,
        huber_c=cfg.huber_c if cfg.loss_type == "huber" else None, batch_size_per_device=cfg.batch_size,
        total_batch_size=cfg.batch_size * cfg.grad_accum * world_size(), num_batches_per_epoch=len(data),
        enable_bucket=cfg.enable_buckets, bucket_info={"buckets": buckets},
        min_bucket_reso=min(min(b) for b in data.buckets),
        max_bucket_reso=max(max(b) for b in data.buckets), keep_tokens=cfg.keep_tokens,
        shuffle_caption=cfg.shuffle_caption, flip_aug=cfg.flip_aug, random_crop=cfg.random_crop,
        caption_dropout_rate=cfg.caption_dropout, caption_tag_dropout_rate=cfg.tag_dropout,
        dataset_dirs={k: {"n_repeats": r, "img_count": n} for k, (r, n) in report.folders.items()},
        training_comment=cfg.comment or None, **reg_metadata(cfg, report),
        extra={"emolora_optimizer": cfg.optimizer, "emolora_auto_stop": cfg.auto_stop,
               "emolora_stop_reason": stop_reason, "emolora_skipped_steps": loop.skipped,
               **{f"emolora_{k}": v for k, v in summary.items() if k not in ("steps", "skipped_steps")}},
    )


def reg_metadata(cfg, report) -> dict:
    """kohya's keys for regularization images (only when the run has them): ss_reg_dataset_dirs (per folder: its
    repeats and images), ss_num_reg_images (images x folder repeats, before the balance) and
    ss_prior_loss_weight."""
    reg = getattr(report, "reg", None)
    if not reg:
        return {}
    return {"reg_dataset_dirs": reg["dirs"], "num_reg_images": reg["samples"],
            "prior_loss_weight": cfg.prior_loss_weight}


def tag_frequency(items, separator: str) -> dict:
    """kohya's ss_tag_frequency: per folder, how often each separated tag occurs (repeats counted)."""
    freq: dict = {}
    for it in items:
        folder = freq.setdefault(it.image.parent.name, {})
        for tag in (t.strip() for t in it.caption.split(separator)):
            if tag:
                folder[tag] = folder.get(tag, 0) + it.repeats
    return freq
