"""The EmoLoRA ComfyUI nodes (V3 schema). Every node module is imported on its own: one whose optional
dependency is missing is left out with a log line that names it and says why, and ComfyUI starts anyway."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("emolora")

# (module, class, optional-dependency check in that module or None)
NODE_MODULES = (
    ("optimizer", "EmoLoRAOptimizer", None),
    ("dataset", "EmoLoRADataset", None),
    ("trainer_node", "EmoLoRATrainer", None),
    ("training_options", "EmoLoRATrainingOptions", None),
    ("sweep_node", "EmoLoRASweep", None),
    ("trainer_legacy", "EmoLoRATrainerLegacy", None),
    ("lora_loader", "EmoLoRALoadTrainedLoRA", None),
    ("telemetry_node", "EmoLoRATelemetryPlot", None),
    ("panel", "EmoLoRAPanel", "unavailable_reason"),
)

UNAVAILABLE: dict[str, str] = {}
_DEFAULTS: dict | None = None  # the /emolora/defaults answer (presets are read once per server)


def load_nodes() -> list:
    nodes = []
    for module, cls_name, check in NODE_MODULES:
        try:
            mod = importlib.import_module(f".{module}", __package__)
            reason = getattr(mod, check)() if check else None
            if reason:
                raise ImportError(reason)
            cls = getattr(mod, cls_name)
            cls.GET_SCHEMA()  # a schema error drops this node only, not the whole pack
            nodes.append(cls)
        except Exception as e:  # noqa: BLE001 - one broken node must not take ComfyUI down
            UNAVAILABLE[cls_name] = f"{type(e).__name__}: {e}"
            log.warning("EmoLoRA: node %s is unavailable: %s", cls_name, UNAVAILABLE[cls_name])
    return nodes


def register_routes() -> None:
    """GET /emolora/status, GET /emolora/defaults, POST /emolora/panel (start the panel once, answer its URL)
    and /emolora/panel/ui/* (the panel through ComfyUI's origin, for the sidebar tab). Registered before
    ComfyUI adds its routes to the app (comfy_entrypoint runs while custom nodes load)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except Exception as e:  # not inside ComfyUI
        log.debug("EmoLoRA routes not registered: %r", e)
        return
    routes = PromptServer.instance.routes

    @routes.get("/emolora/status")
    async def _status(request):
        from .panel import current_url, unavailable_reason

        return web.json_response({"unavailable": UNAVAILABLE, "panel_url": current_url(),
                                  "panel_unavailable": unavailable_reason()})

    @routes.get("/emolora/defaults")
    async def _defaults(request):
        """What the frontend fills widgets with: each optimizer's real defaults per preset, and the values each
        training preset sets (both as trainer.config merges them)."""
        import asyncio

        from ._common import training_presets
        from .optimizer_spec import defaults_table

        def build():
            return {"optimizers": defaults_table(), "training_presets": training_presets()}

        global _DEFAULTS
        if _DEFAULTS is None:
            try:
                _DEFAULTS = await asyncio.get_running_loop().run_in_executor(None, build)
            except Exception as e:  # noqa: BLE001 - a broken preset file: say which, do not crash the server
                return web.json_response({"error": str(e)}, status=500)
        return web.json_response(_DEFAULTS)

    @routes.route("*", "/emolora/panel/ui/{tail:.*}")
    async def _panel_ui(request):
        from .panel import current_url
        from .panel_proxy import forward

        url = current_url()
        if not url:
            return web.json_response({"error": "the EmoLoRA panel is not started (POST /emolora/panel)"}, status=409)
        try:
            return await forward(request, url)
        except OSError as e:  # the panel went away
            return web.json_response({"error": f"the EmoLoRA panel at {url} does not answer: {e}"}, status=502)

    @routes.post("/emolora/panel")
    async def _panel(request):
        import asyncio

        from .panel import ensure_panel

        try:
            url = await asyncio.get_running_loop().run_in_executor(None, ensure_panel)
        except Exception as e:  # noqa: BLE001
            return web.json_response({"error": str(e)}, status=503)
        return web.json_response({"url": url})


def make_extension():
    from comfy_api.latest import ComfyExtension

    class EmoLoRAExtension(ComfyExtension):
        async def on_load(self) -> None:
            return None

        async def get_node_list(self) -> list:
            return load_nodes()

    register_routes()
    return EmoLoRAExtension()
