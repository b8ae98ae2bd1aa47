"""The package as the ComfyUI Registry sees it: comfy-cli's own `comfy node validate` passes with nothing to warn
about, the fields the Registry checks server-side follow its published rules, the version is stated once."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def comfy_cli() -> list:
    """comfy-cli (requirements-dev.txt); EMOLORA_COMFY_CLI names another install's `comfy`."""
    exe = os.environ.get("EMOLORA_COMFY_CLI") or shutil.which("comfy", path=os.path.dirname(sys.executable))
    if exe:
        return [exe]
    try:
        import comfy_cli  # noqa: F401
    except ImportError:
        require(False, "comfy-cli is not installed (pip install -r requirements-dev.txt)")
    return [sys.executable, "-m", "comfy_cli"]


def test_comfy_node_validate_passes_without_warnings(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}  # its config.ini
    env["PATH"] = os.path.dirname(comfy_cli()[0]) + os.pathsep + env.get("PATH", "")  # its ruff
    out = subprocess.run([*comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Validating node configuration" in text, text  # it ran the check, not just its help
    for bad in ("warning", "error", "insecure", "S102", "S307", "E702"):
        assert bad not in text.lower() if bad.islower() else bad not in text, text


def test_registry_fields_follow_the_published_rules():
    """docs.comfy.org/registry/specifications: what validate leaves to the server."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert set(project["license"]) <= {"file", "text"}  # a table, never a bare string
    for classifier in project.get("classifiers", []):
        if classifier.startswith(("Operating System", "Environment :: GPU", "Environment :: NPU")):
            assert classifier.startswith(("Operating System :: Microsoft", "Operating System :: POSIX",
                                          "Operating System :: MacOS", "Operating System :: OS Independent",
                                          "Environment :: GPU :: NVIDIA CUDA", "Environment :: GPU :: AMD ROCm",
                                          "Environment :: GPU :: Intel Arc", "Environment :: GPU :: Apple Metal",
                                          "Environment :: NPU :: Huawei Ascend")), classifier
    assert re.fullmatch(r"(?:(==|>=|<=|!=|~=|>|<)\s*)?\d+\.\d+\.\d+", comfy["requires-comfyui"])
    icon = ROOT / "docs" / "images" / "icon.svg"  # the Registry takes a URL: this file's, once published
    assert icon.is_file() and icon.stat().st_size < 4096 and 'width="128" height="128"' in icon.read_text()
    for url in [*project.get("urls", {}).values(), comfy.get("Icon", ""), comfy.get("Banner", "")]:
        assert not url or url.startswith("https://"), url


def test_the_version_is_stated_only_in_pyproject():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    pattern = re.compile(r"""(__version__|\bVERSION\b|\bversion\b)\s*[=:]\s*["']""" + re.escape(version))
    stated = []
    for folder in ("", "nodes", "trainer", "web"):
        for path in (ROOT / folder).rglob("*") if folder else ROOT.glob("*"):
            if path.suffix in (".py", ".js", ".json", ".toml", ".cfg") and path.name != "pyproject.toml" \
                    and ".venv" not in path.parts and pattern.search(path.read_text(encoding="utf-8", errors="ignore")):
                stated.append(str(path.relative_to(ROOT)))
    assert stated == [], stated
