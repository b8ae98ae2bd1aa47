"""Command line: `python -m trainer train|sweep|demo|presets|runs`.

Bad input (a missing file, a non-SDXL checkpoint, an unusable option value) prints one line,
"error: <message>", to stderr and exits with status 2; EMOLORA_DEBUG=1 shows the traceback instead.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("emolora")

# Errors that mean "the input is wrong", not "the program is wrong" (ConfigError, DatasetError, ModelError and
# LoRAError are ValueErrors).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _parse_set(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value  # a bare string
    return out


def _add_train_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The train command's options; sweep=True leaves out those the sweep has its own of (output, optimizer,
    resume, run name, optimizer loss)."""
    from .config import CHOICES

    p.add_argument("--model", help="SDXL checkpoint: single .safetensors file or diffusers folder")
    p.add_argument("--data", help="image folder (captions in same-name .txt/.caption files; N_name repeat folders)")
    if not sweep:
        p.add_argument("--output", help="the LoRA to write, FILE.safetensors")
        p.add_argument("--optimizer", help="EmoNavi (default), EmoFact, ..., AutoTrustGO, AdamW")
        p.add_argument("--optimizer-loss", dest="optimizer_loss", choices=["raw", "normalized", "withheld"],
                       help="the loss handed to the optimizer: raw (default), normalized (divided by a running mean "
                            "of the loss at the step's timesteps) or withheld (step() without it, as other "
                            "trainers call it)")
    p.add_argument("--lr", type=float, help="learning rate (EmoSens line: emoScope); default: the optimizer's preset")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--resolution", type=int, help="training resolution (bucket area = resolution²)")
    p.add_argument("--rank", type=int, help="LoRA rank (network dim)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: rank)")
    p.add_argument("--network", choices=list(CHOICES["network"]),
                   help="adapter type (default lora; LoCon on convs; oft = LyCORIS Diag-OFT, boft = butterfly OFT)")
    p.add_argument("--dora", action="store_true", default=None, help="weight-decomposed adapters (DoRA)")
    p.add_argument("--rslora", action="store_true", default=None, help="rank-stabilised scale alpha/sqrt(rank)")
    p.add_argument("--lokr-factor", type=int, dest="lokr_factor", help="LoKr factor (default -1: balanced)")
    p.add_argument("--tucker", action="store_true", default=None,
                   help="Tucker cores for the 3x3 conv adapters (LyCORIS use_tucker; needs conv_rank > 0)")
    p.add_argument("--oft-rescale", action="store_true", default=None, dest="oft_rescale",
                   help="network boft: train LyCORIS's per-channel rescale too")
    p.add_argument("--network-weights", dest="network_weights", metavar="FILE",
                   help="continue from a LoRA/LoHa/LoKr/OFT/BOFT file (ours, kohya's or LyCORIS's)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int)
    p.add_argument("--preset", action="append", help="preset name(s) from presets/ (repeat or comma-separate)")
    p.add_argument("--config", help="a JSON or TOML file of options")
    p.add_argument("--tokenizer", help="folder with tokenizer/ and tokenizer_2/ (or one CLIP tokenizer for both)")
    if not sweep:
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its saved state")
        p.add_argument("--run-name", dest="run_name")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--base-dtype", dest="base_dtype", choices=["auto", "bf16", "fp16", "fp32", "fp8"],
                   help="storage dtype of the frozen UNet weights (fp8: about half of bf16; auto: fp8 for an fp8 "
                        "checkpoint, else the compute dtype)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--save-every", type=int, dest="save_every", help="save the LoRA every N steps")
    p.add_argument("--sample-every", type=int, dest="sample_every", help="sample images every N steps")
    p.add_argument("--sample-prompt", action="append", dest="sample_prompts", help="a sample prompt (repeatable)")
    p.add_argument("--auto-stop", dest="auto_stop", choices=["stop", "mark", "off"],
                   help="what the optimizer's should_stop does")
    p.add_argument("--auto-stop-on", dest="auto_stop_on", choices=["should_stop", "val-plateau"],
                   help="what --auto-stop acts on (val-plateau: no new validation minimum for val_patience checks)")
    p.add_argument("--validation-split", type=float, dest="validation_split",
                   help="hold this share of the images out of training for a validation loss (e.g. 0.1)")
    p.add_argument("--validation-data", dest="validation_data", help="a folder of held-out validation images")
    p.add_argument("--validation-every", type=int, dest="validation_every", help="steps between validation losses")
    p.add_argument("--mask", choices=["off", "file", "alpha"],
                   help="masked loss: <stem>_mask.png beside each image (file) or the image's alpha channel")
    p.add_argument("--reg-data", dest="reg_data", metavar="DIR",
                   help="regularization (class) images, kohya's layout (N_class folders): as many samples per epoch "
                        "as the training images")
    p.add_argument("--prior-loss-weight", type=float, dest="prior_loss_weight",
                   help="the loss weight of a regularization sample (default 1.0)")
    p.add_argument("--max-bad-steps", type=int, dest="max_consecutive_bad_steps",
                   help="updates in a row that make the LoRA non-finite (rolled back) before stopping (default 3)")
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the UNet's transformer blocks (slower start, faster steps on a GPU)")
    # ---- low VRAM (issue 17)
    p.add_argument("--offload", metavar="none|blocks|blocks:N",
                   help="stream the UNet's down/mid/up blocks (or the N largest) from pinned host memory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other option (value parsed as JSON)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train SDXL LoRAs with the Emo optimizers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA")
    _add_train_options(p)
    _common(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sweep", help="train several optimizers on equal footing and compare their validation loss")
    p.add_argument("--optimizers", help="comma list (e.g. EmoNavi,EmoLynx,AdamW), 'all' or 'emo'")
    p.add_argument("--output", metavar="DIR", help="the sweep folder: sweep.json/.md/.png, runs/, loras/")
    p.add_argument("--resume", metavar="DIR", help="continue a stopped or killed sweep (other options are ignored)")
    p.add_argument("--loss-control", dest="loss_control", action="store_true",
                   help="each optimizer that reads the loss again with step() called without it")
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with this many seeds (default 1)")
    p.add_argument("--lr-scale", dest="lr_scale", default="1",
                   help="comma list of multiples of each optimizer's LR (e.g. 0.3,1,3)")
    p.add_argument("--optimizer-loss", dest="optimizer_loss", default="raw",
                   help="comma list of what the loss-reading optimizers are fed: raw, normalized (default raw)")
    _add_train_options(p, sweep=True)
    _common(p)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("demo", help="train on a tiny random SDXL and a generated dataset (cached), CPU-friendly")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--optimizer", default="EmoNavi")
    p.add_argument("--lr", type=float, default=1e-3, help="high on purpose: the loss moves within a few steps")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--output", help="default: <cache>/demo/demo-lora.safetensors")
    _common(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("presets", help="list presets")
    p.set_defaults(func=cmd_presets, verbose=False, threads=None)
    sub.add_parser("panel", help="the Gradio panel: live charts and controls of the runs in an output folder "
                                 "(--runs DIR, --port N, --host H --listen-all)")
    p = sub.add_parser("runs", help="list the runs in an output folder")
    p.add_argument("folder", help="an output folder (holding runs/) or a runs folder")
    p.set_defaults(func=cmd_runs, verbose=False, threads=None)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["panel"]:  # the panel parses its own flags
        return cmd_panel(argv[1:])
    args = build_parser().parse_args(argv)
    saved = log.handlers[:], log.level, log.propagate  # main() may run in-process (tests, the panel): undo
    _setup_logging(args.verbose)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("EMOLORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, I/O errors: not bad input, but still no traceback for users
        if os.environ.get("EMOLORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        log.handlers[:], log.level, log.propagate = saved


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if not verbose:  # the libraries' own config chatter is not for end users
        for name in ("transformers", "diffusers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


# ---- commands -------------------------------------------------------------------------------------------------
FLAG_KEYS = ("model", "data", "output", "optimizer", "lr", "steps", "resolution", "rank", "alpha", "batch_size",
             "grad_accum", "seed", "tokenizer", "resume", "run_name", "mixed_precision", "base_dtype", "device",
             "save_every", "sample_every", "sample_prompts", "auto_stop", "auto_stop_on", "validation_split",
             "validation_data", "validation_every", "mask", "network", "dora", "rslora", "lokr_factor", "tucker",
             "network_weights", "optimizer_loss", "max_consecutive_bad_steps", "compile", "offload",
             "oft_rescale", "reg_data", "prior_loss_weight")


def _overrides(args, skip=()) -> dict:
    """The config options given on the command line (flags and --set), paths made absolute."""
    flags = {k: getattr(args, k, None) for k in FLAG_KEYS if k not in skip}
    for k in ("model", "data", "output", "tokenizer", "resume", "validation_data", "network_weights", "reg_data"):
        if flags.get(k):
            flags[k] = str(Path(flags[k]).expanduser().resolve())
    return {**_parse_set(args.set), **{k: v for k, v in flags.items() if v is not None}}


def cmd_train(args) -> int:
    from .config import build_config, load_run_config

    overrides = _overrides(args)
    base = load_run_config(args.resume) if args.resume else None
    cfg = build_config(presets=args.preset or (), config_file=args.config, overrides=overrides, base=base)
    result = _run(cfg, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one summary, from rank 0 (its run store)
        _print_summary(result)
    return 0 if result.stop_reason in ("finished", "should_stop", "stopped") else 1


def cmd_sweep(args) -> int:
    from .config import ConfigError, build_config, load_config_file, load_preset
    from .sweep import plan_sweep, resume_plan, run_sweep

    if args.resume:
        plan = resume_plan(Path(args.resume).expanduser().resolve())
    else:
        for flag, value in (("--output", args.output), ("--optimizers", args.optimizers), ("--steps", args.steps)):
            if not value:
                raise ConfigError(f"sweep needs {flag}")
        try:
            scales = [float(x) for x in str(args.lr_scale).split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--lr-scale must be a comma list of numbers, got {args.lr_scale!r}") from None
        modes = [m.strip() for m in str(args.optimizer_loss).split(",") if m.strip()]
        out = Path(args.output).expanduser().resolve()
        overrides = _overrides(args, skip=("optimizer_loss",))
        base = build_config(presets=args.preset or (), config_file=args.config,
                            overrides={**overrides, "output": str(out / "loras" / "sweep.safetensors")})
        # What the user chose (presets, config file, flags) wins over each optimizer's own preset, as in `train`.
        explicit: dict = {}
        file_layer = load_config_file(args.config) if args.config else {}
        for name in _split_names(file_layer.pop("preset", None)) + _split_names(args.preset):
            explicit.update(load_preset(name))
        explicit.update(file_layer)
        explicit.update(overrides)
        plan = plan_sweep(base, args.optimizers, seeds=args.seeds, loss_control=args.loss_control,
                          optimizer_loss_modes=modes, lr_scales=scales, steps=args.steps, output_dir=out,
                          lr=args.lr, explicit=explicit)
    # progress: the sweep logs each run's start with the sweep's ETA; a bar per run on a terminal
    result = run_sweep(plan, progress_bar=not args.no_progress and sys.stderr.isatty())
    print(result.table_md)
    print(f"sweep: {plan.output_dir} (sweep.md, sweep.json, sweep.png)")
    print(result.recommendation)
    return 0 if result.status == "finished" else 1


def _split_names(value) -> list:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [v.strip() for v in items if v and v.strip()]


def _run(cfg, progress: bool):
    from .train import train

    return train(cfg, progress_bar=progress and sys.stderr.isatty())


def _print_summary(result) -> None:
    from .telemetry import validation_line

    s = result.summary
    lines = [f"LoRA: {result.lora_path}", f"run:  {result.run_dir}",
             f"steps: {result.steps_done} ({result.stop_reason}), skipped: {result.skipped_steps}"
             + (f", rolled back: {result.rolled_back}" if getattr(result, "rolled_back", 0) else "")]
    if getattr(result, "message", None):
        lines.append(result.message)  # e.g. diverged: the optimizer, the step and what to try
    if "loss_start" in s:
        lines.append(f"loss: {s['loss_start']:.4f} -> {s['loss_end']:.4f} (min {s['loss_min']:.4f})")
    if "eval_loss_start" in s:
        lines.append(f"eval loss (fixed batch): {s['eval_loss_start']:.4f} -> {s['eval_loss_end']:.4f}")
    if validation_line(s):
        lines.append(validation_line(s))
    if "emo_scalar_min" in s:
        lines.append(f"emo_scalar: {s['emo_scalar_min']:+.4f} .. {s['emo_scalar_max']:+.4f}")
    if s.get("loss_cv") is not None:
        fed = s.get("optimizer_loss_cv")
        line = f"per-step loss CV {s['loss_cv']:.3f}" + (
            f" (the optimizer's loss: {fed:.3f})" if fed is not None and fed != s["loss_cv"] else "")
        if s.get("update_ratio") is not None:
            line += f"; update/weight ratio {s['update_ratio']:.2g} a step"
        if s.get("zones"):
            line += "; zones: " + ", ".join(f"{z} {v:.0%}" for z, v in s["zones"].items())
        lines.append(line)
    if "emo_pulse_min" in s:
        lines.append(f"emo_pulse: {s['emo_pulse_min']:.3g} .. {s['emo_pulse_max']:.3g}")
    speed = f"{s['steps_per_s']:.2f} steps/s" if s.get("steps_per_s") else ""
    mem = f"peak memory {s['peak_mem_mb']:.0f} MiB" if s.get("peak_mem_mb") else ""
    if speed or mem:
        lines.append(", ".join(x for x in (speed, mem) if x))
    print("\n".join(lines))


def _cache_root() -> Path:
    from .cachedir import cache_root

    return Path(cache_root())


def demo_dataset(root: Path) -> Path:
    """The demo photos under root (trainer/data/demo.py; imported here lazily, cli stays import-light)."""
    from .data.demo import demo_dataset as build

    return build(root)


def cmd_demo(args) -> int:
    from .config import build_config
    from .model import tiny_model_path

    root = _cache_root() / "demo"
    t0 = time.time()
    model = tiny_model_path()
    data = demo_dataset(root)
    output = Path(args.output).expanduser().resolve() if args.output else root / "demo-lora.safetensors"
    cfg = build_config(overrides={
        "model": model, "data": str(data), "output": str(output), "optimizer": args.optimizer, "lr": args.lr,
        "steps": args.steps, "resolution": args.resolution, "bucket_step": 32, "rank": 8, "batch_size": 2,
        "eval_every": max(1, args.steps // 4), "eval_size": 4, "cache_dir": str(root / "cache"),
        "cache_latents": "disk", "cache_text": "disk", "gradient_checkpointing": False, "auto_stop": "mark",
        "save_dtype": "fp16", "device": "cpu",
    })
    log.info("demo: tiny random SDXL %s, data %s", model, data)
    result = _run(cfg, progress=not args.no_progress)
    _print_summary(result)
    print(f"demo took {time.time() - t0:.1f}s")
    return 0


def cmd_presets(args) -> int:
    from .config import list_presets

    for p in list_presets():
        print(f"{p['name']:<26} {p['kind']:<9} {p['description']}")
    return 0


def cmd_runs(args) -> int:
    from .runstore import RunReader, run_state, unfinished_runs

    runs = RunReader.list_runs(args.folder)
    if not runs:
        print(f"no runs in {args.folder}")
    resumable = {r["name"]: r["step"] for r in unfinished_runs(args.folder)}
    for r in runs:  # a run whose process is gone shows as interrupted; one that can continue says from where
        more = f"  (--resume continues from step {resumable[r['name']]})" if r["name"] in resumable else ""
        print(f"{r['name']:<40} {run_state(r):<11} {r.get('optimizer', '?'):<14} "
              f"step {r.get('steps_done', '?')}/{r.get('steps_total', '?')}  {r['run_dir']}{more}")
    return 0


def cmd_panel(argv) -> int:
    import importlib

    pack = __package__.rpartition(".")[0] or load_pack().__name__  # <pack>.trainer, or trainer at top level
    return importlib.import_module(f"{pack}.web.panel").main(argv)


def load_pack(name: str = "emolora"):
    """The repository as the package ComfyUI loads it (web.panel and nodes import the trainer relatively), for
    `python -m trainer panel` run from the repository, where trainer is top-level."""
    import importlib.util

    if name not in sys.modules:
        root = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
