"""benchmarks/sweep_evidence.py: the pairing and the verdict rule behind the README's evidence tables."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_evidence.py"
spec = importlib.util.spec_from_file_location("sweep_evidence", BENCH)
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def row(opt, mode, seed, end, scale=1.0, lr=1e-4, digest=None, identical=None):
    return {"optimizer": opt, "optimizer_loss": mode, "seed": seed, "lr": lr * scale, "lr_scale": scale,
            "val_loss_start": 0.15, "val_loss_end": end, "optimizer_loss_cv": 0.7, "update_ratio": 1e-3,
            "zones": {"accel": 0.3, "neutral": 0.7}, "stop_reason": "finished", "identical": identical,
            "lora_digest": digest or f"{opt}-{mode}-{seed}-{scale}"}


def test_verdict_rule():
    assert ev.verdict([0.002, 0.003], [None, None]) == "higher"
    assert ev.verdict([-0.002, -0.003], [None, None]) == "lower"
    assert ev.verdict([0.001, -0.001], [None, None]) == "no difference"      # the seeds disagree in sign
    assert ev.verdict([0.001, 0.004], [None, None]) == "no difference"       # mean 0.0025 inside the spread 0.003
    assert ev.verdict([0.0, 0.0], [True, True]) == "identical"
    assert ev.verdict([0.002], [None]) == "one seed"


def test_paired_table_ignores_scaled_runs():
    rows = [row("EmoNavi", "raw", 42, 0.140), row("EmoNavi", "raw", 43, 0.150),
            row("EmoNavi", "withheld", 42, 0.142), row("EmoNavi", "withheld", 43, 0.152),
            row("EmoNavi", "withheld", 42, 0.100, scale=2.0), row("EmoNavi", "withheld", 43, 0.100, scale=2.0)]
    (entry,) = ev.summarize(rows)
    withheld = entry["variants"]["withheld"]
    assert withheld["n"] == 2 and abs(withheld["diff"] - 0.002) < 1e-12 and withheld["verdict"] == "higher"
    assert "withheld vs raw" in ev.table([entry]) and "+0.0020 (higher)" in ev.table([entry])


def test_lr_control_pairs_each_lr_against_raw_at_the_preset(tmp_path):
    preset = [row("EmoSens", "raw", 42, 0.140, lr=1.0), row("EmoSens", "raw", 43, 0.150, lr=1.0),
              row("AdamW", "raw", 42, 0.140)]
    scaled = [row("EmoSens", "withheld", 42, 0.137, scale=2.0, lr=1.0),
              row("EmoSens", "withheld", 43, 0.148, scale=2.0, lr=1.0),
              row("EmoSens", "raw", 42, 0.141, scale=2.0, lr=1.0),
              row("EmoSens", "raw", 43, 0.149, scale=2.0, lr=1.0)]
    for name, rows in (("a", preset), ("f", scaled)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps({"rows": rows}))
    items = ev.lr_control(ev.load_rows([tmp_path / "a", tmp_path / "f"]))
    by = {(e["optimizer_loss"], e["lr_scale"]): e for e in items}
    assert {e["optimizer"] for e in items} == {"EmoSens"}  # AdamW has no run away from its preset LR
    assert set(by) == {("raw", 1.0), ("raw", 2.0), ("withheld", 2.0)}
    assert "verdict" not in by[("raw", 1.0)]
    assert abs(by[("withheld", 2.0)]["diff"] + 0.0025) < 1e-12 and by[("withheld", 2.0)]["verdict"] == "lower"
    assert by[("raw", 2.0)]["verdict"] == "no difference"  # +0.001 and -0.001
    assert by[("withheld", 2.0)]["lr"] == 2.0
    text = ev.lr_table(items)
    assert "| EmoSens | withheld | 2 (x2) | 2 | 0.1425 | -0.0025 (lower) |" in text


def test_best_lr_sets_each_variant_at_its_own_best_lr():
    rows = []
    ends = {("raw", 1.0): (0.140, 0.150), ("raw", 2.0): (0.138, 0.149), ("withheld", 1.0): (0.142, 0.152),
            ("withheld", 2.0): (0.139, 0.151), ("withheld", 4.0): (0.1375, 0.1485), ("normalized", 1.0): (0.1, 0.1)}
    for (mode, scale), (e42, e43) in ends.items():
        rows += [row("EmoNavi", mode, 42, e42, scale=scale), row("EmoNavi", mode, 43, e43, scale=scale)]
    rows.append(row("EmoNavi", "withheld", 42, 0.01, scale=8.0))  # one seed: not a candidate
    best = {e["optimizer_loss"]: e for e in ev.best_lr(rows + [row("AdamW", "raw", 42, 0.1)])}
    assert set(best) == {"raw", "withheld"}  # normalized ran at one LR only; AdamW at its preset only
    assert best["raw"]["lr_scale"] == 2.0 and best["withheld"]["lr_scale"] == 4.0
    assert best["withheld"]["scales_run"] == [1.0, 2.0, 4.0]
    assert abs(best["withheld"]["diff"] + 0.0005) < 1e-12  # (-0.0005, -0.0005) against raw at x2
    assert best["withheld"]["verdict"] == "lower"
    assert "| EmoNavi | withheld | x1, x2, x4 | x4 | 0.1430 | -0.0005 (lower) (raw at x2) |" in ev.best_table(
        list(best.values()))


def test_the_published_tables_are_the_scripts_output_on_the_published_rows(capsys):
    """docs/evidence.md's tables cannot drift from the runs: they are what this script prints for the rows in
    docs/evidence/ (each sweep's sweep.json as measured, less its plan)."""
    root = BENCH.parent.parent
    files = sorted((root / "docs" / "evidence").glob("sweep-*.json"))
    assert len(files) >= 3
    assert ev.main([str(f) for f in files]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    page = (root / "docs" / "evidence.md").read_text()
    assert len(lines) > 20 and [ln for ln in lines if ln not in page] == []
