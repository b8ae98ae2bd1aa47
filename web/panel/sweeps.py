"""The panel's sweep view, without Gradio: the optimizer sweeps under the output folder, each one's table and
overlaid validation curves (live while it runs), and the command that starts a sweep from the start form.

A sweep is a folder holding sweep.json (`python -m trainer sweep --output DIR`, the ComfyUI sweep node, or this
panel): <output folder>/sweeps/<name>/, or the output folder itself. Its rows come from sweep.json (rewritten
after every run); its curves from each run folder's telemetry (<sweep>/runs/<run>/), read incrementally, so the
run in progress draws as it goes.
"""

import html
import math
from pathlib import Path

from ...trainer.config import ConfigError
from . import data
from .paths import SAFE_NAME, PathError
from .svgplot import PALETTE, Chart, Series, render

SWEEPS = "sweeps"
SWEEP_FILE = "sweep.json"
HERE = "."  # the output folder itself is a sweep folder
DASH = {"raw": None, "normalized": "2 3", "withheld": "7 4"}  # as sweep.png draws them
COLUMNS = (("optimizer", "optimizer"), ("lr", "lr"), ("optimizer_loss", "optimizer loss"), ("seed", "seed"),
           ("val_loss_end", "val loss end"), ("val_loss_min", "val loss min"), ("val_loss_min_step", "at step"),
           ("train_loss_end", "train loss end"), ("loss_cv", "loss CV"), ("update_ratio", "update ratio"),
           ("zones", "zones"), ("stop_reason", "stop"), ("steps_per_s", "steps/s"))


def list_sweeps(root) -> list:
    """Names of the sweep folders: '.' when the output folder is one, then sweeps/<name>, newest first."""
    out = [HERE] if (root.root / SWEEP_FILE).is_file() else []
    folder = root.root / SWEEPS
    if folder.is_dir():
        found = [d for d in folder.iterdir() if SAFE_NAME.match(d.name) and (d / SWEEP_FILE).is_file()]
        out += [d.name for d in sorted(found, key=lambda d: (d / SWEEP_FILE).stat().st_mtime, reverse=True)]
    return out


def sweep_dir(root, name) -> Path:
    """The folder of sweep `name` (a folder name under sweeps/, or '.'), inside the output folder."""
    if name == HERE:
        path = root.root
    elif isinstance(name, str) and SAFE_NAME.match(name):
        path = root.inside(root.root / SWEEPS / name)
        if path.parent != (root.root / SWEEPS).resolve():
            raise PathError(f"not a sweep name: {name!r}")
    else:
        raise PathError(f"not a sweep name: {name!r}")
    if not (path / SWEEP_FILE).is_file():
        raise PathError(f"no sweep named {name!r} in {root.root / SWEEPS}")
    return path


def load(folder) -> dict | None:
    """sweep.json, or None while it cannot be read."""
    from ...trainer.sweep import load_sweep

    try:
        return load_sweep(folder)
    except ConfigError:
        return None


def _fmt(v, key: str) -> str:
    if v is None:
        return "–"
    if key == "zones":
        return ", ".join(f"{z} {share:.0%}" for z, share in v.items()) if v else "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if key.startswith(("val_", "train_")) else f"{v:.3g}"
    return str(v)


def table_html(doc: dict) -> str:
    """Status line, recommendation and one row per finished run (sweep.json's rows)."""
    e = html.escape
    rows, plan = doc.get("rows") or [], doc.get("plan") or {}
    total = len(plan.get("runs") or []) or len(rows)
    status = doc.get("status") or "?"
    head = (f"<div class='emo-row'><span class='emo-big' id='emolora-sweep-progress' data-done='{len(rows)}' "
            f"data-total='{total}' data-status='{e(status)}'>{len(rows)} / {total} runs</span>"
            f"<span>{e(status)}</span><span>{e(str(plan.get('steps', '?')))} steps each</span></div>")
    if doc.get("recommendation"):
        head += f"<div id='emolora-sweep-recommendation'><b>{e(doc['recommendation'])}</b></div>"
    for note in plan.get("notes") or []:
        head += f"<div>{e(note)}</div>"
    cells = "".join(f"<th>{e(label)}</th>" for _, label in COLUMNS)
    body = []
    for r in rows:
        mode = r.get("optimizer_loss")
        tds = "".join(f"<td>{e(_fmt(r.get(k), k))}</td>" for k, _ in COLUMNS)
        if r.get("identical"):
            tds += "<td>identical to raw</td>"
        else:
            tds += "<td></td>"
        body.append(f"<tr data-optimizer='{e(str(r.get('optimizer')))}' data-mode='{e(str(mode))}'>{tds}</tr>")
    table = (f"<table id='emolora-sweep-rows' data-rows='{len(rows)}'><thead><tr>{cells}<th></th></tr></thead>"
             f"<tbody>{''.join(body)}</tbody></table>")
    return head + table


