"""The adapter types through the trainer: a LoHa run (Tucker cores on its convs) stopped and resumed is
bit-identical (CPU), and the CLI trains a LoKr and continues it from its file (--network-weights), the step count
carried on in the metadata."""

import pytest
from _trainer_helpers import make_dataset, trained_then_resumed
from safetensors import safe_open
from test_train_resume import RANDOM_EVERYWHERE, assert_same_lora, losses

from trainer.cli import main
from trainer.model import tiny_model_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_and_keys(path):
    with safe_open(path, "pt") as f:
        return f.metadata(), set(f.keys())


@pytest.mark.slow
def test_loha_stop_at_k_and_resume_is_bit_identical(tmp_path):
    kw = dict(RANDOM_EVERYWHERE, network="loha", conv_rank=2, tucker=True, optimizer="EmoFact", lr=1e-3)
    ref, resumed = trained_then_resumed(tmp_path, 3, **kw)
    assert resumed.steps_done == 8
    assert_same_lora(ref.lora_path, resumed.lora_path)
    assert losses(ref.run_dir) == losses(resumed.run_dir)
    meta, keys = _meta_and_keys(ref.lora_path)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "loha"' in meta["ss_network_args"]
    assert '"use_tucker": "True"' in meta["ss_network_args"] and any(k.endswith(".hada_t2") for k in keys)
    assert any(k.endswith(".hada_w2_b") for k in keys) and not any("lora_up" in k for k in keys)


@pytest.mark.slow
def test_cli_trains_a_lokr_and_continues_it_from_its_file(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    common = ["train", "--model", tiny_model_path(), "--data", data, "--resolution", "64", "--rank", "4",
              "--optimizer", "EmoNavi", "--lr", "1e-3", "--device", "cpu", "--no-progress",
              "--set", "bucket_step=32", "--set", "gradient_checkpointing=false", "--set", "save_dtype=fp32"]
    first = tmp_path / "out" / "first.safetensors"
    assert main([*map(str, common), "--output", str(first), "--steps", "3", "--network", "lokr",
                 "--lokr-factor", "2", "--rslora"]) == 0
    meta, keys = _meta_and_keys(first)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_steps"] == "3"
    assert '"algo": "lokr"' in meta["ss_network_args"] and '"rs_lora": "True"' in meta["ss_network_args"]
    assert any(k.endswith(".lokr_w2_b") for k in keys)

    second = tmp_path / "out" / "second.safetensors"
    assert main([*map(str, common), "--output", str(second), "--steps", "2", "--network", "lokr",
                 "--lokr-factor", "2", "--rslora", "--network-weights", str(first)]) == 0
    meta2, keys2 = _meta_and_keys(second)
    assert keys2 == keys and meta2["ss_steps"] == "5" and meta2["emolora_steps_before"] == "3"
    assert meta2["emolora_network_weights"] == "first.safetensors"
    capsys.readouterr()

    # the wrong type names the file, the key and the flag that fits
    code = main([*map(str, common), "--output", str(tmp_path / "out" / "x.safetensors"), "--steps", "1",
                 "--network", "loha", "--network-weights", str(first)])
    err = capsys.readouterr().err
    assert code == 2 and "first.safetensors" in err and "is a lokr module but this network trains loha" in err
