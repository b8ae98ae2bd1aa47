"""The Gradio app: run list, live charts, controls, samples and downloads, the optimizer sweeps (sweeps.py), and a
form to start runs and sweeps.

Everything a browser can ask for goes through PanelRoot: a run is a folder name under runs/, a file is served
only from inside the output folder, and only once the panel offers it (never a run's state or telemetry
database); the start form reads models and datasets only from the configured roots. A 1-second gr.Timer
refreshes the selected run; components whose content did not change are skipped, so an idle panel sends little
more than the status line.
"""

import html
import json
import os
import time

# Set before gradio is imported: no analytics, no version check, no telemetry of any kind.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("GRADIO_SSR_MODE", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from ...trainer import runstore  # noqa: E402
from ...trainer.config import OPTIMIZER_NAMES, ConfigError  # noqa: E402
from . import data, form, launcher, plots, sweeps  # noqa: E402
from .paths import PanelRoot, PathError, Roots  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CSS = """
#emolora-status .emo-row { display:flex; flex-wrap:wrap; gap:18px; align-items:baseline; font-size:14px; }
#emolora-status .emo-big { font-size:22px; font-weight:700; }
#emolora-status .emo-warn { color:#b91c1c; font-weight:600; }
.emolora-plot svg { width:100%; height:auto; border-radius:6px; }
/* Narrow (ComfyUI's sidebar, a phone): one column, every control the full width, labels on one line. */
@media (max-width: 560px) {
  .emolora-row { flex-direction: column !important; flex-wrap: nowrap !important; gap: 6px !important; }
  .emolora-row > * { width: 100% !important; min-width: 0 !important; flex: 1 1 auto !important; }
  #emolora-status .emo-row { gap: 4px 12px; font-size: 13px; }
  #emolora-status .emo-big { font-size: 18px; }
  #emolora-files { max-height: 140px; }
}
"""
# Gradio scopes CSS to its content, so the page gutter (32 px a side, a fifth of a sidebar) is styled from <head>.
HEAD = "<style>@media (max-width: 560px) { .gradio-container .main.fillable { padding: 4px 6px !important; } }</style>"


