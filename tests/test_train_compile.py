"""--compile: regional torch.compile of the UNet's transformer blocks trains the tiny model (CPU, inductor)."""

import math
import shutil

import pytest
from _trainer_helpers import tiny_config
from conftest import require

from trainer.runstore import RunReader
from trainer.train import Trainer, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_compiled_blocks_train_like_eager(tmp_path):
    require(shutil.which("gcc") or shutil.which("cc"), "torch.compile's inductor needs a C compiler on the CPU")
    from diffusers.models.attention import BasicTransformerBlock

    eager = train(tiny_config(tmp_path / "eager", steps=2, optimizer="AdamW", lr=1e-4))
    t = Trainer(tiny_config(tmp_path / "compiled", steps=2, optimizer="AdamW", lr=1e-4, compile=True))
    try:
        t.setup()
        blocks = [m for m in t.model.unet.modules() if isinstance(m, BasicTransformerBlock)]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert not any(m._compiled_call_impl is not None for m in t.model.unet.modules()
                       if not isinstance(m, BasicTransformerBlock))  # regional: only the blocks
        compiled = t.run()
    finally:
        t.close()
    assert compiled.stop_reason == "finished"
    a = {r["step"]: r["loss"] for r in RunReader(eager.run_dir).steps()}
    b = {r["step"]: r["loss"] for r in RunReader(compiled.run_dir).steps()}
    assert a.keys() == b.keys() == {1, 2}
    # Another code path (inductor's fused kernels): close to eager, not bit-equal.
    assert all(math.isclose(a[s], b[s], rel_tol=1e-3) for s in a), (a, b)
