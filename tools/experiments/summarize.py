#!/usr/bin/env python3
"""Summarises tools/experiments/quant_experiments.sh's output folder as markdown tables."""
import json
import os
import sys


def rows(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def last(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return vals[-1] if vals else float("nan")


def main():
    out = sys.argv[1]
    m = {r: rows(os.path.join(out, r, "metrics.jsonl"))
         for r in ("fp", "fp_tweo", "fp_cont", "qat_w4a4", "qat_w4a4_phi")}
    fp_val = last(m["fp_cont"], "val_loss")
    print("### (a) W4A4 QAT from the full-precision checkpoint\n")
    print(f"Baseline: full precision continued for the same steps (fp_cont): val loss {fp_val:.4f}.\n")
    print("| run | final val loss | gap to FP | val loss from packed export | mean grad norm (first 50 / last 50 steps) | Phi rank at steps 1, 41, 121, 241 |")
    print("|---|---|---|---|---|---|")
    for r in ("qat_w4a4", "qat_w4a4_phi"):
        rs = m[r]
        v = last(rs, "val_loss")
        with open(os.path.join(out, r + ".export_eval.txt")) as f:
            ev = f.read().split()[-1]
        g = [x["grad_norm"] for x in rs]
        ranks = [str(int(rs[i]["phi_rank.0"])) if "phi_rank.0" in rs[i] else "-" for i in (0, 40, 120, 240) if i < len(rs)]
        print(f"| {r} | {v:.4f} | {v - fp_val:+.4f} | {ev} | {sum(g[:50]) / 50:.3f} / {sum(g[-50:]) / 50:.3f} | {', '.join(ranks)} |")
    print(f"\nThe starting checkpoint (fp, {len(m['fp'])} steps): val loss {last(m['fp'], 'val_loss'):.4f}\n")
    print("### (b) TWEO on and off (full-precision training, then per-tensor PTQ)\n")
    layers = sorted({k.split(".")[1] for k in m["fp"][-1] if k.startswith("peak_act.")}, key=int)
    print("| run | final val loss | peak |A_l| per block (last step) | kurtosis per block | W8A8 PTQ val loss (delta) | W4A4 PTQ val loss (delta) |")
    print("|---|---|---|---|---|---|---|")
    for r in ("fp", "fp_tweo"):
        rs = m[r]
        peaks = ", ".join(f"{rs[-1]['peak_act.' + l]:.2f}" for l in layers)
        kurt = ", ".join(f"{rs[-1]['kurtosis.' + l]:.1f}" for l in layers)
        with open(os.path.join(out, r + ".ptq.json")) as f:
            p8 = json.load(f)
        with open(os.path.join(out, r + ".ptq4.json")) as f:
            p4 = json.load(f)
        print(f"| {r} | {last(rs, 'val_loss'):.4f} | {peaks} | {kurt} | {p8['ptq_val_loss']:.4f} ({p8['ptq_val_loss'] - p8['fp_val_loss']:+.4f}) | {p4['ptq_val_loss']:.4f} ({p4['ptq_val_loss'] - p4['fp_val_loss']:+.4f}) |")


if __name__ == "__main__":
    main()
