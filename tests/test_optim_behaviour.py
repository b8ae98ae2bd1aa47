"""The deliberate differences from upstream (optimizers.md Part 1), each proven on real optimizer steps."""

import io
import logging
import math

import pytest
import torch

from trainer.optim import OPTIMIZER_INFO, OPTIMIZERS, EmoPulseScheduler, create_optimizer, takes_loss

NAMES = sorted(OPTIMIZERS)
GEN2 = {"EmoSens", "EmoAiry", "EmoCats", "EmoTion", "EmoVoid"}
SHADOW = {"EmoNavi", "EmoFact", "EmoLynx", "EmoClan", "EmoZeal", "EmoNeco"} | GEN2


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return {"w": torch.randn(12, 6, dtype=dtype, requires_grad=True),
            "conv": torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=True),
            "b": torch.randn(12, dtype=dtype, requires_grad=True),
            "g": torch.ones(1, dtype=dtype, requires_grad=True)}


def loss_of(params, t):
    gen = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(16, 6, generator=gen).to(params["w"].dtype)
    im = torch.randn(16, 3, 5, 5, generator=gen).to(params["w"].dtype)
    y = torch.tanh(x @ params["w"].T + params["b"]) * params["g"]
    c = torch.nn.functional.conv2d(im, params["conv"]).mean(dim=(1, 2, 3))
    return ((y.sum(dim=1) * 0.1 + c - 0.5) ** 2).mean().float()


def make(name, params, **kw):
    if name in GEN2:
        kw.setdefault("lr", 0.5)
    return OPTIMIZERS[name](list(params.values()), **kw)


def train(opt, params, steps, start=1, horizon=None):
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(params, t)
        loss.backward()
        if isinstance(opt, OPTIMIZERS["RefAdamWminiScheduleFree"]):
            opt.step(loss=loss.item(), max_steps=horizon or start + steps)
        else:
            opt.step(loss=loss.item())


@pytest.mark.parametrize("name", NAMES)
def test_closure_that_calls_backward_works(name):
    params = model()
    opt = make(name, params)
    before = {k: v.detach().clone() for k, v in params.items()}

    def closure():
        opt.zero_grad()
        loss = loss_of(params, 1)
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert torch.is_tensor(returned) and returned.item() == pytest.approx(loss_of(before, 1).item())
    assert any(not torch.equal(before[k], params[k].detach()) for k in params)
    if name != "AutoTrustGO":
        assert opt.telemetry["loss"] == pytest.approx(returned.item())


def test_importing_the_family_never_patches_backward():
    import importlib
    import sys

    original = torch.Tensor.backward
    for mod in [m for m in list(sys.modules) if m.startswith("trainer.optim")]:
        importlib.reload(sys.modules[mod])
    assert torch.Tensor.backward is original
    assert not hasattr(torch.optim.Optimizer, "_manual_loss")


def test_emoneco_survives_300_golden_steps_through_its_softsign_zone(golden_dir):
    from problem import Problem

    prob = Problem(0, "small")
    opt = OPTIMIZERS["EmoNeco"](list(prob.params.values()))
    modes = set()
    for t in range(1, 301):
        opt.zero_grad(set_to_none=True)
        loss = prob.loss(t)
        loss.backward()
        opt.step(loss=loss.item())
        modes.add(opt.telemetry["mode"])
    assert "softsign" in modes  # where upstream raises NameError('eps')
    assert all(torch.isfinite(p).all() for p in prob.params.values())


def test_refadamw_injection_skips_a_parameter_that_never_had_a_gradient():
    params = model()
    frozen = torch.randn(5, requires_grad=True)
    opt = OPTIMIZERS["RefAdamWminiScheduleFree"](list(params.values()) + [frozen])
    before = frozen.detach().clone()
    train(opt, params, 10)  # max_steps=11 puts steps 3..8 in the middle: injection runs there
    assert opt.telemetry["ref_inject"] is False  # step 10 of 11 is past the middle
    assert torch.equal(frozen, before) and frozen not in opt.state


def test_refadamw_validation_history_does_not_index_past_its_start():
    params = model()
    opt = OPTIMIZERS["RefAdamWminiScheduleFree"](list(params.values()))
    for t, val in enumerate([3.0, 2.0, 1.5, 1.2], start=1):  # upstream: IndexError on the second step
        loss_of(params, t).backward()
        opt.step(loss=1.0, max_steps=100, val_loss=val)
        opt.zero_grad()


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_finite_parameters(name):
    params = model()
    opt = make(name, params, **({"use_shadow": True} if name in SHADOW else {}))
    for t in range(1, 40):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step(loss=1.0 / t)
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all(math.isfinite(v) for v in opt.telemetry.values() if isinstance(v, float))


