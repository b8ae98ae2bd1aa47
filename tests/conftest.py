import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
GOLDEN = os.environ.get("EMOLORA_GOLDEN") or os.path.join(SHARED, "golden")


def require(condition, why: str) -> None:
    """Skip the test (or the module, at import time) when a prerequisite is missing, except under CI=true, where
    that fails: a CI run that silently skips the golden check, the browser or ComfyUI proves nothing."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"CI=true and a prerequisite is missing: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_module(name: str, why: str):
    """pytest.importorskip under the rule of require()."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"{why} ({exc})")


@pytest.fixture(scope="session")
def golden_dir():
    require(
        os.path.isdir(os.path.join(GOLDEN, "public")),
        f"the golden trajectories are not at {GOLDEN} (they ship beside the project, in ../shared; or set "
        "EMOLORA_GOLDEN)",
    )
    if GOLDEN not in sys.path:
        sys.path.insert(0, GOLDEN)
    return GOLDEN


@pytest.fixture
def one_thread():
    """One torch thread for tiny-model tests: they are all per-op overhead, and on a shared 2-core machine torch's
    default pool spins against other processes (a tiny training step goes from 0.1 s to several seconds)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def comfy():
    """A real ComfyUI server with this pack installed, one per test session (tests/comfy_harness.py)."""
    require(not os.environ.get("EMOLORA_SKIP_COMFY"), "EMOLORA_SKIP_COMFY is set")
    import comfy_harness

    return comfy_harness.shared_server()


def doc_image(png: bytes, name: str, max_width: int = 720) -> None:
    """With EMOLORA_DOC_IMAGES=<folder> (docs/images when refreshing the docs' pictures), also keep a small copy of a
    browser test's screenshot there: at most max_width px wide, 64-colour palette PNG. Off by default: a test run
    never changes tracked files."""
    folder = os.environ.get("EMOLORA_DOC_IMAGES")
    if not folder:
        return
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    os.makedirs(folder, exist_ok=True)
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(os.path.join(folder, name), optimize=True)
