#!/usr/bin/env python3
"""PyTorch baselines for `megamoe bench moe`, run on the same GPU in the same lease.

Times the MoE layer (f32 router softmax -> top-k -> renorm, gather, SwiGLU experts,
weighted index_add_ combine; backward of all of it through autograd) two ways:
  loop     one pair of GEMMs per expert (host reads the token lists)
  grouped  sort by expert + torch._grouped_mm (groups padded to 16 rows)
plus the two ceilings: a bf16 8192^3 GEMM and a device-to-device copy.
CUDA-event timing, median of --iters runs after --warmup. bf16 weights and data.

  python3 tools/reference/moe_gpu_bench.py --shape deepseek mixtral [--json out.json]
"""
import argparse
import json
import statistics

import torch

SHAPES = {  # T, d, h, E, k
    "mixtral": (8192, 4096, 14336, 8, 2),
    "deepseek": (16384, 2048, 1408, 64, 6),
}


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def route(x, wr, k):
    logits = x.float() @ wr.float().t()
    probs = torch.softmax(logits, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)
    gate = gate / (gate.sum(-1, keepdim=True) + 1e-20)
    return gate, idx


def swiglu(h, f):
    g, u = h[:, :f], h[:, f:]
    return torch.nn.functional.silu(g) * u


def layer_loop(x, wr, w13, wd, k):
    t, d = x.shape
    e, f2, _ = w13.shape
    gate, idx = route(x, wr, k)
    y = torch.zeros(t, d, device=x.device, dtype=torch.float32)
    flat = idx.reshape(-1)
    tok = torch.arange(t, device=x.device).repeat_interleave(k)
    g = gate.reshape(-1)
    for ex in range(e):
        sel = (flat == ex).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        xe = x[tok[sel]]
        a = swiglu(xe @ w13[ex].t(), f2 // 2)
        ye = a @ wd[ex].t()
        y = y.index_add(0, tok[sel], ye.float() * g[sel, None])
    return y.to(x.dtype)


def layer_grouped(x, wr, w13, wd, k, align=16):
    t, d = x.shape
    e, f2, _ = w13.shape
    gate, idx = route(x, wr, k)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    starts_pad = ends - padded
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=x.device) - starts[sorted_e]
    dest = starts_pad[sorted_e] + rank
    tok = order // k
    total = t * k + align * e  # static upper bound: no host read of the padded total
    xs = torch.zeros(total, d, device=x.device, dtype=x.dtype)
    xs = xs.index_copy(0, dest, x[tok])
    offs = ends.to(torch.int32)
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    a = swiglu(h, f2 // 2)
    ys = torch._grouped_mm(a, wd.transpose(-2, -1), offs=offs)
    contrib = ys[dest].float() * gate.reshape(-1)[order, None]
    y = torch.zeros(t, d, device=x.device, dtype=torch.float32).index_add(0, tok, contrib)
    return y.to(x.dtype)


def bench_shape(name, warmup, iters, seed):
    t, d, h, e, k = SHAPES[name]
    torch.manual_seed(seed)
    dev = "cuda"
    bf = torch.bfloat16
    x = torch.randn(t, d, device=dev, dtype=bf, requires_grad=True)
    wr = (torch.randn(e, d, device=dev) / d**0.5).to(bf).requires_grad_()
    w13 = (torch.randn(e, 2 * h, d, device=dev, dtype=bf) / d**0.5).requires_grad_()
    wd = (torch.randn(e, d, h, device=dev, dtype=bf) / h**0.5).requires_grad_()
    dy = torch.randn(t, d, device=dev, dtype=bf)
    flops = 6.0 * t * k * d * h
    out = {"shape": name, "T": t, "d": d, "h": h, "E": e, "k": k}
    # correctness of the grouped layer against the loop (same function)
    with torch.no_grad():
        ref = layer_loop(x, wr, w13, wd, k).float()
        got = layer_grouped(x, wr, w13, wd, k).float()
        out["grouped_vs_loop_rel"] = ((got - ref).norm() / ref.norm()).item()
    for kind, fn in [("loop", layer_loop), ("grouped", layer_grouped)]:
        def fwd():
            with torch.no_grad():
                fn(x, wr, w13, wd, k)

        def fwd_bwd():
            y = fn(x, wr, w13, wd, k)
            y.backward(dy)
            x.grad = wr.grad = w13.grad = wd.grad = None

        f_ms = timed(fwd, warmup, iters)
        fb_ms = timed(fwd_bwd, warmup, iters)
        out[kind] = {
            "fwd_ms": f_ms,
            "fwd_bwd_ms": fb_ms,
            "fwd_tflops": flops / f_ms / 1e9,
            "fwd_bwd_tflops": 3 * flops / fb_ms / 1e9,
        }
    del x, wr, w13, wd, dy
    torch.cuda.empty_cache()
    return out


def ceilings(warmup, iters):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, warmup, iters)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    cms = timed(lambda: dst.copy_(src), warmup, iters)
    return {
        "gemm_bf16_8192_tflops": 2 * 8192**3 / ms / 1e9,
        "copy_gbps_read_plus_write": 2 * src.numel() * 2 / cms / 1e6,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=["deepseek", "mixtral"], choices=list(SHAPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["ceilings"] = ceilings(a.warmup, a.iters)
    res["moe"] = [bench_shape(s, a.warmup, a.iters, a.seed) for s in a.shape]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{res['device']}, torch {res['torch']}: GEMM bf16 8192^3 "
          f"{res['ceilings']['gemm_bf16_8192_tflops']:.0f} TFLOP/s, copy "
          f"{res['ceilings']['copy_gbps_read_plus_write']:.0f} GB/s")
    for m in res["moe"]:
        for kind in ("loop", "grouped"):
            r = m[kind]
            print(f"torch {m['shape']:<9} {kind:<8} fwd {r['fwd_ms']:7.2f} ms "
                  f"({r['fwd_tflops']:5.0f} TFLOP/s)  fwd+bwd {r['fwd_bwd_ms']:7.2f} ms "
                  f"({r['fwd_bwd_tflops']:5.0f} TFLOP/s)")
        print(f"torch {m['shape']:<9} grouped vs loop rel {m['grouped_vs_loop_rel']:.2e}")


if __name__ == "__main__":
    main()
