#!/usr/bin/env python3
"""Summarises tools/experiments/federated_experiments.sh (standard library only).

Usage: tools/experiments/federated_summary.py OUT_DIR [--figures docs/figures]
Prints the markdown tables of docs/experiments.md's federated section (also OUT_DIR/summary.md)
and writes federated_val_loss.svg (val loss per round, one panel per base x DP setting: the
mean over seeds, each seed faint) and federated_gap.svg (FFA-LoRA's and FedAvg-LoRA's val loss
minus FedSVD's per round, paired by seed: above zero means FedSVD is ahead).
Runs are read from OUT_DIR/runs/s<seed>/<base>_<dp>_<rule>/rounds.jsonl (or, from older runs of
the driver, OUT_DIR/runs/<base>_<dp>_<rule>/rounds.jsonl as one seed); a run with fewer rounds
than its job spec asks for (still running, or failed) is left out.
"""
import argparse
import glob
import json
import math
import os
import re
import struct

RULES = [("FEDSVD", "FedSVD", "#d62728"), ("FFA_LORA", "FFA-LoRA", "#1f77b4"),
         ("FEDAVG_LORA", "FedAvg-LoRA", "#7f7f7f")]
SETTINGS = [("fp", "nodp", "FP base, no DP"), ("fp", "dp", "FP base, DP eps 6"),
            ("w4", "nodp", "W4 QAT base, no DP"), ("w4", "dp", "W4 QAT base, DP eps 6")]


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def rounds_of(run_dir):
    """federated.rounds of the run's job spec (OUT_DIR/runs/.../<run>.textproto), or None."""
    try:
        m = re.search(r"\brounds: *(\d+)", open(run_dir + ".textproto").read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def load_run(run_dir):
    """The run's rows; [] while it is unfinished (fewer rounds than its spec asks for)."""
    rows = load(os.path.join(run_dir, "rounds.jsonl"))
    want = rounds_of(run_dir)
    if want is not None and max([r["step"] for r in rows], default=-1) < want:
        return []
    return rows


def read_safetensors(path):
    """{name: (shape, floats)} of an F32 safetensors file."""
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    out = {}
    for k, v in header.items():
        if k != "__metadata__":
            s, e = v["data_offsets"]
            out[k] = (v["shape"], struct.unpack(f"<{(e - s) // 4}f", b[8 + n + s:8 + n + e]))
    return out


def latest_adapter(sim_dir):
    """The last round checkpoint (adapter tensor set version) in a federation's store."""
    versions = sorted(glob.glob(os.path.join(sim_dir, "ps", "tensors", "*.fed.adapter", "v_*.safetensors")))
    return read_safetensors(versions[-1]) if versions else None


def subspace_check(out, seeds, settings):
    """FedSVD's A after the last round against the initial A (FFA-LoRA's frozen A, same seed):
    the largest norm of a row's component outside span(initial A), the largest change of a row."""
    outside = moved = 0.0
    runs = 0
    for seed in seeds:
        for b, d in settings:
            svd = latest_adapter(os.path.join(out, "sim", seed, f"{b}_{d}_FEDSVD"))
            ffa = latest_adapter(os.path.join(out, "sim", seed, f"{b}_{d}_FFA_LORA"))
            if not svd or not ffa:
                continue
            runs += 1
            for k, ((r, n), a0) in ffa.items():
                if not k.endswith(".lora_a"):
                    continue
                a1 = svd[k][1]
                rows0 = [a0[i * n:(i + 1) * n] for i in range(r)]
                for i in range(r):
                    x = a1[i * n:(i + 1) * n]
                    coef = [sum(p * q for p, q in zip(row, x)) for row in rows0]
                    outside = max(outside, math.sqrt(max(0.0, sum(v * v for v in x) - sum(c * c for c in coef))))
                    moved = max(moved, math.sqrt(sum((p - q) ** 2 for p, q in zip(x, rows0[i]))))
    return runs, outside, moved


def mean(xs):
    return sum(xs) / len(xs)


def curve(rows):
    """{round: val loss} of one run (round 0 = the base)."""
    return {int(r["step"]): r["val_loss"] for r in rows if "val_loss" in r}


def spread(xs, fmt="{:.4f}"):
    """'mean' for one value, 'mean [min, max]' for several."""
    m = fmt.format(mean(xs))
    return m if len(xs) == 1 else f"{m} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]"


def panel(out, x0, y0, w, h, title, series, ymin, ymax, xmax, zero=False):
    sx = lambda x: x0 + 55 + x / max(1, xmax) * (w - 65)
    sy = lambda y: y0 + h - 25 - (y - ymin) / (ymax - ymin) * (h - 52)
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#ccc"/>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + 14}" text-anchor="middle" font-size="13">{title}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        yv = ymin + frac * (ymax - ymin)
        out.append(f'<text x="{x0 + 51}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="10">{yv:.4f}</text>')
        out.append(f'<line x1="{x0 + 55}" x2="{x0 + w - 10}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    if zero and ymin < 0 < ymax:
        out.append(f'<line x1="{x0 + 55}" x2="{x0 + w - 10}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#000" stroke-width="0.8"/>')
    for xv in sorted({0, xmax // 2, xmax}):
        anchor = "end" if xv == xmax else "start" if xv == 0 else "middle"
        out.append(f'<text x="{sx(xv):.1f}" y="{y0 + h - 8}" text-anchor="{anchor}" font-size="10">round {xv}</text>')
    for pts, color, width, opacity in series:
        if pts:
            d = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{width}" '
                       f'stroke-opacity="{opacity}" points="{d}"/>')


def figure(path, panels, legend, zero=False):
    """panels: [(title, [(pts, color, width, opacity)])] in a 2 x 2 grid."""
    W, H = 460, 300
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 30}" height="{2 * H + 60}" '
           'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>']
    for i, (title, series) in enumerate(panels):
        vals = [v for pts, _, _, _ in series for _, v in pts]
        if not vals:
            continue
        lo, hi = min(vals + ([0] if zero else [])), max(vals + ([0] if zero else []))
        pad = (hi - lo) * 0.05 or 0.01
        xmax = max(s for pts, _, _, _ in series for s, _ in pts)
        panel(out, 10 + (i % 2) * (W + 10), 10 + (i // 2) * (H + 10), W, H, title, series,
              lo - pad, hi + pad, xmax, zero)
    for j, (label, color) in enumerate(legend):
        x = 60 + j * (2 * W // len(legend))
        out.append(f'<line x1="{x}" x2="{x + 30}" y1="{2 * H + 45}" y2="{2 * H + 45}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{x + 36}" y="{2 * H + 49}" font-size="12">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--figures", default="docs/figures")
    a = ap.parse_args()
    seed_dirs = sorted(glob.glob(os.path.join(a.out, "runs", "s*")),
                       key=lambda p: int(os.path.basename(p)[1:]) if os.path.basename(p)[1:].isdigit() else 0)
    seed_dirs = [d for d in seed_dirs if os.path.isdir(d)] or [os.path.join(a.out, "runs")]
    seeds = [os.path.basename(d) for d in seed_dirs]
    # runs[(base, dp, rule)] = [rows of each seed that has the run]
    runs = {}
    for b, d, _ in SETTINGS:
        for rule, _, _ in RULES:
            runs[(b, d, rule)] = [load_run(os.path.join(sd, f"{b}_{d}_{rule}")) for sd in seed_dirs]
    seeds = [sd for i, sd in enumerate(seeds) if any(rows[i] for rows in runs.values())]
    lines = [f"Seeds with finished runs: {', '.join(seeds) or 'none'}; values are the mean over seeds, "
             "[min, max] over seeds where there are several.", "",
             "| base, DP | round-0 val loss | " + " | ".join(
                 f"{label} final (best)" for _, label, _ in RULES) +
             " | FFA - FedSVD | FedAvg - FedSVD | epsilon reached |",
             "|---|---|" + "---|" * (len(RULES) + 3)]
    for b, d, title in SETTINGS:
        cells, finals, r0, eps = [], {}, [], []
        for rule, _, _ in RULES:
            curves = [curve(rows) for rows in runs[(b, d, rule)]]
            done = [c for c in curves if len(c) > 1]
            r0 += [c[0] for c in curves if 0 in c]
            eps += [max(r.get("epsilon_max", 0) for r in rows) for rows in runs[(b, d, rule)]
                    if any("epsilon_max" in r for r in rows)]
            if not done:
                cells.append("—")
                continue
            last = [c[max(c)] for c in done]
            best = [min(v for s, v in c.items() if s > 0) for c in done]
            finals[rule] = [c[max(c)] if len(c) > 1 else None for c in curves]
            cells.append(f"{spread(last)} ({mean(best):.4f})")

        def diff(x, y):  # paired by seed: x's final minus y's
            if x not in finals or y not in finals:
                return "—"
            ds = [p - q for p, q in zip(finals[x], finals[y]) if p is not None and q is not None]
            return spread(ds, "{:+.4f}") if ds else "—"
        r0_cell = f"{mean(r0):.4f}" if r0 else "—"
        eps_cell = f"{max(eps):.3f}" if eps else "—"
        lines.append(f"| {title} | {r0_cell} | " + " | ".join(cells) +
                     f" | {diff('FFA_LORA', 'FEDSVD')} | {diff('FEDAVG_LORA', 'FEDSVD')} | {eps_cell} |")
    lines.append("")
    lines.append("| run | seeds | rounds | mean round s | mean aggregate ms | epsilon after the last round (max) | FedAvg discrepancy (mean) | FedSVD orthonormality error (max) | dropped |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for (b, d, rule), per_seed in runs.items():
        per_seed = [[r for r in rows if r["step"] > 0] for rows in per_seed]
        per_seed = [rows for rows in per_seed if rows]
        if not per_seed:
            continue
        rows = [r for rs in per_seed for r in rs]
        avg = lambda k: mean([r.get(k, 0) for r in rows])
        eps = f"{max(rs[-1]['epsilon_max'] for rs in per_seed):.3f}" if "epsilon_max" in rows[-1] else "—"
        disc = f"{avg('discrepancy'):.3g}" if "discrepancy" in rows[0] else "—"
        orth = f"{max(r['orthonormality_error'] for r in rows):.2g}" if "orthonormality_error" in rows[0] else "—"
        lines.append(f"| {b}_{d}_{rule} | {len(per_seed)} | {spread([len(rs) for rs in per_seed], '{:.0f}')} | "
                     f"{avg('round_s'):.1f} | {avg('aggregate_ms'):.2f} | {eps} | {disc} | {orth} | "
                     f"{int(sum(r['clients_dropped'] for r in rows))} |")
    # Step 2b of the driver: FedSVD and FFA-LoRA under local SGD, which should agree every round.
    for sd in seed_dirs:
        svd, ffa = (curve(load_run(os.path.join(sd, f"fp_nodp_sgd_{r}"))) for r in ("FEDSVD", "FFA_LORA"))
        common = sorted(set(svd) & set(ffa) - {0})
        if common:
            gap = max(abs(svd[k] - ffa[k]) for k in common)
            lines.append("")
            lines.append(f"Local SGD instead of AdamW (FP base, no DP, {os.path.basename(sd)}, {len(common)} rounds): "
                         f"FedSVD final {svd[common[-1]]:.6f}, FFA-LoRA final {ffa[common[-1]]:.6f}, "
                         f"largest per-round val loss difference {gap:.1e}.")
    n, outside, moved = subspace_check(a.out, seeds, [(b, d) for b, d, _ in SETTINGS])
    if n:
        lines.append("")
        lines.append(f"FedSVD's A after the last round vs the initial A ({n} runs, AdamW): largest norm of a row's "
                     f"component outside the span of the initial A {outside:.1e} (the float32 floor of this check), "
                     f"largest change of a row {moved:.3f} (rows have norm 1).")
    bench_path = os.path.join(a.out, "agg_bench.json")
    if os.path.exists(bench_path):
        bench = json.load(open(bench_path))
        lines.append("")
        lines.append(f"GPT-2 124M shape ({bench['n_layer']} blocks, d={bench['n_embd']}), LoRA r={bench['rank']} "
                     f"on all four Linears ({bench['adapter_floats']:,} adapter floats), {bench['clients']} updates:")
        lines.append("")
        lines.append("| rule | aggregation ms (median) | bytes down per client | bytes up per client |")
        lines.append("|---|---|---|---|")
        for name, r in bench["rules"].items():
            lines.append(f"| {name} | {r['aggregate_ms_median']:.1f} | {r['bytes_down_per_client']:,} | "
                         f"{r['bytes_up_per_client']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(text)

    os.makedirs(a.figures, exist_ok=True)
    # Val loss per round: the mean over the seeds that have every round, each seed faint.
    panels = []
    for b, d, title in SETTINGS:
        series = []
        for rule, _, color in RULES:
            curves = [curve(rows) for rows in runs[(b, d, rule)]]
            curves = [c for c in curves if c]
            for c in curves if len(curves) > 1 else []:
                series.append((sorted(c.items()), color, 0.8, 0.3))
            common = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
            series.append(([(s, mean([c[s] for c in curves])) for s in common], color, 1.8, 1))
        panels.append((f"{title}: val loss per round", series))
    figure(os.path.join(a.figures, "federated_val_loss.svg"), panels,
           [(label, color) for _, label, color in RULES])
    # The gap to FedSVD per round, paired by seed.
    panels = []
    for b, d, title in SETTINGS:
        svd = [curve(rows) for rows in runs[(b, d, "FEDSVD")]]
        series = []
        for rule, _, color in RULES[1:]:
            other = [curve(rows) for rows in runs[(b, d, rule)]]
            pairs = [(o, s) for o, s in zip(other, svd) if o and s]
            gaps = [{k: o[k] - s[k] for k in set(o) & set(s)} for o, s in pairs]
            for g in gaps if len(gaps) > 1 else []:
                series.append((sorted(g.items()), color, 0.8, 0.3))
            common = sorted(set.intersection(*[set(g) for g in gaps])) if gaps else []
            series.append(([(k, mean([g[k] for g in gaps])) for k in common], color, 1.8, 1))
        panels.append((f"{title}: val loss minus FedSVD's", series))
    figure(os.path.join(a.figures, "federated_gap.svg"), panels,
           [(f"{label} - FedSVD (> 0: FedSVD ahead)", color) for _, label, color in RULES[1:]],
           zero=True)


if __name__ == "__main__":
    main()
