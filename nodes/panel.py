"""EmoLoRA Panel: start the Gradio panel (web/panel) once per process on 127.0.0.1 and show its URL.

Gradio is optional: without it this node is not registered (the log says why) and the /emolora/panel route
answers with the reason."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import threading

from comfy_api.latest import io, ui

from ._common import CATEGORY, PREFIX, EmoLoRAError

log = logging.getLogger("emolora.nodes")

# Names the panel module may give its "launch once per process" function (adapter: the panel is being written
# in parallel; the first one found is used).
LAUNCH_NAMES = ("launch", "launch_once", "ensure_panel", "start_panel")
_lock = threading.Lock()
_url: str | None = None


def unavailable_reason() -> str | None:
    """Why the panel cannot run here, or None."""
    if importlib.util.find_spec("gradio") is None:
        return "the optional dependency 'gradio' is not installed (pip install gradio)"
    return None


def _panel_module():
    pkg = __package__.rsplit(".", 1)[0]  # <pack>.nodes -> <pack>
    return importlib.import_module(f"{pkg}.web.panel")


def _launcher():
    mod = _panel_module()
    for name in LAUNCH_NAMES:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise EmoLoRAError("EmoLoRA Panel: web/panel has no launch function (looked for " + ", ".join(LAUNCH_NAMES)
                       + ")")


def default_runs_dir() -> str:
    """Where the Trainer node writes its run folders: <ComfyUI output>/emolora/runs."""
    try:
        import folder_paths

        root = folder_paths.get_output_directory()
    except Exception:
        root = os.path.abspath("output")
    path = os.path.join(root, "emolora", "runs")
    os.makedirs(path, exist_ok=True)
    return path


def current_url() -> str | None:
    return _url


def ensure_panel() -> str:
    """Start the panel once per process; return its URL (http://127.0.0.1:PORT/)."""
    global _url
    with _lock:
        if _url:
            return _url
        reason = unavailable_reason()
        if reason:
            raise EmoLoRAError(f"EmoLoRA Panel is unavailable: {reason}")
        fn = _launcher()
        params = inspect.signature(fn).parameters
        kwargs = {}
        for key in ("runs_dir", "root"):
            if key in params:
                kwargs[key] = default_runs_dir()
                break
        if "host" in params:
            kwargs["host"] = "127.0.0.1"
        res = fn(**kwargs)
        if isinstance(res, str):
            url = res
        elif isinstance(res, dict):
            url = res.get("url")
        else:
            url = getattr(res, "url", None)
        if not url:
            raise EmoLoRAError(f"EmoLoRA Panel: the panel launcher returned no URL ({res!r})")
        _url = url
        log.info("EmoLoRA panel at %s", url)
        return url


class EmoLoRAPanel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Panel",
            display_name="EmoLoRA Panel",
            category=CATEGORY,
            description="Start the EmoLoRA Gradio panel (once per process, 127.0.0.1 only) and show its URL.",
            inputs=[],
            outputs=[io.String.Output("url", display_name="url")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        url = ensure_panel()
        return io.NodeOutput(url, ui=ui.PreviewText(f"EmoLoRA panel: {url}"))
