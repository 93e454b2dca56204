#!/usr/bin/env python3
"""The GPU experiments of docs/experiments.md, in one call on the GPU machine.

outliers: GPT-2 124M shape on the Brown byte shards, identical data and steps, BF16 and the three
  FP8 recipes, each with and without TWEO; per-block peak |A| and kurtosis logged along the way.
qat: QAT from the outliers experiment's BF16 checkpoint (training.init_from) at W4A4, W3A4 and
  W2A16 (weights per group), each with and without Phi, beside a BF16 continuation of the same
  steps.
qat_kd: the same QAT runs with distillation from that BF16 checkpoint as the frozen teacher
  (precision.distill, KL on logits, weight 1), with and without Phi.
base: only the BF16 run of the outliers experiment (the checkpoint qat and qat_kd start from).

Each run is qtrain (from a bundle) on a job made from configs/gpt2_124m.textproto; metrics.jsonl
of every run land in OUT/<experiment>/<run>/ and one summary JSON line per run is printed (and
written to OUT/summary.jsonl). tools/plot_metrics.py draws the figures (docs/experiments.md).

With --tools (a folder holding export, eval_export and, for the PTQ, ptq), side jobs run one at
a time beside the next GPU runs (results in OUT/side.jsonl and OUT/<experiment>/<run>/*.json):
- every outliers run's final checkpoint gets W8A8 per-tensor static PTQ (//tools:ptq --residual:
  the Linears' inputs, then also the residual stream) on the CPU cores (--ptq_threads);
- every QAT run's final checkpoint is exported packed (//tools:export) and its val loss taken
  from the export on the GPU (//tools:eval_export --device=cuda, the trainer's val batches).

Usage: gpu_experiments.py --qtrain DIST/qtrain --data DIR [--tools DIST] [--out OUT]
       [--steps 800] [--qat_steps 300] [--only outliers,qat,qat_kd | base,qat_kd]
"""
import argparse
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--qtrain", required=True)
ap.add_argument("--data", required=True, help="folder holding brown/mixed_{train,val}.bin")
ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_experiments"))
ap.add_argument("--steps", type=int, default=800)
ap.add_argument("--qat_steps", type=int, default=300)
ap.add_argument("--only", default="outliers,qat")
ap.add_argument("--base", default="configs/gpt2_124m.textproto")
ap.add_argument("--base_ckpt", default=None,
                help="the BF16 checkpoint qat/qat_kd start from (else the base run's)")
ap.add_argument("--tools", default=None, help="folder with ptq, export, eval_export")
ap.add_argument("--ptq_threads", type=int, default=14)
ap.add_argument("--ptq_args", default="--batch_size=2 --calib_batches=1 --batches=2",
                help="the PTQ's calibration and val batches (CPU time)")
args = ap.parse_args()

BASE = open(args.base).read()
OUTLIERS = [
    ("bf16", ""),
    ("bf16_tweo", "tweo { enabled: true }"),
    ("fp8_delayed", "linear: FP8"),
    ("fp8_delayed_tweo", "linear: FP8 tweo { enabled: true }"),
    ("fp8_current", "linear: FP8 fp8 { scaling: CURRENT }"),
    ("fp8_current_tweo", "linear: FP8 fp8 { scaling: CURRENT } tweo { enabled: true }"),
    ("fp8_block", "linear: FP8 fp8 { scaling: BLOCK }"),
    ("fp8_block_tweo", "linear: FP8 fp8 { scaling: BLOCK } tweo { enabled: true }"),
]
PHI = "aux_lowrank { enabled: true rank: 32 decay_period: %d }"
QAT = [
    ("bf16_continue", ""),
    ("w4a4", "linear: QAT qat { weight_bits: 4 act_bits: 4 }"),
    ("w4a4_phi", "linear: QAT qat { weight_bits: 4 act_bits: 4 } " + PHI),
    ("w3a4_g128", "linear: QAT qat { weight_bits: 3 weight_granularity: PER_GROUP group_size: 128 act_bits: 4 }"),
    ("w3a4_g128_phi", "linear: QAT qat { weight_bits: 3 weight_granularity: PER_GROUP group_size: 128 act_bits: 4 } " + PHI),
    ("w2a16_g64", "linear: QAT qat { weight_bits: 2 weight_granularity: PER_GROUP group_size: 64 }"),
    ("w2a16_g64_phi", "linear: QAT qat { weight_bits: 2 weight_granularity: PER_GROUP group_size: 64 } " + PHI),
]


