"""Does feeding the loss matter? The paired comparison behind the README's evidence table.

Reads one or more sweep folders (`python -m trainer sweep ... --loss-control --optimizer-loss raw,normalized
--seeds 2`) and prints, per optimizer, the validation gain (start - end) of each variant and the paired
difference of the final validation loss against the raw-fed run of the same seed (same data split, noise and
timesteps: only what the optimizer is handed differs).

Verdict rule (written under the table): "identical" when the LoRAs are bit-identical for every seed; "lower" /
"higher" only when every seed's paired difference has the same sign and their mean exceeds the spread between
the seeds' differences (max - min); otherwise "no difference".

Runs at other multiples of the preset LR (`--lr-scale 2,4`, in the same or another folder) make a second table, the
LR control: each (variant, LR) paired per seed against the raw-fed run at the preset LR. It tells a loss that
helps apart from a loss that only makes the step larger. A third table sets each variant at its own best LR
(lowest mean final validation loss over the LRs run) against raw fed at its best, paired per seed.

    python benchmarks/sweep_evidence.py SWEEP_DIR [SWEEP_DIR ...]
    python benchmarks/sweep_evidence.py docs/evidence/*.json   # the published rows

--export DIR writes each sweep's rows (without its plan) to DIR/<folder name>.json, as docs/evidence/ holds them.
"""

import argparse
import json
import statistics
from pathlib import Path

VARIANTS = ("raw", "normalized", "withheld")


def load_rows(sources) -> list[dict]:
    """The rows of sweep folders (their sweep.json) or of sweep.json-shaped files (docs/evidence/*.json)."""
    rows = []
    for source in sources:
        path = Path(source)
        doc = json.loads((path / "sweep.json" if path.is_dir() else path).read_text())
        rows += [r for r in doc["rows"] if r.get("stop_reason") not in ("failed", None)]
    return rows


