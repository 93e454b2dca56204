#!/usr/bin/env python3
"""Summarises tools/experiments/federated_experiments.sh (standard library only).

Usage: tools/experiments/federated_summary.py OUT_DIR [--figures docs/figures]
Prints the markdown tables of docs/experiments.md's federated section (also OUT_DIR/summary.md)
and writes federated_val_loss.svg: val loss per round, one panel per base x DP setting.
"""
import argparse
import json
import os

RULES = [("FEDSVD", "FedSVD", "#d62728"), ("FFA_LORA", "FFA-LoRA", "#1f77b4"),
         ("FEDAVG_LORA", "FedAvg-LoRA", "#7f7f7f")]
SETTINGS = [("fp", "nodp", "FP base, no DP"), ("fp", "dp", "FP base, DP eps 6"),
            ("w4", "nodp", "W4 QAT base, no DP"), ("w4", "dp", "W4 QAT base, DP eps 6")]


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def panel(out, x0, y0, w, h, title, series, ymin, ymax, xmax):
    sx = lambda x: x0 + 50 + x / max(1, xmax) * (w - 60)
    sy = lambda y: y0 + h - 25 - (y - ymin) / (ymax - ymin) * (h - 45)
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#ccc"/>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + 14}" text-anchor="middle" font-size="13">{title}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        yv = ymin + frac * (ymax - ymin)
        out.append(f'<text x="{x0 + 46}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="10">{yv:.3f}</text>')
        out.append(f'<line x1="{x0 + 50}" x2="{x0 + w - 10}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    for xv in (0, xmax // 2, xmax):
        out.append(f'<text x="{sx(xv):.1f}" y="{y0 + h - 8}" text-anchor="middle" font-size="10">{xv}</text>')
    for name, pts, color in series:
        if pts:
            d = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{d}"/>')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--figures", default="docs/figures")
    a = ap.parse_args()
    runs = {}
    for b, d, _ in SETTINGS:
        for rule, _, _ in RULES:
            runs[(b, d, rule)] = load(os.path.join(a.out, "runs", f"{b}_{d}_{rule}", "rounds.jsonl"))
    lines = ["| base, DP | round-0 val loss | " + " | ".join(
        f"{label} final (best)" for _, label, _ in RULES) + " | FedSVD - FFA | FedSVD - FedAvg |",
             "|---|---|" + "---|" * (len(RULES) + 2)]
    for b, d, title in SETTINGS:
        cells, finals = [], {}
        r0 = None
        for rule, _, _ in RULES:
            rows = [r for r in runs[(b, d, rule)] if "val_loss" in r]
            if not rows:
                cells.append("—")
                continue
            if rows[0]["step"] == 0:
                r0 = rows[0]["val_loss"]
            v = [r["val_loss"] for r in rows if r["step"] > 0]
            finals[rule] = v[-1]
            cells.append(f"{v[-1]:.4f} ({min(v):.4f})")
        diff = lambda x, y: f"{finals[x] - finals[y]:+.4f}" if x in finals and y in finals else "—"
        lines.append(f"| {title} | {r0:.4f} | " if r0 is not None else f"| {title} | — | ")
        lines[-1] += " | ".join(cells) + f" | {diff('FEDSVD', 'FFA_LORA')} | {diff('FEDSVD', 'FEDAVG_LORA')} |"
    lines.append("")
    lines.append("| run | rounds | mean round s | mean aggregate ms | epsilon after the last round | FedAvg discrepancy (mean) | dropped |")
    lines.append("|---|---|---|---|---|---|---|")
    for (b, d, rule), rows in runs.items():
        rows = [r for r in rows if r["step"] > 0]
        if not rows:
            continue
        mean = lambda k: sum(r.get(k, 0) for r in rows) / len(rows)
        eps = f"{rows[-1]['epsilon_max']:.3f}" if "epsilon_max" in rows[-1] else "—"
        disc = f"{mean('discrepancy'):.3g}" if "discrepancy" in rows[0] else "—"
        lines.append(f"| {b}_{d}_{rule} | {len(rows)} | {mean('round_s'):.1f} | "
                     f"{mean('aggregate_ms'):.2f} | {eps} | {disc} | "
                     f"{int(sum(r['clients_dropped'] for r in rows))} |")
    bench_path = os.path.join(a.out, "agg_bench.json")
    if os.path.exists(bench_path):
        bench = json.load(open(bench_path))
        lines.append("")
        lines.append(f"GPT-2 124M shape ({bench['n_layer']} blocks, d={bench['n_embd']}), LoRA r={bench['rank']} "
                     f"on all four Linears ({bench['adapter_floats']} adapter floats), {bench['clients']} updates:")
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

    # The figure: 2 x 2 panels, val loss per round, shared y range per row of bases.
    W, H = 460, 300
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 30}" height="{2 * H + 60}" '
           'font-family="sans-serif">', f'<rect width="100%" height="100%" fill="white"/>']
    for i, (b, d, title) in enumerate(SETTINGS):
        series = []
        for rule, label, color in RULES:
            pts = [(r["step"], r["val_loss"]) for r in runs[(b, d, rule)] if "val_loss" in r]
            series.append((label, pts, color))
        vals = [v for _, pts, _ in series for _, v in pts]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.05 or 0.01
        xmax = max(s for _, pts, _ in series for s, _ in pts)
        panel(out, 10 + (i % 2) * (W + 10), 10 + (i // 2) * (H + 10), W, H,
              f"{title}: val loss per round", series, lo - pad, hi + pad, xmax)
    for j, (_, label, color) in enumerate(RULES):
        x = 60 + j * 160
        out.append(f'<line x1="{x}" x2="{x + 30}" y1="{2 * H + 45}" y2="{2 * H + 45}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{x + 36}" y="{2 * H + 49}" font-size="12">{label}</text>')
    out.append("</svg>")
    os.makedirs(a.figures, exist_ok=True)
    with open(os.path.join(a.figures, "federated_val_loss.svg"), "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
