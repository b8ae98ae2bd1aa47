"""The optimizer sweep (trainer/sweep): plan and bad input, rows equal to standalone runs over one model load,
the loss-withheld control, the report, and resume after a kill mid-sweep."""

import json
import re

import pytest
import torch
from _trainer_helpers import lora_tensors, make_dataset, tiny_config

from trainer import build
from trainer.cli import main
from trainer.config import OPTIMIZER_NAMES, ConfigError
from trainer.runstore import RunReader
from trainer.sweep import LOSS_READERS, load_sweep, parse_optimizer_list, plan_sweep, report, resume_plan, run_sweep
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def val_losses(run_dir):
    return [(r["step"], r["val_loss"]) for r in RunReader(run_dir).steps() if r.get("val_loss") is not None]


def standalone(spec, tmp_path):
    """The run's own config trained by `train`, in another folder."""
    cfg = spec.cfg.replace(output=str(tmp_path / "alone" / f"{spec.name}.safetensors"),
                           runs_dir=str(tmp_path / "alone" / "runs"))
    return train(cfg)


# ---- the plan and bad input (no model) -------------------------------------------------------------------------
def test_parse_optimizer_list():
    assert parse_optimizer_list("all") == list(OPTIMIZER_NAMES)
    assert parse_optimizer_list("EMO") == [n for n in LOSS_READERS if n.startswith("Emo")]
    assert "AdamW" not in LOSS_READERS
    assert parse_optimizer_list(" emonavi, AdamW ") == ["EmoNavi", "AdamW"]
    with pytest.raises(ConfigError, match=r"unknown name\(s\) Foo; valid: EmoNavi, .*AdamW"):
        parse_optimizer_list("EmoNavi,Foo")
    with pytest.raises(ConfigError, match="listed twice: EmoLynx"):
        parse_optimizer_list("EmoLynx,emolynx")
    with pytest.raises(ConfigError, match="at least one"):
        parse_optimizer_list(" , ")


def test_importing_the_sweep_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, trainer.sweep; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "False"  # the panel reads sweep.json through it


def test_loss_readers_are_the_optimizers_whose_step_reads_the_loss():
    from trainer.optim import OPTIMIZERS

    assert set(LOSS_READERS) == {n for n, cls in OPTIMIZERS.items() if cls.reads_loss}
    assert "RefAdamWminiScheduleFree" in LOSS_READERS and "AutoTrustGO" not in LOSS_READERS


def test_plan_lays_out_the_runs(tmp_path):
    base = tiny_config(tmp_path)  # no validation set
    plan = plan_sweep(base, "EmoSens,AdamW", seeds=2, loss_control=True, optimizer_loss_modes=("raw", "normalized"),
                      lr_scales=(0.5, 1), steps=7, output_dir=tmp_path / "sw", explicit={"rank": 8, "lr": 5.0})
    labels = [r.label for r in plan.runs]
    assert len(set(labels)) == len(labels) == 2 * 2 * (3 + 1)  # EmoSens raw/normalized/withheld, AdamW raw only
    assert {r.optimizer_loss for r in plan.runs if r.optimizer == "AdamW"} == {"raw"}
    assert {r.loss_fed for r in plan.runs if r.optimizer == "EmoSens"} == {"fed", "withheld"}
    assert {r.seed for r in plan.runs} == {base.seed, base.seed + 1}
    # each at its preset LR times the scale (an explicit lr is not a per-run option), the user's rank everywhere
    assert {r.lr for r in plan.runs if r.optimizer == "EmoSens"} == {0.5, 1.0}
    assert {r.lr for r in plan.runs if r.optimizer == "AdamW"} == {5e-5, 1e-4}
    adamw = next(r for r in plan.runs if r.optimizer == "AdamW")
    assert adamw.cfg.optimizer_args.get("weight_decay") == 0.01 and adamw.cfg.rank == 8
    sens = next(r for r in plan.runs if r.optimizer == "EmoSens")
    assert sens.cfg.optimizer_args == {}  # AdamW's preset arguments do not leak into the other optimizers
    assert all(r.cfg.validation_split == 0.2 and r.cfg.steps == 7 for r in plan.runs)
    assert "holding out 20%" in plan.notes[0]
    same = plan_sweep(base, "EmoSens", steps=7, output_dir=tmp_path / "sw2", lr=3e-3)
    assert [r.lr for r in same.runs] == [3e-3]