class PanelApp:
    """State shared by every browser session of one panel: the output folder, the run cache, the run list."""

    def __init__(self, folder, model_roots=(), data_roots=()):
        self.root = PanelRoot(folder)
        self.model_roots = Roots("model", "--model-root", model_roots)
        self.data_roots = Roots("dataset", "--data-root", data_roots)
        self.cache = data.RunCache()
        self._runs, self._runs_at = [], 0.0
        self._served: list = []  # Gradio's allowed_paths once launched: exactly the files offered
        self.sweep_view = sweeps.SweepView(self.root)

    def serve_with(self, demo) -> None:
        """Gradio's file route serves what is in demo.allowed_paths: from now on, the files this panel offers."""
        demo.allowed_paths.extend(p for p in self._served if p not in demo.allowed_paths)
        self._served = demo.allowed_paths

    def offer(self, paths) -> list:
        """Allow Gradio to serve these (already checked) files, one exact path each; return them as strings."""
        out = [str(p) for p in paths]
        self._served.extend(p for p in out if p not in self._served)
        return out

    # ---- runs ------------------------------------------------------------------------------------------------
    def runs(self, max_age: float = 1.5) -> list:
        if time.monotonic() - self._runs_at > max_age:
            self._runs = data.list_runs(self.root.runs_dir)
            self._runs_at = time.monotonic()
        return self._runs

    def run_data(self, name):
        if not name:
            return None
        try:
            return self.cache.get(self.root.run_dir(name))
        except PathError:
            return None

    @staticmethod
    def choice_label(r) -> str:
        return f"{r['name']}  [{r.get('status', '?')}, {r.get('optimizer', '?')}]"

    def pick_run(self, current, follow: bool) -> str | None:
        """Following: the newest running run, else the newest run (a short run can start and finish between two
        refreshes; it is still the one to show). Not following: the run picked."""
        runs = self.runs()
        names = [r["name"] for r in runs]
        if follow and names:
            running = [r["name"] for r in runs if r.get("status") == "running"]
            return running[0] if running else names[0]
        if current in names:
            return current
        return names[0] if names else None

    # ---- controls ----------------------------------------------------------------------------------------------
    def controller(self, name):
        return runstore.RunController(self.root.run_dir(name))

    def set_auto_stop(self, name, on: bool) -> str:
        try:
            self.controller(name).set_auto_stop("stop" if on else "mark")
        except PathError as e:
            return f"⚠ {e}"
        return (f"auto-stop **on** for `{name}`: the run stops (and saves) when should_stop rises" if on else
                f"auto-stop **off** for `{name}`: should_stop is only marked")

    def request_stop(self, name) -> str:
        rd = self.run_data(name)
        if rd is None:
            return "⚠ no run selected"
        if not rd.alive:
            return f"`{name}` is not running"
        self.controller(name).request_stop()
        return f"stop requested: `{name}` saves its LoRA and ends at the next step"

    def request_save(self, name) -> str:
        rd = self.run_data(name)
        if rd is None:
            return "⚠ no run selected"
        if not rd.alive:
            return f"`{name}` is not running"
        n = self.controller(name).request_save()
        return f"save #{n} requested: `{name}` writes its LoRA at the next step"

    def resume_run(self, name) -> tuple:
        """Continue the picked run (stopped, cancelled or interrupted, with a saved state) in a background
        `python -m trainer train --resume`; (message, follow)."""
        try:
            run_dir = self.root.run_dir(name)
        except PathError as e:
            return f"⚠ {e}", gr.skip()
        runs = {r["name"]: r for r in runstore.unfinished_runs(self.root.runs_dir)}
        if name not in runs:
            return f"`{name}` cannot be resumed: it is running, finished, failed or has no saved state", gr.skip()
        if launcher.poll().get(name, (0,))[0] is None:
            return f"`{name}` is already being resumed", gr.skip()
        world = self.run_data(name).meta.get("world_size") or 1
        launcher.start(self.root, launcher.resume_command(run_dir, int(world)), name)
        self._runs_at = 0.0  # list the runs afresh at the next refresh: this one is about to run
        r = runs[name]
        return (f"resuming `{name}` from step {r['step']} of {r['steps_total']} in the background "
                f"(log: panel-logs/{name}.log); the panel follows it", gr.update(value=True))

    # ---- files -----------------------------------------------------------------------------------------------
    def lora_files(self, rd) -> list:
        paths = rd.event_paths("save")
        if rd.meta.get("lora_path"):
            paths.append(rd.meta["lora_path"])
        return self.offer(self.root.files(paths, (".safetensors",)))

    def sample_files(self, rd, limit: int = 24) -> list:
        paths = rd.event_paths("sample")
        samples = rd.run_dir / "samples"
        if samples.is_dir():
            paths += sorted(str(p) for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return self.offer(self.root.files(paths, IMAGE_SUFFIXES)[-limit:])

    # ---- start a run -------------------------------------------------------------------------------------------
    FORM = ("model", "dataset", "optimizer", "preset", "steps", "lr", "args_text", "resolution", "rank", "name",
            "network", "dora", "rslora", "validation_split", "validation_data", "validation_every", "auto_stop_on",
            "mask")
    LAUNCH = ("gpus",)  # how the run is launched (after FORM's values; absent: 1)

    def start_run(self, *values) -> tuple:
        """The form's values (in FORM order) -> a background `python -m trainer train`; (message, follow)."""
        v = dict(zip(self.FORM + self.LAUNCH, values))
        gpus = int(v.pop("gpus", None) or 1)  # > 1: the same CLI under torchrun (trainer/launch.py)
        optimizer = v["optimizer"] or "EmoNavi"
        base = launcher.safe_run_name(v.pop("name"), f"{optimizer.lower()}-{time.strftime('%Y%m%d-%H%M%S')}")
        name = launcher.unique_name(self.root, base)
        try:
            presets, overrides = form.run_options(self.model_roots, self.data_roots, **v)
            cmd = launcher.build_command(self.root, presets, overrides, name, gpus=gpus)
        except (PathError, ConfigError, ValueError, TypeError) as e:
            return f"⚠ {e}", gr.skip()
        launcher.start(self.root, cmd, name)
        return (f"started `{name}` in the background (log: panel-logs/{name}.log); the panel follows it",
                gr.update(value=True))

    SWEEP_FORM = ("sweep_optimizers", "sweep_seeds", "sweep_loss_control", "sweep_optimizer_loss")

    def start_sweep(self, *values) -> tuple:
        """The form's values (FORM order, then SWEEP_FORM) -> a background `python -m trainer sweep` into
        sweeps/<name>; (message, the sweep view's state: follow the newest sweep)."""
        v = dict(zip(self.FORM + self.SWEEP_FORM, values))
        sweep = {k: v.pop(k) for k in self.SWEEP_FORM}
        base = launcher.safe_run_name(v.pop("name"), f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        name, n = base, 1
        while (self.root.root / sweeps.SWEEPS / name).exists():
            n += 1
            name = f"{base}-{n}"
        try:
            presets, overrides = form.run_options(self.model_roots, self.data_roots, **v)
            cmd = sweeps.build_command(self.root, presets, overrides, name,
                                       optimizers=sweep["sweep_optimizers"] or "",
                                       seeds=int(sweep["sweep_seeds"] or 1),
                                       loss_control=bool(sweep["sweep_loss_control"]),
                                       optimizer_loss=sweep["sweep_optimizer_loss"] or "raw")
        except (PathError, ConfigError, ValueError, TypeError) as e:
            return f"⚠ {e}", gr.skip()
        launcher.start(self.root, cmd, f"sweep-{name}")
        return (f"started sweep `{name}` in the background (log: panel-logs/sweep-{name}.log); the sweep view "
                f"follows it", {})

    # ---- the sweep view ----------------------------------------------------------------------------------------
    def sweep_tick(self, current, st):
        """The sweep list, and the chosen sweep's table and curves (sent only when something changed). Until the
        user picks one, the newest sweep is shown."""
        st = dict(st or {})
        names = sweeps.list_sweeps(self.root)
        name = current if st.get("picked") and current in names else (names[0] if names else None)
        out_choices = gr.update(choices=names, value=name) if (tuple(names), name) != st.get("choices") \
            else gr.skip()
        st["choices"] = (tuple(names), name)
        table, chart, version = self.sweep_view.render(name)
        if version is None or version != st.get("version"):
            st["version"] = version
            return out_choices, table, chart, st
        return out_choices, gr.skip(), gr.skip(), st

    def pick_sweep(self, current, st):
        return self.sweep_tick(current, {**(st or {}), "picked": True})

    SHOWN = ("steps", "resolution", "rank", "network", "dora", "rslora", "validation_split", "validation_every",
             "auto_stop_on", "mask", "lr", "args_text", "note")

    def form_defaults(self, preset, optimizer) -> list:
        """What the form shows (SHOWN order) for a preset and an optimizer: the values the run would get
        (real ones, not 'the preset's'), the optimizer's own arguments and what the preset sets."""
        optimizer = optimizer or "EmoNavi"
        cfg = form.defaults(preset, optimizer)
        values = {k: getattr(cfg, k, None) for k in self.SHOWN}
        values.update(args_text=json.dumps(form.optimizer_defaults(optimizer)), note=form.preset_summary(preset))
        return [values[k] for k in self.SHOWN]

    def form_choices(self) -> list:
        """The models and datasets found under the roots (fresh at every page load)."""
        models = self.model_roots.scan(lambda p: p.suffix.lower() == ".safetensors" and p.is_file()
                                       or p.is_dir() and (p / "model_index.json").is_file())
        folders = self.data_roots.scan(lambda p: p.is_dir(), depth=1)
        return [gr.update(choices=models), gr.update(choices=folders), gr.update(choices=folders)]

    def launcher_note(self, name) -> str:
        procs = launcher.poll()
        if name in procs and procs[name][0] not in (None, 0):
            tail = html.escape(launcher.log_tail(self.root, name))
            return f"<div class='emo-warn'>the trainer exited with code {procs[name][0]}</div><pre>{tail}</pre>"
        return ""

    # ---- the status line -------------------------------------------------------------------------------------
    def status_html(self, rd) -> str:
        if rd is None:
            pending = [n for n, (rc, _) in launcher.poll().items() if rc is None]
            msg = f"starting {', '.join(pending)} …" if pending else f"no runs yet in {self.root.runs_dir}"
            return (f"<div class='emo-row'><span>{html.escape(msg)}</span>"
                    f"<span id='emolora-step' data-step='0'>step 0</span></div>")
        s = rd.status()
        e = html.escape
        total = s["steps_total"] or "?"
        mem = f"{s['mem_mb']:.0f} MiB (peak {s['mem_peak_mb'] or 0:.0f})" if s["mem_mb"] else "–"
        sps = f"{s['steps_per_s']:.2f}" if s["steps_per_s"] else "–"
        loss = f"{s['loss']:.4f}" if isinstance(s["loss"], (int, float)) else "–"
        rises = s["should_stop_rises"]
        rise = (f"<span class='emo-warn' id='emolora-rise' data-step='{rises[0][0]}'>should_stop rose at step "
                f"{', '.join(str(r[0]) for r in rises)}</span>" if rises else "<span>should_stop: not yet</span>")
        reason = s["stop_reason"]
        status = s["status"] + (f" ({reason})" if reason and reason != s["status"] else "")
        parts = [
            f"<span class='emo-big'><span id='emolora-step' data-step='{s['step']}'>step {s['step']}</span>"
            f" / {total}</span>",
            f"<span><b>{e(s['name'])}</b> · {e(str(s['optimizer']))} · "
            f"<span id='emolora-run-status' data-status='{e(s['status'])}' data-stop-reason='{e(str(reason or ''))}'>"
            f"{e(status)}</span></span>",
            f"<span>loss {loss}</span>", f"<span>{sps} steps/s</span>",
            f"<span>ETA {data.fmt_duration(s['eta_s'])}</span>", f"<span>memory {mem}</span>",
            f"<span>auto-stop: <b id='emolora-auto' data-mode='{e(s['auto_stop'])}'>{e(s['auto_stop'])}</b></span>",
            rise]
        extra = ""
        if s["error"]:
            extra += f"<div class='emo-warn' id='emolora-stop-message'>{e(str(s['error']))}</div>"
        if s["barely_moving"]:
            extra += f"<div class='emo-warn' id='emolora-barely-moving'>{e(s['barely_moving'])}</div>"
        if s["lora_path"] and not self.root.files([s["lora_path"]]):
            extra += (f"<div>LoRA: {e(str(s['lora_path']))} (outside the output folder {e(str(self.root.root))}: "
                      "not offered for download)</div>")
        return f"<div class='emo-row'>{''.join(parts)}</div>{extra}{self.launcher_note(s['name'])}"

    # ---- the 1-second refresh --------------------------------------------------------------------------------
    def tick(self, run, compare, follow, more, st):
        st = dict(st or {})
        name = self.pick_run(run, follow)
        runs = self.runs()
        choices = [(self.choice_label(r), r["name"]) for r in runs]
        out = {}
        key = tuple(choices)
        if key != st.get("choices") or name != run:
            out["run"] = gr.update(choices=choices, value=name)
            st["choices"] = key
        else:
            out["run"] = gr.skip()
        cmp_choices = [("(none)", "")] + [c for c in choices if c[1] != name]
        compare = compare if compare in [c[1] for c in cmp_choices] else ""
        ckey = (tuple(cmp_choices), compare)
        out["compare"] = gr.update(choices=cmp_choices, value=compare) if ckey != st.get("cmp") else gr.skip()
        st["cmp"] = ckey
        rd = self.run_data(name)
        other = self.run_data(compare) if compare else None
        out["status"] = self.status_html(rd)
        if rd is None:
            for k in plots.CHART_KEYS:
                out[k] = gr.update(value="", visible=k == "loss")
            out.update(auto=gr.skip(), more_sel=gr.skip(), gallery=gr.skip(), files=gr.skip())
            out.update(self._controls(False, st))
            return [*self._ordered(out), st]
        # charts: redrawn only when the run (or the compared one, or the choice of signals) changed
        more_choices = plots.more_choices(rd)
        if st.get("more_run") != name or (st.get("more_pending") and not more and more_choices):
            # a new run: its default extra signals (again once its first records arrived)
            more = plots.default_more(rd)
            st["more_run"], st["more_pending"] = name, not more_choices
            out["more_sel"] = gr.update(choices=more_choices, value=more)
        elif tuple(more_choices) != st.get("more_choices"):
            out["more_sel"] = gr.update(choices=more_choices, value=[m for m in (more or []) if m in more_choices])
        else:
            out["more_sel"] = gr.skip()
        st["more_choices"] = tuple(more_choices)
        version = (name, rd.version, compare, other.version if other else None, tuple(more or ()))
        if version != st.get("charts"):
            charts = plots.charts(rd, other, more)
            for k in plots.CHART_KEYS:
                out[k] = gr.update(value=plots.svg(charts[k]), visible=charts[k] is not None)
            st["charts"] = version
        else:
            for k in plots.CHART_KEYS:
                out[k] = gr.skip()
        # the auto-stop box follows the run's control file (set when the run or the mode changes)
        mode = rd.status()["auto_stop"]
        if (name, mode) != st.get("auto"):
            out["auto"] = gr.update(value=mode == "stop")
            st["auto"] = (name, mode)
        else:
            out["auto"] = gr.skip()
        samples = self.sample_files(rd)
        out["gallery"] = gr.update(value=samples or None, visible=bool(samples)) if (name, tuple(samples)) != st.get(
            "samples") else gr.skip()
        st["samples"] = (name, tuple(samples))
        files = self.lora_files(rd)
        out["files"] = gr.update(value=files or None) if (name, tuple(files)) != st.get("files") else gr.skip()
        st["files"] = (name, tuple(files))
        resumable = any(r["name"] == name and r.get("resume") for r in runs)
        out.update(self._controls(rd.status()["status"] == "running", st, resumable))
        return [*self._ordered(out), st]

    @staticmethod
    def _controls(running: bool, st: dict, resumable: bool = False) -> dict:
        """Stop and Save now act on a running trainer only, Resume on a run that can continue (sent when it
        changes)."""
        if st.get("running") == (running, resumable):
            return {"stop_btn": gr.skip(), "save_btn": gr.skip(), "resume_btn": gr.skip()}
        st["running"] = (running, resumable)
        return {"stop_btn": gr.update(interactive=running), "save_btn": gr.update(interactive=running),
                "resume_btn": gr.update(interactive=resumable and not running)}

    def pick(self, run, compare, follow, more, st):
        """The user picked a run: stop following the newest one and show the pick."""
        return [False, *self.tick(run, compare, False, more, st)]

    def open_page(self, run, compare, follow, more, st, request: gr.Request):
        """A page load: `?run=NAME` (the ComfyUI sidebar's link to the run its graph trains) shows that run,
        pinned; a name that is not a run yet (or not at all) is ignored and the panel follows the newest one."""
        name = request.query_params.get("run") if request is not None else None
        try:
            self.root.run_dir(name)
        except PathError:
            return [follow, *self.tick(run, compare, follow, more, st)]
        return self.pick(name, compare, False, more, st)

    ORDER = ("run", "compare", "status", *plots.CHART_KEYS, "auto", "more_sel", "gallery", "files", "stop_btn",
             "save_btn", "resume_btn")

    def _ordered(self, out: dict) -> list:
        return [out[k] for k in self.ORDER]

    # ---- the page ----------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="EmoLoRA panel", analytics_enabled=False, delete_cache=(600, 1800)) as demo:
            st = gr.State({})
            gr.Markdown(f"### EmoLoRA training panel\nOutput folder: `{self.root.root}`")
            with gr.Row(elem_classes="emolora-row"):
                run = gr.Dropdown(label="Run", choices=[], value=None, scale=3, elem_id="emolora-run")
                follow = gr.Checkbox(label="Follow the newest run", value=True, scale=1,
                                     elem_id="emolora-follow")
                compare = gr.Dropdown(label="Overlay another run", choices=[("(none)", "")], value="", scale=2,
                                      elem_id="emolora-compare")
            status = gr.HTML(elem_id="emolora-status")
            with gr.Row(elem_classes="emolora-row"):
                auto = gr.Checkbox(label="Auto-stop when should_stop rises", value=True, elem_id="emolora-autostop")
                stop_btn = gr.Button("Stop (save and end)", variant="stop", elem_id="emolora-stop", interactive=False)
                save_btn = gr.Button("Save now", elem_id="emolora-save", interactive=False)
                resume_btn = gr.Button("Resume", elem_id="emolora-resume", interactive=False)
            action = gr.Markdown(elem_id="emolora-action")
            chart = {}
            with gr.Row(elem_classes="emolora-row"):
                chart["loss"] = gr.HTML(elem_id="emolora-chart-loss", elem_classes="emolora-plot")
                chart["emo"] = gr.HTML(elem_id="emolora-chart-emo", elem_classes="emolora-plot", visible=False)
            with gr.Row(elem_classes="emolora-row"):
                chart["lr"] = gr.HTML(elem_id="emolora-chart-lr", elem_classes="emolora-plot", visible=False)
                chart["shadow"] = gr.HTML(elem_id="emolora-chart-shadow", elem_classes="emolora-plot", visible=False)
            with gr.Row(elem_classes="emolora-row"):
                chart["trust"] = gr.HTML(elem_id="emolora-chart-trust", elem_classes="emolora-plot", visible=False)
                chart["more"] = gr.HTML(elem_id="emolora-chart-more", elem_classes="emolora-plot", visible=False)
            with gr.Row():
                chart["motion"] = gr.HTML(elem_id="emolora-chart-motion", elem_classes="emolora-plot", visible=False)
            more_sel = gr.Dropdown(label="More signals", choices=[], value=[], multiselect=True,
                                   elem_id="emolora-more")
            with gr.Row(elem_classes="emolora-row"):
                gallery = gr.Gallery(label="Samples", visible=False, columns=[2, 3, 4, 4, 4, 4], height=260,
                                     elem_id="emolora-samples")  # 2 a row when narrow
                files = gr.File(label="LoRA files", file_count="multiple", interactive=False, elem_id="emolora-files")
            sweep = self._sweep_view()
            f = self._start_form()
            timer = gr.Timer(1.0)

            outputs = [run, compare, status, *[chart[k] for k in plots.CHART_KEYS], auto, more_sel, gallery, files,
                       stop_btn, save_btn, resume_btn, st]
            inputs = [run, compare, follow, more_sel, st]
            timer.tick(self.tick, inputs, outputs, show_progress="hidden", queue=True, concurrency_limit=4)
            demo.load(self.open_page, inputs, [follow, *outputs], show_progress="hidden")
            for comp in (compare, more_sel):
                comp.input(self.tick, inputs, outputs, show_progress="hidden")
            run.input(self.pick, inputs, [follow, *outputs], show_progress="hidden")
            auto.input(self.set_auto_stop, [run, auto], action, show_progress="hidden")
            stop_btn.click(self.request_stop, run, action, show_progress="hidden")
            save_btn.click(self.request_save, run, action, show_progress="hidden")
            resume_btn.click(self.resume_run, run, [action, follow], show_progress="hidden")
            f["start"].click(self.start_run, [f[k] for k in self.FORM + self.LAUNCH], [f["message"], follow])
            sweep_out = [sweep["name"], sweep["table"], sweep["chart"], sweep["state"]]
            timer.tick(self.sweep_tick, [sweep["name"], sweep["state"]], sweep_out, show_progress="hidden",
                       queue=True, concurrency_limit=4)
            demo.load(self.sweep_tick, [sweep["name"], sweep["state"]], sweep_out, show_progress="hidden")
            sweep["name"].input(self.pick_sweep, [sweep["name"], sweep["state"]], sweep_out, show_progress="hidden")
            f["start_sweep"].click(self.start_sweep, [f[k] for k in self.FORM + self.SWEEP_FORM],
                                   [f["message"], sweep["state"]])
            for chooser in (f["preset"], f["optimizer"]):
                chooser.input(self.form_defaults, [f["preset"], f["optimizer"]], [f[k] for k in self.SHOWN])
            demo.load(self.form_choices, None, [f["model"], f["dataset"], f["validation_data"]])
        return demo

    @staticmethod
    def _sweep_view() -> dict:
        """The optimizer sweeps: which one, its progress, recommendation and table, its validation curves."""
        v = {"state": gr.State({})}
        with gr.Accordion("Optimizer sweeps", open=True, elem_id="emolora-sweeps"):
            v["name"] = gr.Dropdown(label="Sweep (sweeps/ in the output folder)", choices=[], value=None,
                                    elem_id="emolora-sweep")
            v["table"] = gr.HTML(elem_id="emolora-sweep-table")
            v["chart"] = gr.HTML(elem_id="emolora-sweep-chart", elem_classes="emolora-plot")
        return v

    def _start_form(self) -> dict:
        """The 'Start a run' form: its components by name (FORM order, plus note, start and message)."""
        values = dict(zip(self.SHOWN, self.form_defaults(form.NONE, "EmoNavi")))
        presets = [form.NONE] + [p["name"] for p in form.training_presets()]
        f = {}
        with gr.Accordion("Start a run", open=False, elem_id="emolora-start-form"):
            with gr.Row(elem_classes="emolora-row"):
                f["model"] = gr.Dropdown(label=f"SDXL model (.safetensors or diffusers folder) in {self.model_roots}",
                                         choices=[], value=None, allow_custom_value=True, scale=3,
                                         elem_id="emolora-f-model")
                f["dataset"] = gr.Dropdown(label=f"Dataset folder in {self.data_roots}", choices=[], value=None,
                                           allow_custom_value=True, scale=3, elem_id="emolora-f-dataset")
            with gr.Row(elem_classes="emolora-row"):
                f["preset"] = gr.Dropdown(label="Training preset", choices=presets, value=form.NONE,
                                          elem_id="emolora-f-preset")
                f["steps"] = gr.Number(label="Steps", value=values["steps"], precision=0, minimum=1,
                                       elem_id="emolora-f-steps")
                f["resolution"] = gr.Number(label="Resolution", value=values["resolution"], precision=0, minimum=32,
                                            step=32, elem_id="emolora-f-resolution")
                f["rank"] = gr.Number(label="Rank", value=values["rank"], precision=0, minimum=1,
                                      elem_id="emolora-f-rank")
                f["name"] = gr.Textbox(label="Run name (optional)", elem_id="emolora-f-name")
            f["note"] = gr.Markdown(values["note"], elem_id="emolora-f-preset-note")
            with gr.Row(elem_classes="emolora-row"):
                f["optimizer"] = gr.Dropdown(label="Optimizer", choices=list(OPTIMIZER_NAMES), value="EmoNavi",
                                             elem_id="emolora-f-optimizer")
                f["lr"] = gr.Number(label="Learning rate (the EmoSens line: emoScope)", value=values["lr"],
                                    minimum=0, elem_id="emolora-f-lr")
                f["args_text"] = gr.Textbox(label="Optimizer arguments (JSON: its defaults; change any)",
                                            value=values["args_text"], lines=2, scale=3, elem_id="emolora-f-args")
            with gr.Row(elem_classes="emolora-row"):
                f["network"] = gr.Dropdown(label="Network", choices=list(form.NETWORK_TYPES),
                                           value=values["network"], elem_id="emolora-f-network")
                f["dora"] = gr.Checkbox(label="DoRA", value=values["dora"], elem_id="emolora-f-dora")
                f["rslora"] = gr.Checkbox(label="rsLoRA", value=values["rslora"], elem_id="emolora-f-rslora")
                f["mask"] = gr.Dropdown(label="Masked loss", choices=list(form.MASKS), value=values["mask"],
                                        elem_id="emolora-f-mask")
            with gr.Row(elem_classes="emolora-row"):
                f["validation_split"] = gr.Number(label="Validation split (0: none)", value=values["validation_split"],
                                                  minimum=0,
                                                  maximum=0.9, step=0.05, elem_id="emolora-f-vsplit")
                f["validation_data"] = gr.Dropdown(label="Validation folder (optional)", choices=[], value=None,
                                                   allow_custom_value=True, elem_id="emolora-f-vdata")
                f["validation_every"] = gr.Number(label="Validation loss every N steps",
                                                  value=values["validation_every"], precision=0, minimum=0,
                                                  elem_id="emolora-f-vevery")
                f["auto_stop_on"] = gr.Dropdown(label="Auto-stop acts on", choices=list(form.AUTO_STOP_ON),
                                                value=values["auto_stop_on"], elem_id="emolora-f-auto-stop-on")
            f["gpus"] = gr.Number(label="GPUs (processes under torchrun; global batch = batch x GPUs)", value=1,
                                  precision=0, minimum=1, elem_id="emolora-f-gpus")
            f["start"] = gr.Button("Start training", variant="primary", elem_id="emolora-start")
            gr.Markdown("**Or compare optimizers on these settings** (an optimizer sweep: each optimizer at its own "
                        "preset LR, ranked by the held-out validation loss; without a validation split or folder, "
                        "20% of the images are held out)")
            with gr.Row():
                f["sweep_optimizers"] = gr.Textbox(label="Optimizers (comma list, 'all' or 'emo')",
                                                   value="EmoNavi,EmoSens,AdamW", scale=3,
                                                   elem_id="emolora-f-sweep-optimizers")
                f["sweep_seeds"] = gr.Number(label="Seeds", value=1, precision=0, minimum=1,
                                             elem_id="emolora-f-sweep-seeds")
                f["sweep_loss_control"] = gr.Checkbox(label="Loss control (also run each loss-reading optimizer "
                                                            "without the loss)", value=False,
                                                      elem_id="emolora-f-sweep-loss-control")
                f["sweep_optimizer_loss"] = gr.Dropdown(label="Loss fed", choices=["raw", "normalized", "both"],
                                                        value="raw", elem_id="emolora-f-sweep-optimizer-loss")
            f["start_sweep"] = gr.Button("Start sweep", elem_id="emolora-start-sweep")
            f["message"] = gr.Markdown(elem_id="emolora-start-message")
        return f


def theme():
    """Gradio's default look with system fonts only: nothing is fetched from a font CDN."""
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=fonts, font_mono=["ui-monospace", "Consolas", "monospace"])