def verdict(diffs: list[float], identical: list) -> str:
    if identical and all(x is True for x in identical):
        return "identical"
    if len(diffs) < 2:
        return "one seed"
    mean, spread = statistics.fmean(diffs), max(diffs) - min(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(mean) > spread:
        return "lower" if mean < 0 else "higher"
    return "no difference"


def main_zone(zones: dict) -> str:
    """The zones other than the neutral one, largest first (the neutral share is 1 minus their sum); "-" for an
    optimizer without zones (AdamW, AutoTrustGO)."""
    if not zones:
        return "-"
    parts = sorted(((v, k) for k, v in (zones or {}).items() if k != "neutral" and v), reverse=True)
    return ", ".join(f"{k} {v:.0%}" for v, k in parts[:2]) or "neutral 100%"


def lr_scale(row: dict) -> float:
    return float(row.get("lr_scale") or 1.0)


def at_preset_lr(row: dict) -> bool:
    return lr_scale(row) == 1.0


def group_runs(rows: list[dict]) -> dict:
    """{(optimizer, optimizer loss, LR multiple): {seed: row}}; a later folder's run of the same key replaces an
    earlier one."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["optimizer"], r["optimizer_loss"], lr_scale(r)), {})[r["seed"]] = r
    return groups


def mean_end(runs) -> float:
    return statistics.fmean(r["val_loss_end"] for r in runs)


def summarize(rows: list[dict]) -> list[dict]:
    rows = [r for r in rows if at_preset_lr(r)]
    out = []
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == opt]
        by = {(r["optimizer_loss"], r["seed"]): r for r in mine}
        seeds = sorted({r["seed"] for r in mine if r["optimizer_loss"] == "raw"})
        entry = {"optimizer": opt, "lr": mine[0]["lr"], "seeds": seeds, "variants": {}}
        for v in VARIANTS:
            runs = [by[(v, s)] for s in seeds if (v, s) in by]
            if not runs:
                continue
            gains = [r["val_loss_start"] - r["val_loss_end"] for r in runs]
            item = {"n": len(runs), "gain": statistics.fmean(gains),
                    "gain_spread": max(gains) - min(gains) if len(gains) > 1 else None,
                    "end": statistics.fmean(r["val_loss_end"] for r in runs),
                    "loss_cv": statistics.fmean(r["optimizer_loss_cv"] or 0.0 for r in runs),
                    "update_ratio": statistics.fmean(r["update_ratio"] or 0.0 for r in runs),
                    "zones": main_zone(runs[0]["zones"]), "stops": sorted({r["stop_reason"] for r in runs})}
            if v != "raw" and len(runs) == len(seeds):
                diffs = [by[(v, s)]["val_loss_end"] - by[("raw", s)]["val_loss_end"] for s in seeds]
                item["diff"] = statistics.fmean(diffs)
                item["verdict"] = verdict(diffs, [by[(v, s)].get("identical") for s in seeds])
            entry["variants"][v] = item
        out.append(entry)
    return out


def lr_control(rows: list[dict]) -> list[dict]:
    """Every (optimizer, variant, LR multiple) of the optimizers run away from their preset LR, each paired per
    seed against the raw-fed run at the preset LR."""
    groups = group_runs(rows)
    scaled = {opt for opt, _, scale in groups if scale != 1.0}
    out = []
    for (opt, mode, scale), by_seed in sorted(groups.items()):
        raw1 = groups.get((opt, "raw", 1.0), {})
        runs = [by_seed[s] for s in sorted(by_seed) if s in raw1]
        if opt not in scaled or not runs:
            continue
        item = {"optimizer": opt, "optimizer_loss": mode, "lr_scale": scale, "lr": runs[0]["lr"], "n": len(runs),
                "end": mean_end(runs), "update_ratio": statistics.fmean(r["update_ratio"] or 0.0 for r in runs),
                "stops": sorted({r["stop_reason"] for r in runs})}
        if not (mode == "raw" and scale == 1.0):
            diffs = [r["val_loss_end"] - raw1[r["seed"]]["val_loss_end"] for r in runs]
            item["diff"] = statistics.fmean(diffs)
            item["verdict"] = verdict(diffs, [r["lora_digest"] == raw1[r["seed"]]["lora_digest"] for r in runs])
        out.append(item)
    return out


def best_lr(rows: list[dict]) -> list[dict]:
    """Per optimizer with scaled runs: each variant at the LR multiple where its mean final validation loss is
    lowest, and every variant's best against raw fed at its best, paired per seed (the seeds both have). Only
    LRs with two or more seeds count; a variant run at one LR has no best and is left out."""
    groups = {key: by_seed for key, by_seed in group_runs(rows).items() if len(by_seed) > 1}
    out = []
    for opt in sorted({o for o, _, scale in groups if scale != 1.0}):
        best = {}  # mode -> (its best LR multiple, the multiples run)
        for mode in VARIANTS:
            scales = sorted(sc for o, m, sc in groups if (o, m) == (opt, mode))
            if len(scales) > 1:
                best[mode] = (min(scales, key=lambda sc: mean_end(groups[opt, mode, sc].values())), scales)
        if "raw" not in best:
            continue
        raw_scale = best["raw"][0]
        raw_runs = groups[opt, "raw", raw_scale]
        for mode, (scale, scales) in best.items():
            runs = groups[opt, mode, scale]
            item = {"optimizer": opt, "optimizer_loss": mode, "lr_scale": scale, "end": mean_end(runs.values()),
                    "scales_run": scales}
            if mode != "raw":
                seeds = sorted(set(runs) & set(raw_runs))
                diffs = [runs[sd]["val_loss_end"] - raw_runs[sd]["val_loss_end"] for sd in seeds]
                item.update(raw_scale=raw_scale, diff=statistics.fmean(diffs), verdict=verdict(diffs, []))
            out.append(item)
    return out


def best_table(items: list[dict]) -> str:
    lines = ["| optimizer | optimizer loss | LR multiples run | best | val loss end at the best | "
             "vs raw fed at its best |", "|---|---|---|---|---:|---|"]
    for e in items:
        vs = "-" if "verdict" not in e else f"{fmt_variant(e)} (raw at x{e['raw_scale']:g})"
        lines.append(f"| {e['optimizer']} | {e['optimizer_loss']} | {', '.join(f'x{sc:g}' for sc in e['scales_run'])} "
                     f"| x{e['lr_scale']:g} | {e['end']:.4f} | {vs} |")
    return "\n".join(lines)


def lr_table(items: list[dict]) -> str:
    lines = ["| optimizer | optimizer loss | LR (x preset) | seeds | val loss end | vs raw fed at the preset LR | "
             "update/weight ratio | stop |", "|---|---|---|---:|---:|---|---:|---|"]
    for e in items:
        lines.append(f"| {e['optimizer']} | {e['optimizer_loss']} | {e['lr']:g} (x{e['lr_scale']:g}) | {e['n']} | "
                     f"{e['end']:.4f} | {fmt_variant(e) if 'verdict' in e else '-'} | {e['update_ratio']:.1e} | "
                     f"{', '.join(e['stops'])} |")
    return "\n".join(lines)


def fmt_variant(item: dict | None) -> str:
    if item is None:
        return "not run"
    if "verdict" not in item:
        return "-"
    if item["verdict"] == "identical":
        return "identical"
    return f"{item['diff']:+.4f} ({item['verdict']})"


def table(summary: list[dict]) -> str:
    lines = ["| optimizer (lr) | seeds | val. gain, raw fed (seed spread) | normalized vs raw | withheld vs raw | "
             "zones: raw / normalized / withheld | update/weight ratio: raw / normalized / withheld | "
             "CV fed to the optimizer: raw / normalized |",
             "|---|---:|---|---|---|---|---|---|"]
    for e in summary:
        v = e["variants"]
        raw = v.get("raw")
        gain = "-" if raw is None else (f"{raw['gain']:.4f}" + (f" (±{raw['gain_spread'] / 2:.4f})"
                                                                  if raw["gain_spread"] is not None else ""))
        zones = " / ".join(v[k]["zones"] if k in v else "-" for k in VARIANTS)
        cv = " / ".join(f"{v[k]['loss_cv']:.2f}" if k in v else "-" for k in ("raw", "normalized"))
        ratio = " / ".join(f"{v[k]['update_ratio']:.1e}" if k in v else "-" for k in VARIANTS)
        lines.append(f"| {e['optimizer']} ({e['lr']:g}) | {len(e['seeds'])} | {gain} | "
                     f"{fmt_variant(v.get('normalized'))} | {fmt_variant(v.get('withheld'))} | {zones} | {ratio} | "
                     f"{cv} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="sweep folders (each with sweep.json)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--export", metavar="DIR", help="write each sweep's rows to DIR/<sweep folder name>.json")
    args = p.parse_args(argv)
    if args.export:
        for folder in args.folders:
            doc = json.loads((Path(folder) / "sweep.json").read_text())
            out = Path(args.export) / f"{Path(folder).resolve().name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({k: doc[k] for k in ("recommendation", "rows", "status")}, indent=0) + "\n")
        return 0
    rows = load_rows(args.folders)
    summary, control, best = summarize(rows), lr_control(rows), best_lr(rows)
    if args.json:
        print(json.dumps({"paired": summary, "lr_control": control, "best_lr": best}, indent=1))
    else:
        print(table(summary))
        if control:
            print("\nLR control:\n\n" + lr_table(control))
            print("\nEach at its best LR:\n\n" + best_table(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
