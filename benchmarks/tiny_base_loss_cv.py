"""How the per-step training loss varies on the random tiny model and on the pretrained tiny base.

    python benchmarks/tiny_base_loss_cv.py                     # build (if missing) and measure, default cache
    python benchmarks/tiny_base_loss_cv.py --rebuild --threads 2

Times the pretrained base's build (trainer/model/pretrained.py) when it is missing or --rebuild is given, then
trains a LoRA on the demo photos with the real trainer (AdamW at a tiny LR, so the base's loss is what is
measured, not learning) on both bases, and prints the coefficient of variation (std / mean) of the per-step loss
that the optimizer is handed, at each resolution and batch size asked for. Random timesteps, as in training.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_losses(model: str, workdir: Path, *, steps: int, resolution: int, batch_size: int, seed: int) -> list[float]:
    from trainer.config import TrainConfig
    from trainer.data.demo import demo_dataset, demo_root
    from trainer.runstore import RunReader
    from trainer.train import train

    cfg = TrainConfig(model=model, data=str(demo_dataset(demo_root())), output=str(workdir / "lora.safetensors"),
                      resolution=resolution, bucket_step=32, rank=4, batch_size=batch_size, steps=steps,
                      seed=seed, optimizer="AdamW", lr=1e-6, gradient_checkpointing=False, device="cpu",
                      save_dtype="fp32").validate()
    result = train(cfg)
    reader = RunReader(result.run_dir)
    try:
        return [r["loss"] for r in reader.steps(since=0)]
    finally:
        reader.close()


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    ap.add_argument("--resolutions", default="64,128")
    ap.add_argument("--batch-sizes", default="1,2")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rebuild", action="store_true", help="build the pretrained base again (into a temp file)")
    args = ap.parse_args()

    import torch

    from trainer.model import build_pretrained_tiny, pretrained_tiny_model_path, tiny_model_path
    from trainer.model.pretrained import PRETRAINED_VERSION

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, base {PRETRAINED_VERSION}")
    tmp = Path(tempfile.mkdtemp(prefix="emolora-cv-"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    pretrained = (build_pretrained_tiny(tmp / "pretrained.safetensors") if args.rebuild
                  else pretrained_tiny_model_path())
    print(f"pretrained base ready in {time.perf_counter() - t0:.1f}s wall, {time.process_time() - cpu0:.1f}s CPU: "
          f"{pretrained}")
    print(f"{'base':<11} {'res':>4} {'batch':>5} {'steps':>5} {'loss mean':>9} {'loss CV':>7}")
    for res in map(int, args.resolutions.split(",")):
        for bs in map(int, args.batch_sizes.split(",")):
            for name, path in (("random", tiny_model_path()), ("pretrained", pretrained)):
                work = tmp / f"{name}-{res}-{bs}"
                losses = step_losses(path, work, steps=args.steps, resolution=res, batch_size=bs, seed=args.seed)
                print(f"{name:<11} {res:>4} {bs:>5} {len(losses):>5} {statistics.mean(losses):>9.4f} "
                      f"{cv(losses):>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
