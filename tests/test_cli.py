import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import make_dataset
from safetensors.torch import save_file

from trainer.cli import main

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", n=2)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    for n in needles:
        assert str(n) in line, (n, line)


def test_missing_model_file(tmp_path, data, capsys):
    missing = tmp_path / "nope.safetensors"
    code, _, err = run_cli(capsys, "train", "--model", missing, "--data", data, "--output", tmp_path / "o.safetensors")
    assert_clean_error(code, err, "model not found", missing)


def test_missing_network_weights_and_validation_folder_fail_before_the_model_loads(tmp_path, data, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not even read")  # a load would fail on it: the missing files are reported first
    base = ("train", "--model", model, "--data", data, "--output", tmp_path / "o.safetensors")
    code, _, err = run_cli(capsys, *base, "--network-weights", tmp_path / "old.safetensors")
    assert_clean_error(code, err, "network_weights not found", tmp_path / "old.safetensors")
    code, _, err = run_cli(capsys, *base, "--validation-data", tmp_path / "val")
    assert_clean_error(code, err, "not found", tmp_path / "val")


def test_tucker_flag_reaches_the_config_and_its_limits_are_named(tmp_path, data, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not even read")
    base = ("train", "--model", model, "--data", data, "--output", tmp_path / "o.safetensors", "--tucker")
    code, _, err = run_cli(capsys, *base)
    assert_clean_error(code, err, "tucker needs conv_rank > 0")
    code, _, err = run_cli(capsys, *base, "--network", "lokr", "--set", "conv_rank=4")
    assert_clean_error(code, err, "tucker works with network lora or loha")


def test_missing_data_folder_fails_before_the_model_loads(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not even read")
    code, _, err = run_cli(capsys, "train", "--model", model, "--data", tmp_path / "imgs", "--output",
                           tmp_path / "o.safetensors")
    assert_clean_error(code, err, "data folder not found", tmp_path / "imgs")


def test_non_sdxl_checkpoint_names_the_file(tmp_path, data, capsys):
    model = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(model))
    out = tmp_path / "out" / "o.safetensors"
    code, _, err = run_cli(capsys, "train", "--model", model, "--data", data, "--output", out)
    assert_clean_error(code, err, model, "SDXL")
    assert not (tmp_path / "out").exists()  # no run folder for a checkpoint that never loaded


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank must be >= 1"),
    (["--optimizer", "EmoNavy"], "did you mean 'EmoNavi'"),
    (["--set", "resolutoin=512"], "unknown option 'resolutoin'"),
    (["--preset", "charcter"], "unknown preset 'charcter'"),
    (["--set", "lr"], "--set expects KEY=VALUE"),
    (["--config", "/nonexistent/run.toml"], "config file not found"),
])
def test_bad_option_values(tmp_path, data, capsys, args, needle):
    code, _, err = run_cli(capsys, "train", "--model", tmp_path / "m.safetensors", "--data", data,
                           "--output", tmp_path / "o.safetensors", *args)
    assert_clean_error(code, err, needle)


def test_output_must_be_safetensors_and_argparse_types(tmp_path, data, capsys):
    code, _, err = run_cli(capsys, "train", "--model", tmp_path / "m.safetensors", "--data", data, "--output",
                           tmp_path / "o.ckpt")
    assert_clean_error(code, err, "output must be a .safetensors", "o.ckpt")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--lr", "fast"])
    assert exc.value.code == 2 and "invalid float value: 'fast'" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path)
    assert_clean_error(code, err, "not a run folder", tmp_path)


def test_presets_command_lists_them(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0 and "autotrustgo-bold" in out and "character" in out and "emonavi" in out


@pytest.mark.slow
def test_demo_runs_end_to_end_as_a_module(tmp_path):
    env = {**os.environ, "EMOLORA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer", "demo", "--steps", "12", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    lora = Path(lines[0].removeprefix("LoRA: "))
    assert lora.is_file() and lora.suffix == ".safetensors"
    assert any(ln.startswith("loss: ") and "->" in ln for ln in lines)
    assert any(ln.startswith("emo_scalar: ") for ln in lines)
    assert "Traceback" not in proc.stderr
    # the CLI's train command on the same cached model and data, with a run listing afterwards
    cache = tmp_path / "cache"
    model = next((cache / "models").glob("*.safetensors"))
    data = next((cache / "demo").glob("demo-data-*"))
    out = tmp_path / "cli" / "x.safetensors"
    cmd = [sys.executable, "-m", "trainer", "train", "--model", str(model), "--data", str(data), "--output",
           str(out), "--steps", "2", "--resolution", "64", "--rank", "4", "--threads", "1",
           "--set", "bucket_step=32", "--set", "gradient_checkpointing=false", "--optimizer", "EmoLynx"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "steps: 2 (finished)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "trainer", "runs", str(tmp_path / "cli")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "finished" in proc.stdout and "EmoLynx" in proc.stdout
