"""The sweep's results: one row per run (sweep.json), the table grouped over seeds (sweep.md) and the
recommendation line. Pure functions of the rows, except row() and lora_digest() that read a finished run."""

from __future__ import annotations

import hashlib
import math

ROW_KEYS = ("label", "optimizer", "lr", "lr_scale", "loss_fed", "optimizer_loss", "seed", "val_loss_start",
            "val_loss_min", "val_loss_min_step", "val_loss_end", "train_loss_end", "should_stop_step",
            "stop_reason", "steps_done", "steps_per_s", "peak_memory_mb", "update_ratio", "loss_cv",
            "optimizer_loss_cv", "zones", "barely_moving", "identical", "message", "seconds", "run_dir",
            "lora_path", "lora_digest")
FAILED = ("diverged", "nonfinite", "failed")


def lora_digest(path) -> str | None:
    """sha256 over the LoRA file's tensors (names, dtypes, shapes, bytes), not its metadata: equal digests mean
    bit-identical weights."""
    if not path:
        return None
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=_u8()).numpy().tobytes())
    return h.hexdigest()


def _u8():
    import torch

    return torch.uint8


def row(spec, result, seconds: float, barely_moving: bool) -> dict:
    s = result.summary or {}
    return {
        "label": spec.label, "optimizer": spec.optimizer, "lr": spec.lr, "lr_scale": spec.lr_scale,
        "loss_fed": spec.loss_fed, "optimizer_loss": spec.optimizer_loss, "seed": spec.seed,
        "val_loss_start": s.get("val_loss_start"), "val_loss_min": s.get("val_loss_min"),
        "val_loss_min_step": s.get("val_loss_min_step"), "val_loss_end": s.get("val_loss_end"),
        "train_loss_end": s.get("loss_end"), "should_stop_step": s.get("should_stop_step"),
        "stop_reason": result.stop_reason, "steps_done": result.steps_done, "steps_per_s": s.get("steps_per_s"),
        "peak_memory_mb": s.get("peak_mem_mb"), "update_ratio": s.get("update_ratio"), "loss_cv": s.get("loss_cv"),
        "optimizer_loss_cv": s.get("optimizer_loss_cv"), "zones": s.get("zones") or {},
        "barely_moving": barely_moving, "identical": None, "message": result.message, "seconds": seconds,
        "run_dir": result.run_dir, "lora_path": result.lora_path, "lora_digest": lora_digest(result.lora_path),
    }


def failed_row(spec, error: str, run_dir: str | None, seconds: float) -> dict:
    out = {k: None for k in ROW_KEYS}
    out.update(label=spec.label, optimizer=spec.optimizer, lr=spec.lr, lr_scale=spec.lr_scale,
               loss_fed=spec.loss_fed, optimizer_loss=spec.optimizer_loss, seed=spec.seed, stop_reason="failed",
               message=error, zones={}, seconds=seconds, run_dir=run_dir, barely_moving=False)
    return out


def mark_identical(rows: list) -> None:
    """Each normalized or withheld row: identical=True when its LoRA equals, bit for bit, the raw-fed run of the
    same optimizer, LR and seed (the update never read the loss's difference), else False."""
    raw = {(r["optimizer"], r["lr"], r["seed"]): r for r in rows if r["optimizer_loss"] == "raw"}
    for r in rows:
        if r["optimizer_loss"] == "raw":
            continue
        ref = raw.get((r["optimizer"], r["lr"], r["seed"]))
        if ref is not None and ref.get("lora_digest") and r.get("lora_digest"):
            r["identical"] = ref["lora_digest"] == r["lora_digest"]


