#!/usr/bin/env python3
"""Python side of tools/reference/hf_interop_check.sh (GPU machine: torch, transformers,
tokenizers, tiktoken, safetensors, numpy; no network).

  hf_interop.py make-hf --out DIR [--seed 0]
      a randomly initialised GPT2LMHeadModel (2 layers, n_embd 64, 4 heads, 64 positions,
      GPT-2's vocabulary), every parameter perturbed so that biases and layer norms are not
      trivial, saved by transformers' save_pretrained (config.json + model.safetensors)
  hf-logits --model DIR --tokens 1,2,3 --out FILE
      transformers' logits (float32, CPU, eval mode) as safetensors "logits" [T, V]
  compare A B [--tol 1e-4]
      max |A - B| of two "logits" files relative to max |A|; exit 1 above tol
  write-shard --out FILE --tokens N [--vocab 50257] [--seed 0]
      random tokens as an llm.c-format shard (header 256 x int32, uint16 tokens)
  load-check --model DIR
      the folder loads in transformers (GPT2LMHeadModel, head tied to wte) and its
      tokenizer files (vocab.json, merges.txt) encode "Hello world" as GPT-2 does
  tokenizer-check --gpt2_dir DIR --file_list LIST --ids FILE --lengths FILE [--threads N]
      qtrain's ids of each file (a shard written by //tools:tokenize) against `tokenizers`'
      GPT-2 BPE built from the same encoder.json/vocab.bpe, token for token, and against
      tiktoken's (an Encoding made from the same files: tiktoken cannot download here); prints
      the speed of both in MB/s
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def make_hf(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(args.out)  # safetensors by default
    print(f"saved a random GPT2LMHeadModel to {args.out}: {sorted(os.listdir(args.out))}")


def hf_logits(args):
    import torch
    from safetensors.numpy import save_file
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(args.model).float().eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), \
        "transformers did not tie the head to wte"
    tokens = [int(t) for t in args.tokens.split(",")]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float().numpy()
    save_file({"logits": np.ascontiguousarray(logits)}, args.out)
    print(f"transformers logits {logits.shape} of {args.model} -> {args.out}")


def compare(args):
    from safetensors.numpy import load_file

    a = load_file(args.a)["logits"].astype(np.float64)
    b = load_file(args.b)["logits"].astype(np.float64)
    if a.shape != b.shape:
        sys.exit(f"FAIL: shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a - b).max()
    rel = diff / max(np.abs(a).max(), 1e-30)
    same_argmax = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(f"logits {a.shape}: max |a| {np.abs(a).max():.4g}, max |a - b| {diff:.3g} "
          f"(relative {rel:.3g}), argmax agreement {same_argmax:.3f}")
    if not rel <= args.tol:
        sys.exit(f"FAIL: relative difference {rel:.3g} > {args.tol}")


def write_shard(args):
    rng = np.random.default_rng(args.seed)
    toks = rng.integers(0, args.vocab, size=args.tokens, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, args.tokens
    with open(args.out, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())
    print(f"wrote {args.tokens} random tokens to {args.out}")


def load_check(args):
    import torch
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(args.model).float()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    tok = GPT2TokenizerFast.from_pretrained(args.model)
    ids = tok("Hello world")["input_ids"]
    assert ids == [15496, 995], ids
    print(f"{args.model}: GPT2LMHeadModel with {sum(p.numel() for p in model.parameters())} "
          f"parameters, tied head; its tokenizer encodes 'Hello world' as {ids}")


def read_shard(path):
    b = open(path, "rb").read()
    header = np.frombuffer(b[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1, header[:3]
    return np.frombuffer(b[1024:], dtype="<u2").astype(np.int64)


def byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_check(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = [l for l in open(args.file_list).read().splitlines() if l]
    texts = [open(f, "rb").read().decode("utf-8", errors="replace") for f in files]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ours = read_shard(args.ids)
    lengths = [int(x) for x in open(args.lengths).read().split()]
    assert len(lengths) == len(files), (len(lengths), len(files))
    per_file, at = [], 0
    for n in lengths:
        per_file.append(ours[at:at + n])
        at += n

    enc, merges = os.path.join(args.gpt2_dir, "encoder.json"), os.path.join(args.gpt2_dir, "vocab.bpe")
    hf = Tokenizer(models.BPE.from_file(enc, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    speeds = {}
    t0 = time.perf_counter()
    hf_ids = [hf.encode(t).ids for t in texts]
    speeds["tokenizers, 1 thread (encode per file)"] = nbytes / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    hf.encode_batch(texts)
    speeds[f"tokenizers, encode_batch ({os.cpu_count()} cores)"] = nbytes / (time.perf_counter() - t0) / 1e6

    failures = 0
    for f, a, b, text in zip(files, per_file, hf_ids, texts):
        if list(a) != list(b):
            failures += 1
            i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            print(f"MISMATCH tokenizers {f}: token {i}: qtrain {list(a[i:i+5])} tokenizers {b[i:i+5]} "
                  f"(lengths {len(a)} vs {len(b)})")
    print(f"tokenizers: {len(files) - failures} of {len(files)} files identical, "
          f"{sum(lengths)} tokens")

    tk_failures = None
    try:
        import tiktoken
        dec = byte_decoder()
        vocab = json.load(open(enc, encoding="utf-8"))
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
        pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        tk = tiktoken.Encoding(name="gpt2_local_files", pat_str=pat, mergeable_ranks=ranks,
                               special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
        t0 = time.perf_counter()
        tk_ids = [tk.encode_ordinary(t) for t in texts]
        speeds["tiktoken, 1 thread (encode_ordinary per file)"] = nbytes / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        tk.encode_ordinary_batch(texts, num_threads=args.threads)
        speeds[f"tiktoken, encode_ordinary_batch ({args.threads} threads)"] = \
            nbytes / (time.perf_counter() - t0) / 1e6
        tk_failures = sum(list(a) != list(b) for a, b in zip(per_file, tk_ids))
        print(f"tiktoken: {len(files) - tk_failures} of {len(files)} files identical")
    except Exception as e:  # tiktoken missing or unable to build the encoding
        print(f"tiktoken: not compared ({type(e).__name__}: {e}); speeds from tokenizers only")
    print(f"speed on {len(files)} files, {nbytes / 1e6:.2f} MB:")
    for k, v in speeds.items():
        print(f"  {k:55s} {v:8.2f} MB/s")
    if failures or tk_failures:
        sys.exit(f"FAIL: {failures} files differ from tokenizers, {tk_failures} from tiktoken")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-hf"); s.add_argument("--out", required=True); s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("hf-logits"); s.add_argument("--model", required=True)
    s.add_argument("--tokens", required=True); s.add_argument("--out", required=True)
    s = sub.add_parser("compare"); s.add_argument("a"); s.add_argument("b"); s.add_argument("--tol", type=float, default=1e-4)
    s = sub.add_parser("write-shard"); s.add_argument("--out", required=True)
    s.add_argument("--tokens", type=int, required=True); s.add_argument("--vocab", type=int, default=50257)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("load-check"); s.add_argument("--model", required=True)
    s = sub.add_parser("tokenizer-check"); s.add_argument("--gpt2_dir", required=True)
    s.add_argument("--file_list", required=True); s.add_argument("--ids", required=True)
    s.add_argument("--lengths", required=True); s.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    {"make-hf": make_hf, "hf-logits": hf_logits, "compare": compare, "write-shard": write_shard,
     "load-check": load_check, "tokenizer-check": tokenizer_check}[args.cmd](args)


if __name__ == "__main__":
    main()
