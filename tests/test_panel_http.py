"""The panel over real HTTP on 127.0.0.1 (no browser needed): the login, and what Gradio's routes serve.

One panel with credentials (forced on loopback with the same option a remote panel needs): without a login only
the login page answers; with one, the page and its API answer, and the file route serves exactly the files the
panel offers: never a run's state or telemetry database, nothing outside the output folder, no traversal.
"""

import http.cookiejar
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")

from trainer.cli import load_pack  # noqa: E402
from trainer.runstore import RunStore  # noqa: E402

load_pack()  # the panel is part of the pack (it imports the trainer relatively)
USER, PASSWORD = "emo", "s3cret:with colon"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """urllib with its own cookie jar: one browser session."""

    def __init__(self, url):
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path, data=None):
        try:
            with self.opener.open(urllib.request.Request(self.url + path, data=data), timeout=20) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def login(self, user, password):
        return self.request("login", urllib.parse.urlencode({"username": user, "password": password}).encode())


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    from emolora.web.panel import serve
    from emolora.web.panel.app import PanelApp

    out = tmp_path_factory.mktemp("panel-output")
    store = RunStore(out / "runs" / "r1")
    store.write_config({"optimizer": "EmoNavi", "steps": 2})
    lora = out / "r1.safetensors"
    lora.write_bytes(b"the lora")
    (store.run_dir / "samples").mkdir()
    (store.run_dir / "samples" / "s1.png").write_bytes(b"\x89PNG sample")
    store.state_dir.mkdir()
    (store.state_dir / "state.pt").write_bytes(b"the state")
    store.set_meta(status="finished", optimizer="EmoNavi", pid=os.getpid(), started_at=time.time(),
                   lora_path=str(lora), stop_reason="finished")
    store.log_step(1, {"loss": 0.5})
    store.close()
    (out / "inside.txt").write_text("inside, not offered")
    app = PanelApp(out, model_roots=[out], data_roots=[out])
    url, demo = serve(app, "127.0.0.1", _free_port(), auth=[(USER, PASSWORD)])
    try:
        yield out, url, app
    finally:
        demo.close()


def test_without_credentials_only_the_login_page_answers(panel):
    out, url, app = panel
    app.tick(None, "", True, [], {})  # the panel offers the run's LoRA and sample
    c = Client(url)
    status, page = c.request("")
    assert status == 200 and b"auth_required" in page and b"emolora-status" not in page
    for path in ("config", "gradio_api/info", f"gradio_api/file={out / 'r1.safetensors'}",
                 f"file={out / 'r1.safetensors'}", "gradio_api/queue/data?session_hash=x", "gradio_api/openapi.json"):
        status, body = c.request(path)
        assert status == (404 if path.startswith("file=") else 401), (path, status)  # file=: no such route
        assert b"the lora" not in body
    status, _ = c.request("gradio_api/queue/join", json.dumps({"data": [], "fn_index": 0}).encode())
    assert status == 401
    assert c.login(USER, "wrong")[0] == 400 and c.login("nobody", PASSWORD)[0] == 400
    assert c.request("config")[0] == 401


def test_with_credentials_the_page_works_and_only_offered_files_are_served(panel):
    out, url, app = panel
    c = Client(url)
    assert c.login(USER, PASSWORD) == (200, b'{"success":true}')
    status, config = c.request("config")
    assert status == 200 and b"emolora-status" in config and b"emolora-start" in config
    status, page = c.request("")
    assert status == 200 and b"emolora-status" in page
    assert c.request("gradio_api/info")[0] == 200
    out = out.resolve()
    rd = app.run_data("r1")
    assert app.lora_files(rd) == [str(out / "r1.safetensors")]
    assert app.sample_files(rd) == [str(out / "runs" / "r1" / "samples" / "s1.png")]
    assert c.request(f"gradio_api/file={out / 'r1.safetensors'}") == (200, b"the lora")
    assert c.request(f"gradio_api/file={out / 'runs' / 'r1' / 'samples' / 's1.png'}") == (200, b"\x89PNG sample")

    secret = out.parent / f"{out.name}-secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    run = out / "runs" / "r1"
    refused = [secret, f"{out}/../{secret.name}", urllib.parse.quote(f"{out}/../{secret.name}"), "/etc/passwd",
               run / "state" / "state.pt", run / "telemetry.sqlite", run / "telemetry.sqlite-wal",
               run / "config.json", out / "inside.txt", f"{out}/runs/r1/samples/../state/state.pt"]
    for bad in refused:
        for route in ("gradio_api/file=", "file="):
            status, body = c.request(f"{route}{bad}")
            assert status in (403, 404), (route, bad, status)
            assert body.strip() in (b"", b'{"detail":"Not Found"}') or b"not allowed" in body, (route, bad, body)
            assert not any(s in body for s in (b"TOP-SECRET", b"root:", b"the state", b"SQLite format"))
