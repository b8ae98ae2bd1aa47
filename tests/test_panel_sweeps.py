"""The panel's sweep view without a browser, over a real small sweep folder (tiny model): the sweeps it lists,
path safety, the table and the overlaid validation curves, and the command its start form launches."""

import json
import sys
from pathlib import Path

import pytest
from conftest import require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")

from trainer.cli import load_pack  # noqa: E402

load_pack()
from emolora.web.panel import sweeps  # noqa: E402
from emolora.web.panel.paths import PanelRoot, PathError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """An output folder with one real finished sweep: EmoNavi (raw, and its loss withheld) and AdamW, 3 steps."""
    import torch
    from _trainer_helpers import make_dataset

    from trainer.config import TrainConfig
    from trainer.model import tiny_model_path
    from trainer.sweep import plan_sweep, run_sweep

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("panel-out")
    data = make_dataset(out.parent / "sweep-data", n=5)
    base = TrainConfig(model=tiny_model_path(), data=str(data), output=str(out / "x.safetensors"), resolution=64,
                       bucket_step=32, rank=4, batch_size=1, seed=3, device="cpu", gradient_checkpointing=False)
    plan = plan_sweep(base, "EmoNavi,AdamW", loss_control=True, steps=3, output_dir=out / "sweeps" / "first")
    run_sweep(plan)
    torch.set_num_threads(old)
    return out


def test_lists_the_sweeps_and_refuses_paths_outside(output, tmp_path):
    root = PanelRoot(output)
    assert sweeps.list_sweeps(root) == ["first"]
    assert sweeps.sweep_dir(root, "first") == (output / "sweeps" / "first").resolve()
    for bad in ("..", "../first", "/etc", "", None, "missing"):
        with pytest.raises(PathError):
            sweeps.sweep_dir(root, bad)
    assert sweeps.list_sweeps(PanelRoot(output / "sweeps" / "first")) == ["."]  # the output folder is a sweep


def test_table_and_curves_of_a_real_sweep(output):
    root = PanelRoot(output)
    view = sweeps.SweepView(root)
    table, svg, version = view.render("first")
    doc = json.loads((output / "sweeps" / "first" / "sweep.json").read_text())
    assert "data-rows='3'" in table and "data-done='3' data-total='3' data-status='finished'" in table
    assert table.count("<tr data-optimizer=") == 3 and "data-mode='withheld'" in table
    assert doc["recommendation"] and doc["recommendation"].split(",")[0] in table
    for r in doc["rows"]:
        assert f"{r['val_loss_end']:.4f}" in table
    # one line per run through its validation points (every step here); the withheld run dashed
    assert svg.count("<polyline") == 3 and 'data-series="EmoNavi"' in svg and 'data-series="AdamW"' in svg
    assert 'stroke-dasharray="7 4"' in svg
    assert view.render("first")[2] == version  # nothing changed: the same version (the view sends nothing)


def test_start_form_builds_the_sweep_command_and_checks_it_first(output, tmp_path):
    from _trainer_helpers import make_dataset
    from emolora.trainer.config import ConfigError  # the pack's own trainer, as the panel imports it

    from trainer.model import tiny_model_path

    root = PanelRoot(output)
    data = make_dataset(tmp_path / "data", n=5)
    overrides = {"model": tiny_model_path(), "data": str(data), "optimizer": "EmoNavi", "lr": 1e-3, "steps": 4,
                 "resolution": 64, "rank": 4}
    cmd = sweeps.build_command(root, ["concept"], overrides, "mine", optimizers="emo", seeds=2, loss_control=True,
                               optimizer_loss="both")
    assert cmd[:3] == [sys.executable, "-m", "trainer"]
    args = cmd[3:]
    assert args[:11] == ["sweep", "--no-progress", "--output", str(output / "sweeps" / "mine"), "--optimizers", "emo",
                         "--seeds", "2", "--optimizer-loss", "raw,normalized", "--loss-control"]
    assert ["--preset", "concept"] == args[11:13] and ["--steps", "4"] == args[args.index("--steps"):][:2]
    assert "--optimizer" not in args and "--lr" not in args  # each optimizer at its own preset LR
    for bad, message in (({"optimizers": "EmoNavi,Nope"}, "unknown name"), ({"seeds": 0}, "seeds must be >= 1"),
                         ({"optimizers": "AdamW", "loss_control": True}, "loss_control needs")):
        kw = {**dict(optimizers="EmoNavi", seeds=1, loss_control=False, optimizer_loss="raw"), **bad}
        with pytest.raises(ConfigError, match=message):
            sweeps.build_command(root, [], overrides, "bad", **kw)
    assert not (output / "sweeps" / "bad").exists()
    one = make_dataset(tmp_path / "one", n=1)
    with pytest.raises(ValueError, match="validation_split needs at least 2 images"):
        sweeps.build_command(root, [], {**overrides, "data": str(one)}, "bad", optimizers="EmoNavi", seeds=1,
                             loss_control=False, optimizer_loss="raw")


def test_pack_sweep_view_imports_no_gradio():
    assert "gradio" not in Path(sweeps.__file__).read_text()
