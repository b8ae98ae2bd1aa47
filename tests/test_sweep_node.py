"""The Optimizer Sweep node's logic without a ComfyUI (tiny model): one progress bar over the whole sweep, a winner
spec the Trainer node trains with, Cancel at a step boundary keeping what finished, bad input before the model
loads. The node in a real ComfyUI is in test_comfy_server.py."""

import json
from pathlib import Path

import pytest
from test_comfy_nodes import _tiny_dataset, sub

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(tmp_path, n=5):
    return sub("nodes.dataset_spec").build_dataset(str(_tiny_dataset(tmp_path / "data", n=n)), 64, False, 64, 1,
                                                   False)


def _kw(tmp_path, **over):
    from trainer.model import tiny_model_path

    kw = dict(checkpoint=tiny_model_path(), dataset=_dataset(tmp_path), optimizers="EmoSens,AdamW", steps=3,
              loss_control=False, seeds=1, sweep_dir=str(tmp_path / "sweep"), cache_dir=str(tmp_path / "cache"),
              node_id="7", device="cpu", rank=4, gradient_checkpointing=False)
    kw.update(over)
    return kw


def test_sweep_runs_under_one_progress_bar_and_its_winner_trains_in_the_trainer_node(tmp_path, monkeypatch):
    run, training, common = sub("nodes.sweep_run"), sub("nodes.training"), sub("nodes._common")
    events = []
    monkeypatch.setattr(run, "send_event", lambda name, data: events.append((name, data)))
    seen = []
    out = run.run_sweep_node(progress=lambda v, t: seen.append((v, t)), interrupted=lambda: False,
                             **_kw(tmp_path, loss_control=True))
    # EmoSens raw + EmoSens withheld + AdamW, 3 steps each: one bar from 1 to 9
    assert out["status"] == "finished" and out["done"] == out["total"] == 3
    assert [v for v, _ in seen] == list(range(1, 10)) and {t for _, t in seen} == {9}
    saved = json.loads((Path(out["output_dir"]) / "sweep.json").read_text())
    assert saved["status"] == "finished" and len(saved["rows"]) == 3
    assert [(r["optimizer"], r["loss_fed"]) for r in saved["rows"]] == \
        [("EmoSens", "fed"), ("EmoSens", "withheld"), ("AdamW", "fed")]
    assert "no validation set given: holding out 20%" in out["notes"][0]  # the Dataset node set no split
    assert Path(out["png_path"]).is_file()
    image = run.image_tensor(out["png_path"])
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= float(image.min())
    text = run.report_text(out)
    assert out["recommendation"] in text and "| EmoSens |" in text and "| AdamW |" in text
    assert [d["status"] for n, d in events if n == run.SWEEP_EVENT][::len(events) - 1] == ["starting", "finished"]

    # the optimizer output: the best fed run's optimizer at the LR it ran with, as a spec the Trainer node takes
    spec, best = out["spec"], out["best"]
    assert isinstance(spec, common.OptimizerSpec)
    assert best["loss_fed"] == "fed" and best["val_loss_end"] == min(
        r["val_loss_end"] for r in saved["rows"] if r["loss_fed"] == "fed")
    assert spec.optimizer == best["optimizer"] and spec.overrides()["lr"] == best["lr"]
    monkeypatch.setattr(training, "send_event", lambda name, data: None)
    trained = training.run_training(checkpoint=_kw(tmp_path)["checkpoint"], dataset=_dataset(tmp_path),
                                    optimizer=spec, lora_dir=str(tmp_path / "loras"), runs_dir=str(tmp_path / "runs"),
                                    cache_dir=str(tmp_path / "cache"), output_name="winner", device="cpu", rank=4,
                                    steps=2, gradient_checkpointing=False)
    assert trained["stop_reason"] == "finished" and Path(trained["lora_path"]).is_file()
    assert trained["config"].optimizer == best["optimizer"] and trained["config"].lr == best["lr"]


def test_normalized_winner_keeps_its_optimizer_loss_in_the_spec():
    run = sub("nodes.sweep_run")
    spec = run.winner_spec({"optimizer": "EmoNavi", "lr": 3e-4, "optimizer_loss": "normalized"})
    assert spec.presets == ("emonavi",) and spec.overrides() == {"optimizer": "EmoNavi", "lr": 3e-4,
                                                                 "optimizer_loss": "normalized"}
    assert "optimizer_loss" not in run.winner_spec({"optimizer": "AdamW", "lr": 1e-4}).overrides()


def test_cancel_stops_at_the_step_boundary_and_keeps_what_finished(tmp_path, monkeypatch):
    run = sub("nodes.sweep_run")
    monkeypatch.setattr(run, "send_event", lambda name, data: None)

    class Cancelled(Exception):  # stands in for ComfyUI's InterruptProcessingException
        pass

    seen = []

    def progress(value, total):
        seen.append(value)
        if value == 5:  # the second run's second step
            raise Cancelled()

    out = run.run_sweep_node(progress=progress, **_kw(tmp_path, optimizers="AdamW,EmoNavi,EmoSens"))
    assert isinstance(out["cancel"], Cancelled) and out["status"] == "stopped"
    assert out["done"] == 1 and out["total"] == 3  # the first run finished; the second stopped, saved, resumable
    assert max(seen) <= 6 and seen[:5] == [1, 2, 3, 4, 5]  # at most one more step after Cancel
    saved = json.loads((Path(out["output_dir"]) / "sweep.json").read_text())
    assert saved["status"] == "stopped" and [r["optimizer"] for r in saved["rows"]] == ["AdamW"]
    assert "sweep stopped after 1 of 3 runs" in out["recommendation"]
    second = Path(out["output_dir"]) / "runs"
    assert any((d / "state").is_dir() for d in second.iterdir() if "EmoNavi" in d.name)  # resumable


def test_cancel_while_the_model_loads_runs_no_step(tmp_path, monkeypatch):
    run = sub("nodes.sweep_run")
    monkeypatch.setattr(run, "send_event", lambda name, data: None)
    seen = []
    out = run.run_sweep_node(progress=lambda v, t: seen.append(v), interrupted=lambda: True, **_kw(tmp_path))
    assert out["status"] == "stopped" and out["done"] == 0 and seen in ([], [1])


@pytest.mark.parametrize("change, message", [
    ({"optimizers": "EmoNavi,NoSuchOpt"}, "unknown name(s) NoSuchOpt"),
    ({"optimizers": "AdamW", "loss_control": True}, "loss_control needs an optimizer"),
    ({"seeds": 0}, "seeds must be >= 1"),
    ({"optimizer_loss": "sometimes"}, "optimizer_loss must be one of raw, normalized, both"),
])
def test_bad_input_is_one_clear_error_before_the_model_loads(tmp_path, monkeypatch, change, message):
    run, common = sub("nodes.sweep_run"), sub("nodes._common")

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(sub("trainer.model"), "load_sdxl", boom)  # the pack's own trainer, as the node imports it
    with pytest.raises(common.EmoLoRAError, match="^EmoLoRA Optimizer Sweep: ") as info:
        run.run_sweep_node(**_kw(tmp_path, **change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_dataset_too_small_to_hold_out_is_an_error_before_the_model_loads(tmp_path):
    run, common = sub("nodes.sweep_run"), sub("nodes._common")
    kw = _kw(tmp_path)
    kw["dataset"] = _dataset(tmp_path / "one", n=1)
    with pytest.raises(common.EmoLoRAError, match="^EmoLoRA Optimizer Sweep: validation_split needs at least 2 images"):
        run.run_sweep_node(**kw)