@pytest.mark.parametrize("args,message", [
    (["--optimizers", "EmoNavi,Nope"], "unknown name(s) Nope; valid: EmoNavi"),
    (["--optimizers", "EmoNavi,EmoNavi"], "listed twice: EmoNavi"),
    (["--optimizers", "EmoNavi", "--seeds", "0"], "seeds must be >= 1"),
    (["--optimizers", "AdamW", "--loss-control"], "loss_control needs an optimizer whose update reads the loss"),
    (["--optimizers", "EmoNavi", "--optimizer-loss", "raw,cooked"], "optimizer_loss modes must be"),
    (["--optimizers", "EmoNavi", "--lr-scale", "1,0"], "lr_scale values must be distinct and > 0"),
    (["--optimizers", "EmoNavi", "small"], "validation_split needs at least 2 images"),
    (["--optimizers", "EmoNavi", "emptyval"], "no usable image"),
])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(build, "load_model", no_load)
    data = make_dataset(tmp_path / "data", n=3)
    extra = []
    if args[-1] == "small":
        args, data = args[:-1], make_dataset(tmp_path / "one", n=1)
    if args[-1] == "emptyval":
        (tmp_path / "empty").mkdir()
        args, extra = args[:-1], ["--validation-data", str(tmp_path / "empty")]
    from trainer.model import tiny_model_path

    rc = main(["sweep", "--model", tiny_model_path(), "--data", str(data), "--output", str(tmp_path / "sw"),
               "--steps", "3", *args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert rc == 2 and errors == err[-1:] and message in errors[0], err


# ---- the report (no model) ------------------------------------------------------------------------------------
def _row(opt, mode, seed, end, digest="d", stop="finished", zones=None):
    r = {k: None for k in report.ROW_KEYS}
    r.update(label=f"{opt} {mode} {seed}", optimizer=opt, lr=1e-4, optimizer_loss=mode, seed=seed,
             loss_fed="withheld" if mode == "withheld" else "fed", val_loss_end=end, val_loss_min=end,
             stop_reason=stop, lora_digest=digest, zones=zones or {})
    return r


def test_table_says_identical_and_the_recommendation_weighs_the_seed_spread():
    rows = [_row("EmoNavi", "raw", 1, 1.00, "a"), _row("EmoNavi", "raw", 2, 1.02, "b"),
            _row("EmoNavi", "withheld", 1, 1.00, "a"), _row("EmoNavi", "withheld", 2, 1.02, "b"),
            _row("EmoSens", "raw", 1, 1.01, "c"), _row("EmoSens", "raw", 2, 1.03, "d"),
            _row("EmoSens", "withheld", 1, 1.05, "e"), _row("EmoSens", "withheld", 2, 1.07, "f"),
            _row("AdamW", "raw", 1, 2.0, "g", stop="diverged"), _row("AdamW", "raw", 2, 2.0, "h", stop="diverged")]
    report.mark_identical(rows)
    lines = {tuple(c.strip() for c in ln.split("|")[1:4]): ln for ln in report.table_md(rows).splitlines()[2:]}
    assert "| identical |" in lines[("EmoNavi", "0.0001", "withheld")]
    assert "| +0.04 |" in lines[("EmoSens", "0.0001", "withheld")]
    assert "1.0100 ± 0.0141" in lines[("EmoNavi", "0.0001", "raw")]
    winner, line = report.recommend(rows)  # margin 0.01 inside the spread 0.014: no winner; AdamW diverged
    assert winner is None and line.startswith("no clear winner: EmoNavi at lr 0.0001")
    rows[4]["val_loss_end"], rows[5]["val_loss_end"] = 1.5, 1.52  # EmoSens now clearly worse
    winner, line = report.recommend(rows)
    assert winner["optimizer"] == "EmoNavi" and line.startswith("winner: EmoNavi")
    winner, line = report.recommend([r for r in rows if r["seed"] == 1])
    assert winner["optimizer"] == "EmoNavi" and "one seed" in line


# ---- real sweeps on the tiny SDXL ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_rows_equal_standalone_runs_and_the_control_withholds_the_loss(tmp_path, monkeypatch):
    from trainer import model as M

    loads = []
    real = M.load_sdxl
    monkeypatch.setattr(M, "load_sdxl", lambda *a, **k: loads.append(1) or real(*a, **k))
    base = tiny_config(tmp_path, steps=6, validation_split=0.34, validation_every=3)
    plan = plan_sweep(base, "EmoNavi,EmoSens,EmoTion,EmoClan,AdamW", loss_control=True, steps=6,
                      output_dir=tmp_path / "sw")
    progress = []
    res = run_sweep(plan, on_progress=lambda *a: progress.append(a))
    assert len(loads) == 1 and res.model_loads == 1  # one checkpoint load for 9 runs
    rows = {(r["optimizer"], r["optimizer_loss"]): r for r in res.rows}
    assert len(res.rows) == 9 and ("AdamW", "withheld") not in rows
    assert [p[0] for p in progress] == list(range(10)) and progress[-1][3] is None
    # The control: the optimizer got no loss (its loss EMAs stay 0) ...
    steps = [s for s in RunReader(rows["EmoSens", "withheld"]["run_dir"]).steps() if "loss" in s]
    assert len(steps) == 6 and all(s["ema_short"] == 0.0 and s["ema_long"] == 0.0 for s in steps)
    assert all(s["ema_long"] > 0 for s in RunReader(rows["EmoSens", "raw"]["run_dir"]).steps() if "loss" in s)
    # ... which changes the LoRA of the optimizers whose update reads it; EmoNavi's emo_scalar stayed neutral here
    for opt in ("EmoSens", "EmoTion", "EmoClan"):
        assert rows[opt, "withheld"]["identical"] is False, opt
    assert rows["EmoNavi", "withheld"]["identical"] is True
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert any(ln.startswith("| EmoNavi |") and "| withheld |" in ln and "| identical |" in ln
               for ln in table.splitlines())
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["status"] == "finished"
    png = (tmp_path / "sw" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for r in res.rows:
        assert r["stop_reason"] == "finished" and r["val_loss_end"] is not None and r["update_ratio"] > 0
    # Rows equal standalone runs of their configs, bit for bit: the first run, one after the model was reused
    # with another optimizer's adapters removed, and the control.
    by_label = {s.label: s for s in plan.runs}
    for key in (("EmoNavi", "raw"), ("EmoSens", "withheld"), ("AdamW", "raw")):
        row = rows[key]
        alone = standalone(by_label[row["label"]], tmp_path)
        assert_same_lora(row["lora_path"], alone.lora_path)
        assert val_losses(row["run_dir"]) == val_losses(alone.run_dir)
        assert alone.summary["loss_end"] == row["train_loss_end"]


def test_refadamw_gets_the_control_and_autotrustgo_does_not(tmp_path):
    """RefAdamW reads its optional loss: fed, it injects its weights into the momentum between 20% and 80% of the
    steps; withheld, it never does. AutoTrustGO never reads the loss: no control row."""
    base = tiny_config(tmp_path, steps=10, validation_split=0.34, validation_every=5)
    plan = plan_sweep(base, "RefAdamWminiScheduleFree,AutoTrustGO", loss_control=True, steps=10,
                      output_dir=tmp_path / "sw")
    rows = {(r["optimizer"], r["optimizer_loss"]): r for r in run_sweep(plan).rows}
    assert set(rows) == {("RefAdamWminiScheduleFree", "raw"), ("RefAdamWminiScheduleFree", "withheld"),
                         ("AutoTrustGO", "raw")}

    def ref_alphas(mode):
        return {s["step"]: s["ref_alpha"] for s in RunReader(rows["RefAdamWminiScheduleFree", mode]["run_dir"]).steps()
                if "ref_alpha" in s}

    fed, withheld = ref_alphas("raw"), ref_alphas("withheld")
    assert len(fed) == len(withheld) == 10
    assert all(fed[step] >= 0.5 for step in range(2, 9)) and fed[1] == fed[9] == fed[10] == 0.0
    assert set(withheld.values()) == {0.0}
    assert rows["RefAdamWminiScheduleFree", "withheld"]["identical"] is False
    assert rows["RefAdamWminiScheduleFree", "raw"]["zones"]["neutral"] == pytest.approx(0.3)
    assert rows["RefAdamWminiScheduleFree", "withheld"]["zones"] == {"neutral": 1.0}


@pytest.mark.slow
def test_sweep_resumes_after_a_kill_mid_sweep(tmp_path):
    base = tiny_config(tmp_path, steps=8, validation_split=0.34, validation_every=4)
    plan = plan_sweep(base, "EmoLynx,AdamW,EmoFact", steps=8, output_dir=tmp_path / "sw")

    live = []

    def kill_in_run_2(info):
        live.append((info["sweep_label"], load_sweep(tmp_path / "sw")["current"]))
        if info["sweep_run"] == 2 and info["step"] == 3:
            raise KeyboardInterrupt  # Ctrl-C: the run saves its state and the sweep stops

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, on_step=kill_in_run_2)
    # while a run trains, sweep.json names it and its (live) run folder
    assert all(cur["label"] == label and cur["run_dir"] == info_dir for (label, cur), info_dir in
               zip(live, [str(tmp_path / "sw" / "runs" / plan.runs[cur["run"] - 1].name) for _, cur in live]))
    assert [cur["run"] for _, cur in live] == [1] * 8 + [2] * 3
    saved = load_sweep(tmp_path / "sw")
    assert saved["status"] == "stopped" and [r["optimizer"] for r in saved["rows"]] == ["EmoLynx"]
    first = saved["rows"][0]
    res = run_sweep(resume_plan(tmp_path / "sw"))
    assert res.status == "finished" and [r["optimizer"] for r in res.rows] == ["EmoLynx", "AdamW", "EmoFact"]
    assert res.rows[0] == first  # kept, not trained again
    adamw = res.rows[1]
    assert RunReader(adamw["run_dir"]).events(kind="resume")  # continued from its saved state
    alone = standalone(plan.runs[1], tmp_path)
    assert_same_lora(adamw["lora_path"], alone.lora_path)
    assert val_losses(adamw["run_dir"]) == val_losses(alone.run_dir)


@pytest.mark.slow
def test_cli_sweep_prints_progress_table_and_recommendation(tmp_path, capsys):
    from trainer.model import tiny_model_path

    data = make_dataset(tmp_path / "data", n=5)
    rc = main(["sweep", "--model", tiny_model_path(), "--data", str(data), "--output", str(tmp_path / "sw"),
               "--optimizers", "EmoNavi,AdamW", "--steps", "3", "--resolution", "64", "--rank", "4",
               "--set", "bucket_step=32", "--set", "gradient_checkpointing=false", "--device", "cpu",
               "--batch-size", "2", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "sweep: run 1/2: EmoNavi lr=6e-05 raw seed=42\n" in out.err
    assert re.search(r"sweep: run 2/2: AdamW lr=0.0001 raw seed=42 \(sweep ETA [0-9.]+ min\)", out.err)
    assert "holding out 20%" in out.err
    assert "| EmoNavi | 6e-05 | raw | 1 |" in out.out and out.out.strip().splitlines()[-1].startswith("best: ")
    rows = load_sweep(tmp_path / "sw")["rows"]
    assert [r["steps_done"] for r in rows] == [3, 3] and all(r["lora_path"] for r in rows)


@pytest.mark.slow
def test_a_run_that_diverges_is_a_row_not_the_end_of_the_sweep(tmp_path, monkeypatch):
    from test_train_divergence import PoisonedAdamW

    real = build.make_optimizer

    def make(cfg, params):  # AdamW's every update from the second on writes inf into the LoRA
        return PoisonedAdamW(params, lambda calls: calls >= 2, lr=cfg.lr) if cfg.optimizer == "AdamW" \
            else real(cfg, params)

    monkeypatch.setattr(build, "make_optimizer", make)
    base = tiny_config(tmp_path, steps=8, validation_split=0.34, validation_every=4)
    plan = plan_sweep(base, "AdamW,EmoLynx", steps=8, output_dir=tmp_path / "sw", seeds=2)
    res = run_sweep(plan)
    adamw, _, lynx, lynx2 = res.rows
    assert adamw["stop_reason"] == "diverged" and "AdamW diverged" in adamw["message"]
    assert lynx["stop_reason"] == "finished" and lynx["steps_done"] == 8
    assert res.winner is None or res.winner["optimizer"] == "EmoLynx"
    assert res.recommendation.startswith("only candidate: EmoLynx")
    assert "| AdamW | 0.0001 | raw | 2 |" in res.table_md and "diverged |" in res.table_md
    # The second seed's data (another held-out image, another order) comes from the first seed's caches. A caption
    # cached while the first seed trained was encoded in another batch than the standalone run encodes it in, and
    # the text encoder's pooled output depends on the batch in the last bit: equal to float tolerance.
    assert lynx2["seed"] == base.seed + 1
    alone = standalone(plan.runs[3], tmp_path)
    ta, tb = lora_tensors(lynx2["lora_path"]), lora_tensors(alone.lora_path)
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-7) for k in ta)
    got, want = val_losses(lynx2["run_dir"]), val_losses(alone.run_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 4, 8]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_a_folder_holding_another_sweep_is_refused_and_the_saved_plan_round_trips(tmp_path, monkeypatch):
    from trainer.sweep import run as sweep_run

    base = tiny_config(tmp_path)
    a = plan_sweep(base, "EmoNavi,AdamW", steps=5, output_dir=tmp_path / "sw", loss_control=True, seeds=2)
    sweep_run._write(a, "stopped", [])
    again = resume_plan(tmp_path / "sw")
    assert again.to_dict() == a.to_dict() and [r.cfg for r in again.runs] == [r.cfg for r in a.runs]
    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="holds another sweep"):
        run_sweep(plan_sweep(base, "EmoNavi", steps=5, output_dir=tmp_path / "sw"))
