"""EmoLoRA Panel: start the Gradio panel (web/panel) once per process on 127.0.0.1 and show its URL.

Gradio is optional: without it this node is not registered (the log says why) and the /emolora/panel route
answers with the reason. The panel's start form takes models from ComfyUI's checkpoints (and diffusers) folders
and datasets from its input folder."""

from __future__ import annotations

import importlib.util
import logging
import os

from comfy_api.latest import io, ui

from ._common import CATEGORY, PREFIX, EmoLoRAError

log = logging.getLogger("emolora.nodes")


def unavailable_reason() -> str | None:
    """Why the panel cannot run here, or None."""
    if importlib.util.find_spec("gradio") is None:
        return "the optional dependency 'gradio' is not installed (pip install gradio)"
    return None


def _comfy_folders() -> tuple[str, list, list]:
    """(output root, model roots, data roots) from ComfyUI's folder_paths (the current folder outside ComfyUI)."""
    try:
        import folder_paths

        models = [p for kind in ("checkpoints", "diffusers") for p in folder_paths.get_folder_paths(kind)]
        return folder_paths.get_output_directory(), models, [folder_paths.get_input_directory()]
    except Exception:  # noqa: BLE001 - not inside ComfyUI
        here = os.path.abspath(".")
        return os.path.join(here, "output"), [here], [here]


def default_runs_dir() -> str:
    """Where the Trainer node writes its run folders: <ComfyUI output>/emolora/runs."""
    path = os.path.join(_comfy_folders()[0], "emolora", "runs")
    os.makedirs(path, exist_ok=True)
    return path


def default_output_dir() -> str:
    """The panel's output folder inside ComfyUI: <ComfyUI output>/emolora, holding the Trainer node's runs/ and the
    Optimizer Sweep node's sweeps/ (the panel shows both)."""
    default_runs_dir()
    return os.path.join(_comfy_folders()[0], "emolora")


def current_url() -> str | None:
    from ..web import panel

    return panel.url()


def ensure_panel() -> str:
    """Start the panel once per process (web.panel.launch keeps it); return its URL (http://127.0.0.1:PORT/)."""
    reason = unavailable_reason()
    if reason:
        raise EmoLoRAError(f"EmoLoRA Panel is unavailable: {reason}")
    from ..web import panel

    if panel.url():
        return panel.url()
    _, models, datasets = _comfy_folders()
    options = dict(host="127.0.0.1", model_roots=models, data_roots=datasets)
    try:
        url = panel.launch(default_output_dir(), port=panel.DEFAULT_PORT, **options)
    except OSError:  # 7861 is taken (another ComfyUI, a CLI panel): Gradio picks a free port from 7860 up
        url = panel.launch(default_output_dir(), port=None, **options)
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
