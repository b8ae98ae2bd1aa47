"""The upstream reference trajectories (../shared/golden): every optimizer follows upstream's numbers."""

import functools
import glob
import os
import subprocess
import sys

import pytest

from trainer.optim import OPTIMIZERS

UPSTREAM_NAMES = {"EmoNavi", "EmoFact", "EmoLynx", "EmoClan", "EmoZeal", "EmoNeco", "EmoSens", "EmoAiry", "EmoCats",
                  "EmoTion", "EmoVoid", "RefAdamWminiScheduleFree", "AutoTrustGO"}


def test_registry_holds_exactly_the_upstream_names():
    assert set(OPTIMIZERS) == UPSTREAM_NAMES
    assert all(cls.__name__ == name for name, cls in OPTIMIZERS.items())


def cases(golden):
    return sorted(glob.glob(os.path.join(golden, "public", "*.json")))


def test_golden_check_script_passes_all_cases(golden_dir):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(golden_dir, "check.py"), os.path.join(golden_dir, "public"),
                          "--registry", "trainer.optim:OPTIMIZERS"], cwd=root, capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1]
    n = len(cases(golden_dir))
    assert last == f"{n} passed, 0 failed", out.stdout + out.stderr
    assert out.returncode == 0


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_golden_cases_in_both_execution_modes(golden_dir, foreach):
    import check

    registry = {name: functools.partial(cls, foreach=foreach) for name, cls in OPTIMIZERS.items()}
    failures = [f"{os.path.basename(p)}: {r}" for p in cases(golden_dir) if (r := check.run_case(p, registry))]
    assert not failures
