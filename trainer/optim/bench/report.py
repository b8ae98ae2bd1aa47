"""Results: robust medians and paired ratios, the speed/sync targets and the markdown report."""

import math
import statistics

import torch

from .. import OPTIMIZERS
from .rows import FOREACH_COMPARE
from .shapes import EXPECTED_MODULES, EXPECTED_PARAMS_R16

TARGETS = {"adam": 1.0, "sign": 0.8, "lion": 0.8, "momentum": 2.0}
FUSED_STRETCH = 1.5


def _fmt_ms(x):
    return "-" if x is None else f"{x:.1f}"


def _fmt_x(x):
    return "-" if x is None else f"{x:.2f}x"


def robust_times(times, cpu, single_thread):
    """Wall times without the steps where the single compute thread was descheduled by other load.

    With one torch thread, a step whose wall time exceeds its process CPU time by more than 15% (+0.5 ms) spent
    that time waiting for a core, not computing; on a shared machine those steps are dropped (when at least a
    third of the samples remain). With more threads CPU time cannot tell, and every sample is kept.
    """
    if not single_thread:
        return list(times), 0
    keep = [w for w, c in zip(times, cpu) if w <= 1.15 * c + 5e-4]
    if len(keep) >= max(2, len(times) / 3):
        return keep, len(times) - len(keep)
    return list(times), 0


def summarize(rows, recs, param_bytes, single_thread=False):
    base, dropped = {}, {}
    for r in rows:
        rec = recs[r.label]
        if rec.get("times"):
            kept, dropped[r.label] = robust_times(rec["times"], rec["cpu_times"], single_thread)
            base[r.label] = statistics.median(kept) * 1e3
    ref_pt, ref_fused = base.get("AdamW(foreach=False)"), base.get("AdamW(fused=True)")
    out = []

    def paired(rec, ref_label):
        ratios = [m / refs[ref_label] for m, refs in zip(rec.get("pass_medians", []), rec.get("pass_refs", []))
                  if refs.get(ref_label)]
        return statistics.median(ratios) if ratios else None

    for r in rows:
        rec = recs[r.label]
        ms = base.get(r.label)
        syncs = max(rec["syncs_by_step"][:2]) if rec.get("syncs_by_step") else None
        syncs_t = rec["syncs_by_step"][2] if rec.get("syncs_by_step") and len(rec["syncs_by_step"]) > 2 else None
        sb = max(rec.get("state_bytes_2", 0), rec.get("state_bytes_end", 0))
        res = {"label": r.label, "section": r.section, "name": r.name, "ours": r.ours, "family": r.family,
               "ms": ms, "ms_samples": [t * 1e3 for t in rec.get("times", [])],
               "cpu_ms_median": statistics.median(rec["cpu_times"]) * 1e3 if rec.get("cpu_times") else None,
               "pass_medians_ms": [t * 1e3 for t in rec.get("pass_medians", [])],
               "samples_dropped_descheduled": dropped.get(r.label, 0),
               "minor_faults_per_step": statistics.median(rec["minor_faults"]) if rec.get("minor_faults") else None,
               "x_adamw_foreach_false": paired(rec, "AdamW(foreach=False)"),
               "x_adamw_fused": paired(rec, "AdamW(fused=True)"),
               "x_adamw_foreach_false_unpaired": ms / ref_pt if ms and ref_pt else None,
               "x_adamw_fused_unpaired": ms / ref_fused if ms and ref_fused else None,
               "pass_ref_ms": [{k: v * 1e3 for k, v in refs.items()} for refs in rec.get("pass_refs", [])],
               "syncs_per_step": syncs, "syncs_tensor_loss": syncs_t,
               "syncs_extra_tensor_loss": None if syncs is None or syncs_t is None else syncs_t - syncs,
               "sync_methods": dict(rec.get("sync_methods", {})),
               "state_bytes": sb, "state_per_param_bytes": sb / param_bytes,
               "modes": dict(rec.get("modes", {})), "note": r.note}
        out.append(res)
    return out


def check_targets(results):
    checks = []
    by = {r["label"]: r for r in results}
    for name in OPTIMIZERS:
        r = by.get(name)
        if r is None or r["x_adamw_foreach_false"] is None:
            continue
        fam = r["family"]
        limit = TARGETS.get(fam)
        if limit is None:
            dom = max(r["modes"], key=r["modes"].get) if r["modes"] else "?"
            checks.append({"check": f"{name} ({fam}, dominant rule: {dom})", "value": r["x_adamw_foreach_false"],
                           "limit": None, "status": "REPORT"})
            continue
        checks.append({"check": f"{name} ({fam}) <= {limit:.1f}x AdamW(foreach=False)",
                       "value": r["x_adamw_foreach_false"], "limit": limit,
                       "status": "PASS" if r["x_adamw_foreach_false"] <= limit else "MISS"})
    for r in results:
        if r["ours"] and r["syncs_per_step"] is not None and r["section"] != "foreach":
            checks.append({"check": f"{r['label']} host syncs/step <= 1", "value": r["syncs_per_step"], "limit": 1,
                           "status": "PASS" if r["syncs_per_step"] <= 1 else "MISS"})
    for r in results:
        if r["section"] == "fused" and r["x_adamw_fused"] is not None:
            checks.append({"check": f"stretch: {r['label']} <= {FUSED_STRETCH}x AdamW(fused=True)",
                           "value": r["x_adamw_fused"], "limit": FUSED_STRETCH,
                           "status": "PASS" if r["x_adamw_fused"] <= FUSED_STRETCH else "MISS"})
    return checks


