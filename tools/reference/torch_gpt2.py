#!/usr/bin/env python3
"""qtrain's GPT (trainer/gpt.cc) in PyTorch, for golden checks on the GPU machine.

Loads the weights of a qtrain safetensors checkpoint (tensors "model/<name>", F32; the shape
from the tensors, the head count from the job spec in the metadata or --n_head), runs the same
computation (pre-LN blocks, learned positions, causal attention, GELU tanh, LM head tied to wte,
mean cross-entropy) in float32 (TF32 off) or float64, and prints one JSON line.

  torch_gpt2.py --checkpoint CKPT [--B 4 --T 64 --seed 0]
      loss on random tokens
  torch_gpt2.py --checkpoint CKPT --compare BATCH
      BATCH is a safetensors file with "inputs", "targets" (I32 B x T), "rows" (I32 R),
      "logits" (F32 R x V: qtrain's logits of those flattened rows) and metadata "loss";
      compares and exits 1 when |loss - ref| > --loss_tol or a row's relative L2 error of the
      logits exceeds --logits_tol.
"""
import argparse
import json
import math
import re
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open


def load(path, n_head, device, dtype):
    w = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            if key.startswith("model/"):
                w[key[len("model/"):]] = f.get_tensor(key).to(device=device, dtype=dtype)
    if not w:
        sys.exit(f"{path}: no 'model/<name>' tensors")
    if n_head is None:
        m = re.search(r"n_head:\s*(\d+)", meta.get("job_spec", ""))
        if not m:
            sys.exit(f"{path}: no n_head in the job_spec metadata; pass --n_head")
        n_head = int(m.group(1))
    n_layer = 0
    while f"block.{n_layer}.ln1.weight" in w:
        n_layer += 1
    V, C = w["wte"].shape
    return w, dict(n_layer=n_layer, n_embd=C, n_head=n_head, vocab_size=V,
                   max_seq_len=w["wpe"].shape[0])


def forward(w, cfg, idx):
    """Final hidden states (B,T,C) and logits (B,T,V) for tokens idx (B,T)."""
    B, T = idx.shape
    C, NH = cfg["n_embd"], cfg["n_head"]
    hs = C // NH
    ln = lambda x, p: F.layer_norm(x, (C,), w[p + ".weight"], w[p + ".bias"], eps=1e-5)
    lin = lambda x, p: F.linear(x, w[p + ".weight"], w[p + ".bias"])
    x = w["wte"][idx] + w["wpe"][:T]
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    for l in range(cfg["n_layer"]):
        p = f"block.{l}."
        qkv = lin(ln(x, p + "ln1"), p + "attn.qkv")
        q, k, v = qkv.split(C, dim=2)
        q, k, v = [t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v)]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.proj")
        h = F.gelu(lin(ln(x, p + "ln2"), p + "mlp.fc"), approximate="tanh")
        x = x + lin(h, p + "mlp.proj")
    x = ln(x, "lnf")
    return x, x @ w["wte"].t()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--compare", help="qtrain batch + outputs (safetensors) to compare against")
    ap.add_argument("--n_head", type=int)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--loss_tol", type=float, default=1e-2)
    ap.add_argument("--logits_tol", type=float, default=2e-2)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    w, cfg = load(args.checkpoint, args.n_head, device, dtype)

    theirs = None
    if args.compare:
        with safe_open(args.compare, framework="pt") as f:
            inputs = f.get_tensor("inputs").long().to(device)
            targets = f.get_tensor("targets").long().to(device)
            rows = f.get_tensor("rows").long().to(device)
            theirs = f.get_tensor("logits").to(device=device, dtype=torch.float64)
            qtrain_loss = float((f.metadata() or {})["loss"])
    else:
        g = torch.Generator().manual_seed(args.seed)
        inputs = torch.randint(0, cfg["vocab_size"], (args.B, args.T), generator=g).to(device)
        targets = torch.randint(0, cfg["vocab_size"], (args.B, args.T), generator=g).to(device)

    with torch.no_grad():
        _, logits = forward(w, cfg, inputs)
        flat = logits.reshape(-1, cfg["vocab_size"])
        loss = F.cross_entropy(flat.double(), targets.reshape(-1)).item()
        out = dict(model=cfg, B=inputs.shape[0], T=inputs.shape[1], dtype=args.dtype,
                   torch_loss=round(loss, 6))
        ok = True
        if theirs is not None:
            ref = flat[rows].double()
            rel = ((theirs - ref).norm(dim=1) / ref.norm(dim=1)).cpu()
            out.update(qtrain_loss=round(qtrain_loss, 6),
                       loss_abs_diff=abs(qtrain_loss - loss),
                       logits_rel_l2_max=rel.max().item(), logits_rel_l2_mean=rel.mean().item(),
                       rows=len(rel))
            ok = (abs(qtrain_loss - loss) <= args.loss_tol and
                  rel.max().item() <= args.logits_tol and math.isfinite(qtrain_loss))
            out["pass"] = ok
    print(json.dumps(out), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
