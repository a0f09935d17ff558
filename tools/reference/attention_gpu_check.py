#!/usr/bin/env python3
"""PyTorch reference for `megamoe bench attention`: parity and timing of causal attention.

1. Parity: reads the safetensors file `megamoe bench attention --dump FILE` wrote (q, k,
   v, d_o as the bf16 values megamoe used, and each fused path's o, lse, dq, dk, dv with
   the path as suffix: o_cudnn, dq_fused, ...; unsuffixed names from older dumps), runs
   torch.nn.functional.scaled_dot_product_attention(is_causal=True) in float64 on the GPU
   on the same inputs, backward with d_o, and prints ||got - ref|| / ||ref|| for each.
2. Timing: the same shape in bf16 through SDPA with PyTorch's default backend (flash) and
   with cuDNN forced, forward and forward+backward; CUDA events, median of --iters after
   --warmup; TFLOP/s with causal forward 2*BH*T^2*D and backward 2.5x that.

  python3 tools/reference/attention_gpu_check.py --dump attn.safetensors
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def parity(path):
    t = {k: v.cuda() for k, v in load_file(path).items()}
    bh, s, d = t["q"].shape
    group = bh // t["k"].shape[0]  # grouped-query: query row r reads KV row r // group
    q, k, v = (t[n].double().unsqueeze(0).requires_grad_() for n in ("q", "k", "v"))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5,
                                       enable_gqa=group > 1)
    o.backward(t["d_o"].double().unsqueeze(0))
    scores = (q[0] @ k[0].repeat_interleave(group, 0).transpose(1, 2)) * d ** -0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
    lse = scores.masked_fill(mask, float("-inf")).logsumexp(-1)
    refs = {"o": o[0], "lse": lse, "dq": q.grad[0], "dk": k.grad[0], "dv": v.grad[0]}
    tags = sorted({n.split("_", 1)[1] for n in t if n.startswith("o_")}) or [None]
    print(f"parity vs torch SDPA (float64), BH {bh}, KV rows {bh // group}, T {s}, D {d}")
    for tag in tags:
        worst = 0.0
        print(f"  path {tag or 'fused'} vs float64 torch")
        for name, ref in refs.items():
            key = f"{name}_{tag}" if tag else name
            if key not in t:
                continue
            got = t[key]
            r = rel(got, ref)
            nan = bool(torch.isnan(got).any())
            worst = max(worst, r if not nan else float("inf"))
            print(f"    {name:<4} rel {r:.3e}{'  NaN!' if nan else ''}")
        print(f"    worst {worst:.3e} ({'PASS' if worst <= 1e-2 else 'FAIL'} at 1e-2)")
    # the fused paths against the GEMM-based (unfused) path megamoe ran on the same inputs
    for tag in (x for x in tags if x not in (None, "unfused") and "o_unfused" in t):
        diffs = ", ".join(f"{n} {rel(t[f'{n}_{tag}'], t[f'{n}_unfused']):.3e}" for n in ("o", "dq", "dk", "dv"))
        print(f"  {tag} vs unfused (megamoe GEMM path): {diffs}")
    return bh, s, d


def bench(bh, s, d, backend, warmup, iters, bh_kv=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    bh_kv = bh_kv or bh
    q, k, v, d_o = mk(bh), mk(bh_kv), mk(bh_kv), mk(bh)
    for x in (q, k, v):
        x.requires_grad_()

    def run(bwd):
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=bh_kv < bh)
            if bwd:
                o.backward(d_o)

    out = []
    for bwd in (False, True):
        ms = []
        for i in range(warmup + iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(bwd)
            b.record()
            torch.cuda.synchronize()
            if i >= warmup:
                ms.append(a.elapsed_time(b))
        out.append(statistics.median(ms))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dump", help="file written by megamoe bench attention --dump")
    p.add_argument("--shape", default="64,4096,128", help="BH,T,D for the timing")
    p.add_argument("--kv-rows", type=int, default=None, help="B*kv_heads (GQA) for the timing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    if a.dump:
        parity(a.dump)
    bh, s, d = (int(x) for x in a.shape.split(","))
    from torch.nn.attention import SDPBackend
    flops = 2.0 * bh * s * s * d
    print(f"torch {torch.__version__} SDPA bf16 causal, BH {bh}, KV rows {a.kv_rows or bh}, T {s}, D {d}")
    print(f"{'backend':<10} {'fwd ms':>10} {'TFLOP/s':>9} {'fwd+bwd ms':>11} {'TFLOP/s':>9}")
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            f, fb = bench(bh, s, d, be, a.warmup, a.iters, a.kv_rows)
            print(f"{name:<10} {f:>10.3f} {flops / f / 1e9:>9.1f} {fb:>11.3f} {3.5 * flops / fb / 1e9:>9.1f}")
        except RuntimeError as e:
            print(f"{name:<10} unavailable: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main()