def render(info, config, results, checks, notes, shape_lines):
    L = []
    L.append("## Machine")
    L.append(f"- CPU: {info['cpu']} ({info['cores']} logical cores, capability {info['cpu_capability']})")
    if info.get("gpu"):
        L.append(f"- GPU: {info['gpu']}")
    L.append(f"- torch threads: {info['threads']} ({info['threads_choice']})")
    L.append(f"- torch {info['torch']}, python {info['python']}, pytorch_optimizer {info['pytorch_optimizer']}")
    L.append(f"- allocator: {info.get('mallopt')}")
    L.append(f"- device {info['device']}; load average at start {info['loadavg_start']}, "
             f"at end {info.get('loadavg_end')}")
    L.append("")
    L.append("## Parameter set")
    sub = ", every 10th: --quick" if config["quick"] else ""
    L.append(f"- {config['modules']} LoRA modules (kohya SDXL UNet targets{sub}),"
             f" rank {config['rank']}: {config['tensors']} tensors, {config['params']:,} parameters "
             f"({config['params'] / 1e6:.2f}M, {config['param_bytes'] / 2**20:.1f} MiB float32)")
    if not config["quick"] and config["rank"] == 16:
        ok = config["modules"] == EXPECTED_MODULES and config["params"] == EXPECTED_PARAMS_R16
        L.append(f"- check: {EXPECTED_MODULES} modules and {EXPECTED_PARAMS_R16:,} params at rank 16: "
                 f"{'OK' if ok else 'MISMATCH'}")
    L.extend(shape_lines)
    L.append("")
    L.append(f"## Step time (median of {config['passes']} passes x up to {config['steps_per_pass']} steps after "
             f"3 warm-up steps, fresh optimizer per pass)")
    L.append("- ms/step: median over all passes; the x AdamW ratios are paired: per pass, the row's median over the "
             "median of 4 steps of long-lived AdamW baselines run right before and after it (same load), then the "
             "median over passes")
    if config.get("descheduled_filter"):
        L.append(f"- shared machine, 1 thread: {config['samples_dropped']} of {config['samples']} timed steps dropped "
                 "as descheduled (wall > 1.15 x process CPU time + 0.5 ms); medians over the rest")
    L.append("| optimizer | ms/step | x AdamW(foreach=False) | x AdamW(fused) | syncs/step | state/param bytes "
             "| family / target |")
    L.append("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r["section"] == "foreach":
            continue
        syncs = "-"
        if r["syncs_per_step"] is not None:
            syncs = f"{r['syncs_per_step']}"
            if r["syncs_extra_tensor_loss"]:
                syncs += f" (+{r['syncs_extra_tensor_loss']})"
        tgt = TARGETS.get(r["family"]) if r["section"] == "main" and r["ours"] else None
        fam = r["family"] or ""
        if r["section"] == "main" and r["ours"]:
            fam += f", <= {tgt:.1f}x" if tgt else ", no target"
        elif r["section"] == "fused":
            fam += f", stretch <= {FUSED_STRETCH}x fused"
        L.append(f"| {r['label']} | {_fmt_ms(r['ms'])} | {_fmt_x(r['x_adamw_foreach_false'])} | "
                 f"{_fmt_x(r['x_adamw_fused'])} | {syncs} | {r['state_per_param_bytes']:.2f} | {fam} |")
    L.append("")
    L.append("syncs/step: host transfers inside step() with the loss as a python float; (+1): one more when the "
             "loss is passed as a 0-dim tensor (float(loss)). '-': not ours, not counted.")
    for r in results:
        if r["section"] != "foreach" and (r["note"] or r["modes"]):
            extra = f" modes while timed: {r['modes']}" if r["modes"] else ""
            L.append(f"- {r['label']}: {r['note']}{extra}")
    faulty = [f"{r['label']} {r['minor_faults_per_step']:.0f}" for r in results
              if (r["minor_faults_per_step"] or 0) > 1000]
    if faulty:
        L.append(f"- page faults per step (freshly mapped temporaries; see --mallopt): {', '.join(faulty)}")
    fe = [r for r in results if r["section"] == "foreach"]
    if fe:
        L.append("")
        L.append("## Per tensor vs foreach (ours)")
        L.append("| optimizer | per tensor ms | foreach ms | foreach / per tensor |")
        L.append("|---|---:|---:|---:|")
        by = {r["label"]: r for r in fe}
        ratios = []
        for name in FOREACH_COMPARE:
            a, b = by.get(f"{name}(foreach=False)"), by.get(f"{name}(foreach=True)")
            if a and b and a["ms"] and b["ms"]:
                ratios.append(b["ms"] / a["ms"])
                L.append(f"| {name} | {a['ms']:.1f} | {b['ms']:.1f} | {ratios[-1]:.2f}x |")
        dev = torch.device(info["device"]).type
        if ratios:
            gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            pt_better = gm > 1.0
            ok = pt_better if dev == "cpu" else not pt_better
            L.append(f"- on {dev}: per tensor faster for {sum(x > 1 for x in ratios)}/{len(ratios)}, geometric mean "
                     f"foreach/per tensor {gm:.2f}x: the device default ({'per tensor' if dev == 'cpu' else 'foreach'}"
                     f" on {dev}) is {'supported' if ok else 'NOT supported'} by this run")
    L.append("")
    L.append("## Targets")
    for c in checks:
        v = c["value"]
        vs = f"{v:.2f}x" if isinstance(v, float) else str(v)
        L.append(f"- {c['status']}: {c['check']} (measured {vs})")
    for n in notes:
        L.append(f"- note: {n}")
    return "\n".join(L)