def kwargs_for(name):
    return {"use_shadow": True} if name in SHADOW else {}


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_dict_is_bit_identical(name, foreach):
    kw = {**kwargs_for(name), "foreach": foreach}
    straight = model()
    opt = make(name, straight, **kw)
    train(opt, straight, 40, horizon=41)

    resumed = model()
    first = make(name, resumed, **kw)
    train(first, resumed, 17, horizon=41)
    buf = io.BytesIO()
    torch.save({"params": {k: v.detach() for k, v in resumed.items()}, "opt": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh_params = {k: v.clone().requires_grad_(True) for k, v in saved["params"].items()}
    second = make(name, fresh_params, **kw)
    second.load_state_dict(saved["opt"])
    train(second, fresh_params, 23, start=18, horizon=41)
    for k in straight:
        assert torch.equal(straight[k], fresh_params[k]), k
    assert second.should_stop == opt.should_stop
    assert second.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_keep_float32_state_through_a_reload(name):
    params = model(dtype=torch.bfloat16)
    opt = make(name, params, **kwargs_for(name))
    train(opt, params, 3)
    floats = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype in (torch.float32, torch.float64) for v in floats)
    again = make(name, params, **kwargs_for(name))
    again.load_state_dict(opt.state_dict())
    reloaded = [v for st in again.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(v.dtype in (torch.float32, torch.float64) for v in reloaded)
    assert all(p.dtype == torch.bfloat16 for p in params.values())


def test_bf16_state_can_follow_the_parameter_dtype_when_asked():
    params = model(dtype=torch.bfloat16)
    opt = make("EmoNavi", params, state_dtype="param")
    train(opt, params, 2)
    assert {v.dtype for st in opt.state.values() for v in st.values()} == {torch.bfloat16}


def test_bf16_second_moment_does_not_stagnate():
    """Upstream's bf16 exp_avg_sq with beta2=0.995 sticks near 0.5 for a constant g^2 = 1 (optimizers.md §1i)."""
    p = torch.zeros(64, dtype=torch.bfloat16, requires_grad=True)
    opt = OPTIMIZERS["EmoNavi"]([p], lr=0.0, weight_decay=0.0)
    for _ in range(3000):
        p.grad = torch.ones_like(p)
        opt.step(loss=1.0)
    assert opt.state[p]["exp_avg_sq"].mean().item() == pytest.approx(1.0, abs=1e-3)


class Writer:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


@pytest.mark.parametrize("name", ["EmoNavi", "EmoFact", "EmoLynx"])
def test_writer_receives_the_upstream_tags(name):
    params, writer = model(), Writer()
    opt = make(name, params, writer=writer)  # upstream EmoLynx raises NameError here
    train(opt, params, 3)
    tags = {t for t, _, _ in writer.calls}
    assert tags == {"emoLR/base", "emoLR/Turbo", "emostate/emoDrive", "emostate/scalar"}
    assert [s for t, _, s in writer.calls if t == "emoLR/base"] == [1, 2, 3]
    last = {t: v for t, v, s in writer.calls if s == 3}
    assert last["emoLR/Turbo"] == pytest.approx(last["emoLR/base"] * last["emostate/emoDrive"])
    assert last["emostate/scalar"] == opt.telemetry["emo_scalar"]


def test_writer_gets_telemetry_for_the_others():
    params, writer = model(), Writer()
    opt = make("EmoSens", params, writer=writer)
    train(opt, params, 2)
    assert ("emo/emo_pulse", opt.telemetry["emo_pulse"], 2) in writer.calls


@pytest.mark.parametrize("name", NAMES)
def test_telemetry_has_the_documented_signals_as_python_values(name):
    params = model()
    opt = make(name, params)
    train(opt, params, 5)
    tel = opt.telemetry
    assert set(OPTIMIZER_INFO[name].signals) <= set(tel)
    assert all(isinstance(v, (bool, int, float, str)) for v in tel.values())
    assert tel["should_stop"] == bool(opt.should_stop)


def test_emo_family_feels_the_loss():
    params = model()
    opt = make("EmoNavi", params)
    scalars = []
    for t in range(1, 30):
        opt.zero_grad()
        loss = loss_of(params, t) * (3.0 if t > 15 else 1.0)  # a jump the emotion must notice
        loss.backward()
        opt.step(loss=loss.item())
        scalars.append(opt.telemetry["emo_scalar"])
    assert max(abs(s) for s in scalars) > 0.1
    assert min(scalars[15:]) < -0.1  # a rising loss is negative in the v3.6 convention


def test_missing_loss_warns_once_and_counts_as_zero(caplog):
    params = model()
    opt = make("EmoNavi", params)
    with caplog.at_level(logging.WARNING, logger="emolora.optim"):
        for t in range(1, 4):
            loss_of(params, t).backward()
            opt.step()
    assert sum("got no loss" in r.message for r in caplog.records) == 1
    assert opt.telemetry["emo_scalar"] == 0.0 and opt.telemetry["emo_drive"] == 1.0


def test_non_finite_loss_skips_the_step_and_counts_it():
    params = model()
    opt = make("EmoSens", params)
    train(opt, params, 3)
    before = {k: v.detach().clone() for k, v in params.items()}
    lr = opt.param_groups[0]["lr"]
    loss_of(params, 4).backward()
    opt.step(loss=float("nan"))
    assert opt.skipped_nonfinite == 1
    assert all(torch.equal(before[k], params[k]) for k in params)
    assert opt.param_groups[0]["lr"] == lr


# per-parameter full-size state tensors, as optimizers.md Part 2 §16 lists them (our deviations documented)
FULL_SIZE = {"EmoNavi": (2, 2), "EmoFact": (0, 1), "EmoLynx": (1, 1), "EmoZeal": (0, 2), "EmoNeco": (1, 1),
             "EmoSens": (2, 2), "EmoAiry": (0, 1), "EmoCats": (1, 1), "EmoTion": (1, 1), "EmoVoid": (0, 0),
             "RefAdamWminiScheduleFree": (2, 2), "AutoTrustGO": (3, 3)}  # (>=2-D, 1-D); AutoTrustGO: 2 + int8


@pytest.mark.parametrize("name,shadow", [(n, False) for n in sorted(FULL_SIZE)] +
                         [(n, True) for n in sorted(FULL_SIZE) if n in SHADOW])
def test_state_memory_per_parameter(name, shadow):
    params = model()
    opt = make(name, params, **({"use_shadow": True} if shadow else {}))
    train(opt, params, 200 if shadow else 2)  # long enough for SH30's first blend to create the shadow
    for key, p in params.items():
        full = [k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape and v.numel() > 1]
        want = FULL_SIZE[name][0 if p.dim() >= 2 else 1] + (1 if shadow and "shadow" in opt.state[p] else 0)
        if key != "g":  # a one-element tensor is 'full size' under any rule
            assert len(full) == want, (key, full)
    if shadow and name in GEN2 | {"EmoNavi", "EmoFact", "EmoLynx"}:
        assert all("shadow" in opt.state[p] for p in params.values())


def test_emoclan_creates_phase_states_lazily():
    params = model()
    opt = make("EmoClan", params)
    phase_keys = {"navi": {"exp_avg_navi", "exp_avg_sq_navi"}, "lynx": {"exp_avg_lynx"},
                  "fact": {"exp_avg_r_fact", "exp_avg_c_fact"}}
    seen = set()
    for t in range(1, 30):
        train(opt, params, 1, start=t)
        seen.add(opt.telemetry["phase"])
        assert set(opt.state[params["w"]]) == set().union(*(phase_keys[p] for p in seen))
    assert len(seen) >= 2  # this loss moves enough to switch phases


@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_per_tensor_paths_agree(name):
    a, b = model(), model()
    oa, ob = make(name, a, foreach=False), make(name, b, foreach=True)
    train(oa, a, 20)
    train(ob, b, 20)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_fused_adam_path_matches_the_exact_one_closely():
    a, b = model(), model()
    oa, ob = make("EmoNavi", a), make("EmoNavi", b, fused=True)
    train(oa, a, 20)
    train(ob, b, 20)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_emopulse_scheduler_drives_adamw_and_resumes():
    params = model()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    sched = EmoPulseScheduler(opt, base_lr=1.0)
    lrs = []
    for t in range(1, 12):
        opt.zero_grad()
        loss = loss_of(params, t)
        loss.backward()
        opt.step()
        lrs.append(sched.step(loss.item()))
    assert opt.param_groups[0]["lr"] == lrs[-1] and 1e-8 <= min(lrs) and max(lrs) <= 3e-3
    assert len(set(lrs)) > 1
    again = EmoPulseScheduler(opt, base_lr=1.0)
    again.load_state_dict(sched.state_dict())
    assert again.step(0.5) == sched.step(0.5)


def test_create_optimizer_and_takes_loss():
    params = list(model().values())
    assert isinstance(create_optimizer("AdamW", params, lr=1e-4), torch.optim.AdamW)
    opt = create_optimizer("EmoNavi", params, lr=1e-4, betas=[0.9, 0.99])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and takes_loss(opt)
    assert not takes_loss(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="unknown optimizer 'EmoNope'"):
        create_optimizer("EmoNope", params)
    assert set(OPTIMIZER_INFO) == set(OPTIMIZERS) | {"AdamW"}


def test_reading_the_metadata_does_not_import_torch():
    """The nodes and the panel read OPTIMIZER_INFO at start-up; the optimizers (and torch) load on first use."""
    import subprocess
    import sys

    code = ("import sys, trainer.optim as o; n = len(o.OPTIMIZER_INFO); assert 'torch' not in sys.modules, 'torch'; "
            "assert len(o.OPTIMIZERS) == 13 and 'torch' in sys.modules; print(n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0 and out.stdout.strip() == "14", out.stderr
