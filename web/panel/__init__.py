"""The EmoLoRA panel: live charts of a training run, its controls, and a form to start runs.

    launch(runs_dir, host="127.0.0.1", port=7861, allow_remote=False) -> url    (non-blocking, once per process)
    main(argv)        `python -m trainer panel [--runs DIR] [--host H --listen-all] [--port N]`

It reads the trainer's run store, so it follows runs started from ComfyUI (a thread of this process), from the
command line (another process) or from the panel itself. Gradio is imported only when the panel starts.
"""

import argparse
import os
import threading
import time

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7861

_lock = threading.Lock()
_state: dict = {"url": None, "app": None, "demo": None}


def _offline_env() -> None:
    # Set before gradio is imported: no analytics, no version check, no telemetry of any kind.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def launch(runs_dir=None, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT, allow_remote: bool = False,
           quiet: bool = True) -> str:
    """Serve the panel for the output folder `runs_dir` (holding runs/) in a background thread; return its URL.

    One panel per process: a second call returns the first call's URL whatever its arguments. Listening on
    anything but the loopback interface needs allow_remote=True (the panel can start and stop training)."""
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"the panel listens on 127.0.0.1 unless told otherwise: host {host!r} needs "
                         "allow_remote=True (--listen-all)")
    with _lock:
        if _state["url"]:
            return _state["url"]
        _offline_env()
        from .app import CSS, PanelApp, theme

        panel = PanelApp(runs_dir or "output")
        demo = panel.build()
        demo.queue(default_concurrency_limit=2)
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False,
                                quiet=quiet, show_error=True, ssr_mode=False, mcp_server=False,
                                enable_monitoring=False, inbrowser=False, allowed_paths=[str(panel.root.root)],
                                theme=theme(), css=CSS, footer_links=[])
        _state.update(url=url, app=panel, demo=demo)
        return url


def url() -> str | None:
    """The running panel's URL, or None."""
    return _state["url"]


def panel_app():
    """The PanelApp of the running panel (None before launch)."""
    return _state["app"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer panel",
                                description="Live charts and controls for EmoLoRA training runs (Gradio).")
    p.add_argument("--runs", default="output", help="the output folder holding runs/ (default: ./output)")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; others need "
                                                "--listen-all)")
    p.add_argument("--listen-all", action="store_true",
                   help="allow listening beyond this machine (0.0.0.0 unless --host names one)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    host = args.host or ("0.0.0.0" if args.listen_all else "127.0.0.1")
    if host not in LOOPBACK and not args.listen_all:
        print(f"error: listening on {host} needs --listen-all (the panel can start and stop training)")
        return 2
    try:
        address = launch(args.runs, host=host, port=args.port, allow_remote=args.listen_all)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    except OSError as e:  # the port is taken
        print(f"error: cannot listen on {host}:{args.port}: {e}")
        return 1
    print(f"EmoLoRA panel: {address}  (output folder {os.path.abspath(args.runs)}; Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