def _run_dirs(folder: Path) -> list:
    runs = folder / "runs"
    if not runs.is_dir():
        return []
    from ...trainer.runstore import DB_NAME

    return sorted(d for d in runs.iterdir() if (d / DB_NAME).is_file())


def curves_chart(folder: Path, cache) -> Chart:
    """Every run's validation loss (finished ones and the one in progress), one colour per optimizer, dashed for
    the loss withheld, dotted for the normalized loss."""
    chart = Chart("validation loss (held-out images, fixed noise and timesteps)", key="sweep",
                  note="no validation loss yet")
    colors: dict = {}
    for run_dir in _run_dirs(folder):
        rd = cache.get(run_dir)
        cfg = rd.config or {}
        optimizer = cfg.get("optimizer") or rd.meta.get("optimizer") or "?"
        mode = cfg.get("optimizer_loss") or "raw"
        color = colors.setdefault(optimizer, PALETTE[len(colors) % len(PALETTE)])
        xs, ys = rd.series("val_loss")
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        first = not any(s.name == optimizer for s in chart.series)
        chart.series.append(Series(optimizer if first and mode != "withheld" else "", [p[0] for p in pts],
                                   [p[1] for p in pts], color, 1.8, dash=DASH.get(mode)))
    return chart


def chart_svg(folder: Path, cache) -> str:
    return render(curves_chart(folder, cache), width=760, height=300)


def version(folder: Path, cache) -> tuple:
    """Changes whenever the sweep's rows or any of its runs' telemetry changed (the view redraws only then)."""
    try:
        stamp = (folder / SWEEP_FILE).stat().st_mtime_ns
    except OSError:
        stamp = None
    return (str(folder), stamp, tuple((d.name, cache.get(d).version) for d in _run_dirs(folder)))


class SweepView:
    """The sweep view's state over a panel's output folder: its own run cache (a sweep has many runs)."""

    def __init__(self, root):
        self.root = root
        self.cache = data.RunCache(size=64)

    def render(self, name) -> tuple:
        """(html of the status and table, svg of the curves, version) of sweep `name`; empties when none."""
        try:
            folder = sweep_dir(self.root, name)
        except PathError:
            return "<div>no sweep selected</div>", "", None
        doc = load(folder)
        if doc is None:
            return f"<div>reading {html.escape(str(folder))} …</div>", "", None
        return table_html(doc), chart_svg(folder, self.cache), version(folder, self.cache)


# ---- starting a sweep from the start form --------------------------------------------------------------------
def build_command(root, presets: list, overrides: dict, name: str, *, optimizers: str, seeds: int,
                  loss_control: bool, optimizer_loss: str) -> list:
    """`python -m trainer sweep` for a sweep folder <root>/sweeps/<name>, checked first as the CLI checks it
    (unknown optimizers, seeds < 1, a held-out set that is empty, ...: a ConfigError for the form)."""
    import json

    from ...trainer.config import build_config
    from ...trainer.launch import launch_command
    from ...trainer.sweep import plan_sweep
    from .launcher import FLAGS

    out = root.root / SWEEPS / name
    modes = ["raw", "normalized"] if optimizer_loss == "both" else [optimizer_loss or "raw"]
    per_run = ("optimizer", "lr", "optimizer_args")  # each optimizer runs at its own preset
    overrides = {k: v for k, v in overrides.items() if k not in per_run}
    base = build_config(presets=presets, overrides={**overrides, "output": str(out / "loras" / "sweep.safetensors")})
    plan_sweep(base, optimizers, seeds=int(seeds), loss_control=bool(loss_control), optimizer_loss_modes=modes,
               steps=int(overrides.get("steps") or base.steps), output_dir=out, explicit=overrides)
    args = ["sweep", "--no-progress", "--output", str(out), "--optimizers", optimizers, "--seeds", str(int(seeds)),
            "--optimizer-loss", ",".join(modes)]
    if loss_control:
        args.append("--loss-control")
    for p in presets:
        args += ["--preset", p]
    for k, v in overrides.items():
        args += [FLAGS[k], str(v)] if k in FLAGS else ["--set", f"{k}={json.dumps(v)}"]
    return launch_command(args, 1)