# ---- grouping over seeds --------------------------------------------------------------------------------------
def _mean_sd(values):
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def groups(rows: list) -> list[dict]:
    """Rows grouped by (optimizer, lr, optimizer_loss) in first-seen order, with their means over seeds."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["optimizer"], r["lr"], r["optimizer_loss"]), []).append(r)
    result = []
    for (opt, lr, mode), rs in out.items():
        ok = [r for r in rs if r["stop_reason"] not in FAILED]
        end, end_sd = _mean_sd([r["val_loss_end"] for r in ok])
        vmin, vmin_sd = _mean_sd([r["val_loss_min"] for r in ok])
        zones: dict = {}
        for r in rs:
            for z, share in (r.get("zones") or {}).items():
                zones[z] = zones.get(z, 0.0) + share / len(rs)
        result.append({
            "optimizer": opt, "lr": lr, "optimizer_loss": mode, "loss_fed": rs[0]["loss_fed"], "rows": rs,
            "seeds": len(rs), "val_end": end, "val_end_sd": end_sd, "val_min": vmin, "val_min_sd": vmin_sd,
            "val_min_step": _mean_sd([r["val_loss_min_step"] for r in ok])[0],
            "train_end": _mean_sd([r["train_loss_end"] for r in ok])[0],
            "loss_cv": _mean_sd([r["optimizer_loss_cv"] if mode != "withheld" else r["loss_cv"] for r in rs])[0],
            "update_ratio": _mean_sd([r["update_ratio"] for r in rs])[0],
            "steps_per_s": _mean_sd([r["steps_per_s"] for r in rs])[0], "zones": zones,
            "stops": sorted({r["stop_reason"] or "?" for r in rs}),
            "identical": bool(rs) and all(r.get("identical") is True for r in rs),
            "usable": bool(ok) and end is not None,
        })
    return result


def _vs_raw(g: dict, by_key: dict) -> str:
    if g["optimizer_loss"] == "raw":
        return ""
    if g["identical"]:
        return "identical"
    ref = by_key.get((g["optimizer"], g["lr"], "raw"))
    if ref is None or ref["val_end"] is None or g["val_end"] is None:
        return "n/a"
    return f"{g['val_end'] - ref['val_end']:+.4g}"


def _num(x, fmt="{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def table_md(rows: list) -> str:
    """The markdown table: one line per (optimizer, LR, optimizer loss), means over the seeds (± sample SD)."""
    gs = groups(rows)
    by_key = {(g["optimizer"], g["lr"], g["optimizer_loss"]): g for g in gs}
    head = ("| optimizer | lr | optimizer loss | seeds | val loss end | val loss min (step) | end vs raw | "
            "train loss end | loss CV | update ratio | zones | stop |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for g in gs:
        end = _num(g["val_end"]) + (f" ± {g['val_end_sd']:.4f}" if g["val_end_sd"] is not None else "")
        vmin = _num(g["val_min"]) + (f" ({g['val_min_step']:.0f})" if g["val_min_step"] is not None else "")
        zones = ", ".join(f"{z} {share:.0%}" for z, share in g["zones"].items()) or "-"
        lines.append(f"| {g['optimizer']} | {g['lr']:g} | {g['optimizer_loss']} | {g['seeds']} | {end} | {vmin} | "
                     f"{_vs_raw(g, by_key) or '-'} | {_num(g['train_end'])} | {_num(g['loss_cv'], '{:.3f}')} | "
                     f"{_num(g['update_ratio'], '{:.2g}')} | {zones} | {', '.join(g['stops'])} |")
    return "\n".join(lines) + "\n"


def recommend(rows: list) -> tuple[dict | None, str]:
    """-> (the winner's first row or None, the recommendation line). Candidates are the fed runs (raw or
    normalized) that did not diverge, ranked by their mean final validation loss; with several seeds the
    lead must exceed the seed-to-seed SD of the two best, else "no clear winner"."""
    cands = sorted((g for g in groups(rows) if g["loss_fed"] == "fed" and g["usable"]), key=lambda g: g["val_end"])
    if not cands:
        return None, "no recommendation: no run finished with a validation loss"

    def name(g):
        return f"{g['optimizer']} at lr {g['lr']:g}" + (" (normalized loss)" if g["optimizer_loss"] != "raw" else "")

    best = cands[0]
    if len(cands) == 1:
        return best["rows"][0], f"only candidate: {name(best)}, final validation loss {best['val_end']:.4f}"
    second = cands[1]
    margin = second["val_end"] - best["val_end"]
    sds = [g["val_end_sd"] for g in (best, second) if g["val_end_sd"] is not None]
    if not sds:
        return best["rows"][0], (f"best: {name(best)}, final validation loss {best['val_end']:.4f}, ahead of "
                                 f"{name(second)} by {margin:.4g}; one seed, so the seed-to-seed spread is unknown "
                                 "(use seeds >= 2 to know whether the margin is real)")
    spread = max(sds)
    if margin <= spread:
        return None, (f"no clear winner: {name(best)} ({best['val_end']:.4f}) leads {name(second)} by {margin:.4g}, "
                      f"inside the seed-to-seed spread ({spread:.4g})")
    return best["rows"][0], (f"winner: {name(best)}, final validation loss {best['val_end']:.4f}, ahead of "
                             f"{name(second)} by {margin:.4g} (seed-to-seed spread {spread:.4g})")
