"""A torchrun worker for tests/test_distributed.py: trains from a config file, optionally breaking lockstep.

    python -m torch.distributed.run --nproc_per_node=2 tests/_dist_worker.py CONFIG.json desync

'desync': after 2 steps rank 1 nudges one LoRA weight, as a rank-local bug would; the next save must refuse.
Each rank prints what its cache filling encoded (ENCODED rank=.. latents=.. text=..).
"""

import sys

import torch

from trainer.config import TrainConfig
from trainer.train import Trainer


def main(config_path: str, mode: str) -> int:
    import json

    torch.set_num_threads(1)
    _report_encodes()
    cfg = TrainConfig(**json.loads(open(config_path, encoding="utf-8").read())).validate()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.run(until_step=2)
        if mode == "desync" and trainer.dist.rank == 1:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] += 1e-3
        trainer.run()
    finally:
        trainer.close()
    return 0


def _report_encodes() -> None:
    """Print what this rank's cache filling encoded (the test checks only rank 0 encodes)."""
    import os

    from trainer.data import TrainingData

    fill = TrainingData.fill_caches

    def counted(self, *args, **kwargs):
        encoded = fill(self, *args, **kwargs)
        print(f"ENCODED rank={os.environ['RANK']} latents={encoded['latents']} text={encoded['text']}", flush=True)
        return encoded

    TrainingData.fill_caches = counted


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