KD = " distill { teacher_checkpoint: \"%T\" loss: KL weight: 1 }"
QAT_KD = [(name + "_kd", prec + KD) for name, prec in QAT if name != "bf16_continue"]


def job(name, precision, steps, out_dir, init_from=None, warmup=100, lr=6e-4):
    """The 124M job with this precision block, steps, one micro-step per optimizer step."""
    t = BASE
    t = re.sub(r'^name: .*$', 'name: "%s"' % name, t, flags=re.M)
    t = re.sub(r'^(\s*)steps: \d+', r'\g<1>steps: %d' % steps, t, flags=re.M)
    t = re.sub(r'warmup_steps: \d+', 'warmup_steps: %d' % warmup, t)
    t = re.sub(r'grad_accum: \d+', 'grad_accum: 1', t)
    t = re.sub(r'lr: [0-9.e-]+', 'lr: %g' % lr, t, count=1)
    t = re.sub(r'eval \{[^}]*\}', 'eval { every_steps: %d batches: 8 }' % max(50, steps // 4), t)
    t = re.sub(r'checkpoint \{[^}]*\}', 'checkpoint { every_steps: 0 keep_last: 1 }', t)
    t = re.sub(r'logging \{[^}]*\}', 'logging { every_steps: 25 }', t)
    t = t.replace('"data/brown/', '"%s/brown/' % os.path.abspath(args.data))
    t += '\nout_dir: "%s"\n' % out_dir
    if precision:
        t += "precision { %s }\n" % precision
    if init_from:
        t = t.replace("training {", 'training {\n  init_from: "%s"' % init_from, 1)
    return t


def last_checkpoint(out_dir):
    d = os.path.join(out_dir, "checkpoints")
    ck = sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) if os.path.isdir(d) else []
    return os.path.join(d, ck[-1]) if ck else None


def last_json(text):
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


# Work on the CPU cores beside the GPU runs, one job at a time (PTQ, packed exports): each job
# writes its result into OUT/<experiment>/<run>/<kind>.json and OUT/side.jsonl.
side_jobs = queue.Queue()


def side_worker():
    while True:
        item = side_jobs.get()
        if item is None:
            return
        kind, out_dir, fn = item
        t0 = time.time()
        try:
            result = fn()
        except Exception as e:  # a failed side job is reported, never fatal to the runs
            result = {"error": repr(e)}
        result = dict(result, kind=kind, experiment=os.path.basename(os.path.dirname(out_dir)),
                      run=os.path.basename(out_dir), seconds=round(time.time() - t0, 1))
        with open(os.path.join(out_dir, kind + ".json"), "w") as f:
            f.write(json.dumps(result) + "\n")
        with open(os.path.join(args.out, "side.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")
        print(kind + " " + json.dumps(result), flush=True)


def ptq(out_dir, ckpt):
    """W8A8 per-tensor static PTQ: the Linears' inputs, then also the residual stream."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.ptq_threads))
    p = subprocess.run([os.path.join(args.tools, "ptq"), "--checkpoint=" + ckpt, "--residual",
                        "--bits=8"] + args.ptq_args.split(), env=env, capture_output=True,
                       text=True)
    with open(os.path.join(out_dir, "ptq.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    result = last_json(p.stdout) if p.returncode == 0 else None
    return result or {"error": (p.stderr or p.stdout)[-500:]}


def export_val_loss(out_dir, val_loss):
    """The packed export of the run's final checkpoint, evaluated on the GPU on the trainer's
    val batches, beside the run's own (fake-quantized) val loss."""
    ckpt = last_checkpoint(out_dir)
    if ckpt is None:
        return {"error": "no checkpoint"}
    path = os.path.join(out_dir, "export.safetensors")
    p = subprocess.run([os.path.join(args.tools, "export"), "--checkpoint=" + ckpt, "--out=" + path],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-300:]}
    p = subprocess.run([os.path.join(args.tools, "eval_export"), "--export_path=" + path,
                        "--device=cuda"], capture_output=True, text=True)
    os.remove(path)
    m = re.search(r"val_loss ([0-9.]+)", p.stdout)
    if p.returncode != 0 or not m:
        return {"error": (p.stderr or p.stdout)[-300:]}
    return {"export_val_loss": float(m.group(1)), "val_loss": val_loss,
            "difference": float(m.group(1)) - val_loss if val_loss is not None else None}


def run(experiment, name, precision, steps, init_from=None, lr=6e-4, warmup=100):
    out_dir = os.path.join(args.out, experiment, name)
    os.makedirs(out_dir, exist_ok=True)
    spec = os.path.join(out_dir, "job.textproto")
    with open(spec, "w") as f:
        f.write(job(name, precision, steps, out_dir, init_from, warmup, lr))
    t0 = time.time()
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        rc = subprocess.call([args.qtrain, "--job=" + spec], stdout=log, stderr=subprocess.STDOUT)
    rows = []
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(l) for l in open(path) if l.strip()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    peaks = [max(v for k, v in r.items() if k.startswith("peak_act.")) for r in rows
             if any(k.startswith("peak_act.") for k in r)]
    tok = [r["tokens_per_s"] for r in rows[len(rows) // 4:]] or [0]
    summary = {"experiment": experiment, "run": name, "rc": rc, "seconds": round(time.time() - t0, 1),
               "steps": len(rows), "final_train_loss": rows[-1]["train_loss"] if rows else None,
               "val_loss": vals[-1] if vals else None, "val_curve": vals,
               "max_peak_act": max(peaks) if peaks else None,
               "final_peak_act": peaks[-1] if peaks else None,
               "tokens_per_s": sorted(tok)[len(tok) // 2],
               # Non-finite values are written as null (an infinite norm skips the update).
               "grad_norm_median": (lambda g: sorted(g)[len(g) // 2] if g else None)(
                   [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]),
               "grad_norm_nonfinite_steps": sum(1 for r in rows if r.get("grad_norm") is None),
               "final_distill_loss": next((r["distill_loss"] for r in reversed(rows)
                                           if "distill_loss" in r), None),
               "phi_rank_curve": [(r["step"], max(v for k, v in r.items() if k.startswith("phi_rank.")))
                                  for r in rows if any(k.startswith("phi_rank.") for k in r)][::4]}
    if args.tools and rc == 0 and experiment.startswith("qat") and name != "bf16_continue":
        side_jobs.put(("export", out_dir, lambda: export_val_loss(out_dir, summary["val_loss"])))
    if has_ptq and rc == 0 and experiment == "outliers" and last_checkpoint(out_dir):
        side_jobs.put(("ptq", out_dir, lambda: ptq(out_dir, last_checkpoint(out_dir))))
    print(json.dumps(summary), flush=True)
    with open(os.path.join(args.out, "summary.jsonl"), "a") as f:
        f.write(json.dumps(summary) + "\n")
    if rc != 0:
        sys.stdout.write(open(os.path.join(out_dir, "stdout.log")).read()[-2000:])
    return out_dir


only = args.only.split(",")
base_ckpt = args.base_ckpt
worker = None
has_ptq = bool(args.tools) and os.path.exists(os.path.join(args.tools, "ptq"))
if args.tools:
    worker = threading.Thread(target=side_worker, daemon=True)
    worker.start()
try:
    if "outliers" in only or "base" in only:
        for name, prec in OUTLIERS if "outliers" in only else OUTLIERS[:1]:
            d = run("outliers", name, prec, args.steps)
            if name == "bf16":
                base_ckpt = last_checkpoint(d) or base_ckpt
    for experiment, runs in (("qat", QAT), ("qat_kd", QAT_KD)):
        if experiment not in only:
            continue
        if base_ckpt is None:
            sys.exit(experiment + ": no BF16 checkpoint from the outliers (or base) experiment")
        for name, prec in runs:
            # Six halvings take rank 32 to 0: at period qat_steps // 7 the last sixth of the run
            # trains (and exports) with no Phi left.
            prec = prec.replace("%d", str(max(1, args.qat_steps // 7))).replace("%T", base_ckpt)
            run(experiment, name, prec, args.qat_steps, init_from=base_ckpt, lr=2e-4, warmup=20)
finally:
    # The side jobs queued so far finish (a worker left waiting would keep the process alive).
    if worker:
        side_jobs.put(None)
        worker.join()
