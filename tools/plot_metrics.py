#!/usr/bin/env python3
"""Plots qtrain's metrics.jsonl as an SVG (standard library only).

Usage: tools/plot_metrics.py out/tiny_cpu/metrics.jsonl [--keys train_loss,val_loss] [-o plot.svg]
One panel per key, x = step. Several files may be given to overlay runs. A key "<prefix>.max"
that a row lacks is the maximum over the row's keys "<prefix>.<i>" (e.g. peak_act.max: the peak
block output of the step).
"""
import argparse
import json
import math
import os
import sys


def load(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON: {e}")
    return rows


def panel(out, x0, y0, w, h, key, series, colors):
    pts_all = [(s, v) for _, pts in series for s, v in pts]
    if not pts_all:
        return
    xs = [p[0] for p in pts_all]
    ys = [p[1] for p in pts_all]
    xmin, xmax = min(xs), max(xs) or 1
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax = ymin + 1
    sx = lambda x: x0 + 50 + (x - xmin) / (xmax - xmin) * (w - 60)
    sy = lambda y: y0 + h - 25 - (y - ymin) / (ymax - ymin) * (h - 45)
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#ccc"/>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + 14}" text-anchor="middle" font-size="13">{key}</text>')
    for frac in (0, 0.5, 1):
        yv = ymin + frac * (ymax - ymin)
        out.append(f'<text x="{x0 + 46}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="10">{yv:.4g}</text>')
        out.append(f'<line x1="{x0 + 50}" x2="{x0 + w - 10}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    for xv in (xmin, xmax):
        out.append(f'<text x="{sx(xv):.1f}" y="{y0 + h - 8}" text-anchor="middle" font-size="10">{xv:g}</text>')
    for (name, pts), color in zip(series, colors):
        if not pts:
            continue
        d = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{d}"/>')


def value(row, key):
    v = row.get(key)
    if isinstance(v, (int, float)):
        return float(v)
    if key.endswith(".max"):
        prefix = key[:-3]
        vals = [x for k, x in row.items() if k.startswith(prefix) and k[len(prefix):].isdigit()]
        return float(max(vals)) if vals else None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--keys", default="train_loss,val_loss,lr,tokens_per_s")
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()
    runs = [(os.path.dirname(p) or p, load(p)) for p in args.files]
    keys = [k for k in args.keys.split(",") if k]
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf"]
    w, h = 520, 220
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h * len(keys) + 20 * len(runs)}" font-family="sans-serif">']
    for i, key in enumerate(keys):
        series = [(name, [(r["step"], v) for r in rows
                          for v in [value(r, key)] if v is not None and math.isfinite(v)])
                  for name, rows in runs]
        panel(out, 0, i * h, w, h, key, series, colors)
    for j, (name, _) in enumerate(runs):
        out.append(f'<text x="10" y="{h * len(keys) + 15 + 20 * j}" font-size="11" fill="{colors[j % len(colors)]}">{name}</text>')
    out.append("</svg>")
    dest = args.out or os.path.join(os.path.dirname(args.files[0]) or ".", "metrics.svg")
    with open(dest, "w") as f:
        f.write("\n".join(out))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
