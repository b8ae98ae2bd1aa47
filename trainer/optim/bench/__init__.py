"""Benchmark the optimizer family on an SDXL-UNet-LoRA-shaped parameter set.

    python -m trainer.optim.bench [--device cpu|cuda] [--rank 16] [--steps 12] [--passes 3] [--threads N]
                                  [--quick] [--json PATH] [--only LABELS] [--no-external] [--mallopt]
    python -m trainer.optim.bench --dispatch [--rank 16] [--only NAMES]    (aten ops per foreach step)

The parameter set is the one kohya's sd-scripts trains for an SDXL UNet LoRA: every nn.Linear inside each
Transformer2DModel of the SDXL base UNet (722 modules), each as a down (rank x in) and an up (out x rank)
float32 tensor, with fixed random gradients. For every optimizer it reports the median step time, the ratio
to torch.optim.AdamW (foreach=False and fused=True), the host syncs one step makes and the optimizer state
size relative to the parameters, and checks the targets of the speed issue:

    Adam-type <= 1.0x AdamW(foreach=False); sign/Lion types <= 0.8x; AutoTrustGO <= 2.0x;
    <= 1 host sync per step for all of ours; stretch: fused path <= 1.5x AdamW(fused=True).

The machine is shared, so every row is rebuilt and timed in several passes (alternating order); ms/step is the
median over all passes, and the ratios are paired: each timed block is bracketed by steps of long-lived AdamW
baselines, so a row is compared with the baseline under the same load.

Host syncs are counted on the CPU by wrapping torch.Tensor.item / tolist / __bool__ / __float__ / __int__ /
__index__ / cpu / numpy while our step() runs (the loss passed as a python float; one more step with a 0-dim tensor loss
gives the "+1"), on CUDA by torch.cuda.set_sync_debug_mode("warn").
"""

from .cli import main, run
from .shapes import EXPECTED_MODULES, EXPECTED_PARAMS_R16, lora_shapes
from .syncs import SyncCounter
from .timing import Bench, make_losses

# run/main: the entry points; the rest is used by tests/test_optim_bench.py and benchmarks/profile_optim.py
__all__ = ["Bench", "EXPECTED_MODULES", "EXPECTED_PARAMS_R16", "SyncCounter", "lora_shapes", "main", "make_losses",
           "run"]
