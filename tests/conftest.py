import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
GOLDEN = os.path.join(SHARED, "golden")


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(os.path.join(GOLDEN, "public")):
        pytest.skip(f"the golden trajectories are not at {GOLDEN} (they ship beside the project, in ../shared)")
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
    if os.environ.get("EMOLORA_SKIP_COMFY"):
        pytest.skip("EMOLORA_SKIP_COMFY is set")
    import comfy_harness

    return comfy_harness.shared_server()
