"""What the optimizer feels on a base whose loss swings with the timestep: raw vs normalized optimizer loss.

    python benchmarks/optimizer_loss_cv.py [--optimizers EmoNavi,EmoSens] [--steps 100] [--threads 1]

Trains on the pretrained tiny base (trainer/model/pretrained.py: the tiny SDXL's UNet fine-tuned on the demo
photos, built into the cache on first use) with the tests' generated dataset (6 images, 64 px, rank 4, batch 2,
seed 1), each optimizer at its preset LR with optimizer_loss raw and normalized, and prints per run the CV of the
raw step loss, the CV of the loss the optimizer got, and the share of steps in each of its zones.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="EmoNavi,EmoSens")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from _trainer_helpers import tiny_config  # noqa: I001 (trainer.model.pretrained: branch surfaces)

    from trainer.model.pretrained import pretrained_tiny_model_path
    from trainer.sweep.plan import parse_optimizer_list, preset_settings
    from trainer.train import train

    tmp = Path(tempfile.mkdtemp(prefix="optimizer-loss-cv-"))
    out = []
    for opt in parse_optimizer_list(args.optimizers):
        for mode in ("raw", "normalized"):
            cfg = tiny_config(tmp / f"{opt}-{mode}", steps=args.steps, optimizer=opt,
                              lr=preset_settings(opt).get("lr"), optimizer_loss=mode)
            s = train(cfg.replace(model=pretrained_tiny_model_path())).summary
            rec = {"optimizer": opt, "lr": cfg.lr, "optimizer_loss": mode, "loss_cv": s["loss_cv"],
                   "optimizer_loss_cv": s["optimizer_loss_cv"], "zones": s["zones"]}
            out.append(rec)
            zones = ", ".join(f"{z} {v:.0%}" for z, v in rec["zones"].items())
            print(f"{opt:<12} lr {cfg.lr:<8g} {mode:<10} loss CV {rec['loss_cv']:.3f}  fed CV "
                  f"{rec['optimizer_loss_cv']:.3f}  {zones}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
