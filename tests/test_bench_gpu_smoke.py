"""benchmarks/bench_gpu.py in its CPU form (tiny UNet): every row of the GPU table is produced by the same code."""

import json
import math
import sys
from pathlib import Path

import pytest

from trainer.optim import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_gpu_cpu_form_prints_the_whole_table(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--device", "cpu", "--unet", "tiny", "--batches", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    train = [r for r in rows if r["part"] == "train"]
    assert [r["config"] for r in train] == ["bs 1, ckpt on"] * 6 + ["bs 1, ckpt off"] * 6
    refs = [r for r in train if r["impl"].startswith("reference")]
    assert len(refs) == 2 and all("192 targets" in r["impl"] for r in refs)  # the tiny UNet's LoRA targets
    ours = [r for r in train if r["impl"].startswith("ours")]
    assert {r["impl"].split()[1] for r in ours} == set(bench_gpu.TRAIN_OPTIMIZERS)
    assert all(math.isfinite(r["s"]) and r["s"] > 0 and r["ratio"] > 0 and "note" not in r for r in ours)
    opt = [r for r in rows if r["part"] == "optimizer"]
    labels = {r["impl"] for r in opt}
    assert {f"ours {name}" for name in OPTIMIZERS} <= labels and "torch AdamW(fused=True)" in labels
    assert {f"pytorch_optimizer.{n}" for n in bench_gpu.EXTERNAL} <= labels
    assert all(r["s"] > 0 for r in opt)
    table = capsys.readouterr().out
    assert table.count("\n| train |") == 12 and "| part | config | implementation |" in table
    assert "(not checked: CPU)" in table


def test_bench_gpu_vram_table_plans_and_runs_on_the_cpu(tmp_path, capsys):
    """--vram (issue 17) in its CPU form: the reference and ours with a bf16 base, an fp8 base and fp8 + offload,
    each of ours with its VRAM estimate; peaks and targets are GPU-only."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--vram", "--device", "cpu", "--unet", "tiny", "--resolution", "32", "--json",
                           str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["vram"] * 4 and rows[0]["impl"].startswith("reference")
    ours = rows[1:]
    assert [r["impl"].split(", ", 1)[1] for r in ours] == [label for label, *_ in bench_gpu.VRAM_ROWS]
    assert all(math.isfinite(r["s"]) and r["s"] > 0 and r["estimate_mb"] > 0 for r in ours)
    assert all(r["mb"] is None and "estimate_error" not in r for r in rows)  # no peak measured on the CPU
    table = capsys.readouterr().out
    assert table.count("\n| vram |") == 4 and "peak <= 3,584 MB" in table and "(not checked: CPU)" in table
