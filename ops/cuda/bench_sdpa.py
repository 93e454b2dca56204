#!/usr/bin/env python3
"""PyTorch's causal scaled_dot_product_attention (BF16) at kernel_bench's attention shapes, per
SDPA backend, so that one GPU run compares qtrain's flash kernels with what PyTorch users get.
Prints forward and backward milliseconds and TFLOP/s with the same causal FLOP count as
kernel_bench (forward 2 GEMMs over half the T x T square, backward 2.5x). Needs torch + CUDA.
"""
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

T = 1024
SHAPES = [("124M 16x12x64", 16, 12, 64), ("1.5B 4x25x64", 4, 25, 64), ("hs128 8x8x128", 8, 8, 128)]
BACKENDS = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION)]


def time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    trials = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        trials.append(start.elapsed_time(end) / reps)
    return statistics.median(trials)


def main():
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name, b, nh, hs in SHAPES:
        q, k, v = (torch.randn(b, nh, T, hs, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn(b, nh, T, hs, device="cuda", dtype=torch.bfloat16)
        flops_fwd = 4.0 * b * nh * T * T * hs / 2
        for label, backend in BACKENDS:
            try:
                with (sdpa_kernel(backend) if backend is not None else torch.enable_grad()):
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    out = fwd()

                    def fwd_bwd():
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        torch.autograd.grad(o, (q, k, v), dout)

                    with torch.no_grad():
                        ms_f = time_ms(fwd)
                    ms_fb = time_ms(fwd_bwd)
                ms_b = ms_fb - ms_f
                print(f"sdpa[{label:7s}] forward  {name:14s} {ms_f:8.3f} ms "
                      f"{flops_fwd / ms_f / 1e9:7.1f} TFLOP/s")
                print(f"sdpa[{label:7s}] backward {name:14s} {ms_b:8.3f} ms "
                      f"{2.5 * flops_fwd / ms_b / 1e9:7.1f} TFLOP/s")
                del out
            except Exception as e:  # a backend may not support a shape
                print(f"sdpa[{label:7s}] {name}: unavailable ({type(e).__name__}: {e})"[:200])


if __name__ == "__main__":
    main()
