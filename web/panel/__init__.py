"""The EmoLoRA panel: live charts of a training run, its controls, and a form to start runs.

    launch(runs_dir, host="127.0.0.1", port=7861, allow_remote=False, auth=None, model_roots=None,
           data_roots=None) -> url    (non-blocking, once per process)
    main(argv)        `python -m trainer panel [--runs DIR] [--host H --listen-all] [--port N] [--auth U:P |
                      --auth-file F] [--model-root DIR] [--data-root DIR]`

It reads the trainer's run store, so it follows runs started from ComfyUI (a thread of this process), from the
command line (another process) or from the panel itself. Gradio is imported only when the panel starts.
"""

import argparse
import os
import threading
import time

from .auth import HOW, credentials

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7861

_lock = threading.Lock()
_state: dict = {"url": None, "app": None, "demo": None}


def launch(runs_dir=None, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT, allow_remote: bool = False,
           quiet: bool = True, auth=None, model_roots=None, data_roots=None) -> str:
    """Serve the panel for the output folder `runs_dir` (holding runs/) in a background thread; return its URL.

    One panel per process: a second call returns the first call's URL whatever its arguments. Listening on
    anything but the loopback interface needs allow_remote=True and credentials, auth=[(user, password), ...]
    (Gradio's login; given on loopback too, it is required there as well). The start form reads models from
    `model_roots` and datasets from `data_roots` only (default: the current folder)."""
    if host not in LOOPBACK:
        if not allow_remote:
            raise ValueError(f"the panel listens on 127.0.0.1 unless told otherwise: host {host!r} needs "
                             "allow_remote=True (--listen-all)")
        if not auth:
            raise ValueError(f"the panel on {host} needs credentials (it can start training and serves the LoRA "
                             f"files): {HOW}")
    with _lock:
        if _state["url"]:
            return _state["url"]
        from .app import PanelApp

        panel = PanelApp(runs_dir or "output", model_roots=model_roots or [os.getcwd()],
                         data_roots=data_roots or [os.getcwd()])
        url, demo = serve(panel, host, port, auth, quiet)
        _state.update(url=url, app=panel, demo=demo)
        return url


def serve(panel, host: str, port: int | None, auth=None, quiet: bool = True):
    """Serve PanelApp `panel` with Gradio in a background thread: (url, demo); demo.close() ends it."""
    from .app import CSS, HEAD, theme

    demo = panel.build()
    demo.queue(default_concurrency_limit=2)
    # No folder is allowed for Gradio's file route: the panel adds each file it offers (PanelApp.offer).
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, quiet=quiet,
                            show_error=True, ssr_mode=False, mcp_server=False, enable_monitoring=False,
                            inbrowser=False, allowed_paths=[], blocked_paths=[], num_workers=0,
                            auth=list(auth) if auth else None,
                            auth_message="EmoLoRA panel: sign in" if auth else None, theme=theme(), css=CSS, head=HEAD,
                            footer_links=[])
    panel.serve_with(demo)
    return url, demo


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
                                                "--listen-all and credentials)")
    p.add_argument("--listen-all", action="store_true",
                   help="allow listening beyond this machine (0.0.0.0 unless --host names one)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--auth", action="append", metavar="USER:PASS",
                   help="a login (repeatable); required beyond loopback, asked on loopback too when given. "
                        "Prefer --auth-file or $EMOLORA_PANEL_AUTH: a command line is visible to other users")
    p.add_argument("--auth-file", metavar="FILE", help="logins, one user:pass a line")
    p.add_argument("--model-root", action="append", metavar="DIR",
                   help="a folder the start form may take models from (repeatable; default: the current folder)")
    p.add_argument("--data-root", action="append", metavar="DIR",
                   help="a folder the start form may take datasets from (repeatable; default: the current folder)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    host = args.host or ("0.0.0.0" if args.listen_all else "127.0.0.1")
    if host not in LOOPBACK and not args.listen_all:
        print(f"error: listening on {host} needs --listen-all (the panel can start and stop training)")
        return 2
    try:
        auth = credentials(args.auth, args.auth_file)
        address = launch(args.runs, host=host, port=args.port, allow_remote=args.listen_all, auth=auth,
                         model_roots=args.model_root, data_roots=args.data_root)
    except ValueError as e:  # AuthError too
        print(f"error: {e}")
        return 2
    except OSError as e:  # the port is taken
        print(f"error: cannot listen on {host}:{args.port}: {e}")
        return 1
    app = panel_app()
    print(f"EmoLoRA panel: {address}  (output folder {os.path.abspath(args.runs)}; models from {app.model_roots}; "
          f"datasets from {app.data_roots}; {'login required' if auth else 'no login'}; Ctrl+C to stop)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
