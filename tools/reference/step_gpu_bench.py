#!/usr/bin/env python3
"""PyTorch baseline for `megamoe bench step`: one training step of the config's MoE decoder.

Builds the decoder of a megamoe config (e.g. configs/gpu_1b.toml) in plain PyTorch —
embedding, pre-norm blocks (RMSNorm, GQA attention with rotate-half RoPE through
scaled_dot_product_attention, SwiGLU dense FFN for the first dense layers, MoE elsewhere:
softmax router -> top-k -> renorm, sort + torch._grouped_mm SwiGLU experts, shared
expert, switch aux loss), final RMSNorm, LM head, cross-entropy — with bf16 weights and
fused AdamW, and times whole steps (forward, backward, optimizer) eager and with
torch.compile. CUDA-event timing, median of --iters after --warmup, random tokens.

MFU counts 6 * N_active (embedding excluded) + causal attention 6 * L * s * d per token,
against --peak TFLOP/s (989: H100/H200 dense bf16).

  python3 tools/reference/step_gpu_bench.py --config configs/gpu_1b.toml [--json out.json]
"""
import argparse
import json
import math
import statistics
import tomllib

import torch
import torch.nn.functional as F


def cfg_from(path):
    with open(path, "rb") as f:
        c = tomllib.load(f)
    m, moe, tr = c["model"], c.get("moe", {}), c["train"]
    return {
        "vocab": m["vocab_size"], "d": m["d_model"], "layers": m["n_layers"],
        "heads": m["n_heads"], "kv_heads": m.get("n_kv_heads", m["n_heads"]),
        "ffn": m["ffn_hidden"], "seq": m["seq_len"], "theta": m.get("rope_theta", 10000.0),
        "eps": m.get("norm_eps", 1e-5), "experts": moe.get("routed_experts", 0),
        "top_k": moe.get("top_k", 1), "expert_hidden": moe.get("expert_hidden", 0),
        "shared": moe.get("shared_experts", 0) * moe.get("shared_expert_hidden", 0),
        "first_dense": moe.get("first_dense_layers", 1),
        "aux": moe.get("aux_loss_weight", 0.01), "batch": tr["global_batch"],
    }


def rope_tables(seq, hd, theta, device):
    inv = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope(x, cos, sin):  # x [B, H, T, D], rotate-half
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w13 = torch.nn.Linear(d, 2 * f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)
        self.f = f

    def forward(self, x):
        h = self.w13(x)
        return self.w2(F.silu(h[..., : self.f]) * h[..., self.f:])


class MoE(torch.nn.Module):
    def __init__(self, d, e, k, f, shared, align=16):
        super().__init__()
        self.router = torch.nn.Linear(d, e, bias=False)
        self.w13 = torch.nn.Parameter(torch.randn(e, 2 * f, d) / d**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, d, f) / f**0.5)
        self.shared = SwiGLU(d, shared) if shared else None
        self.e, self.k, self.f, self.align = e, k, f, align

    def forward(self, x):
        t, d = x.shape
        e, k, f, align = self.e, self.k, self.f, self.align
        logits = x.float() @ self.router.weight.float().t()
        probs = torch.softmax(logits, -1)
        gate, idx = torch.topk(probs, k, -1)
        gate = gate / (gate.sum(-1, keepdim=True) + 1e-20)
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=e)
        aux = e * (counts.float() / (t * k) * probs.mean(0)).sum()
        order = torch.argsort(flat, stable=True)
        sorted_e = flat[order]
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0)
        starts = torch.cumsum(counts, 0) - counts
        dest = (ends - padded)[sorted_e] + torch.arange(t * k, device=x.device) - starts[sorted_e]
        tok = order // k
        xs = torch.zeros(t * k + align * e, d, device=x.device, dtype=x.dtype)
        xs = xs.index_copy(0, dest, x[tok])
        offs = ends.to(torch.int32)
        h = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs)
        a = F.silu(h[:, :f]) * h[:, f:]
        ys = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        contrib = ys[dest].float() * gate.reshape(-1)[order, None]
        y = torch.zeros(t, d, device=x.device, dtype=torch.float32).index_add(0, tok, contrib)
        y = y.to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, aux


class Block(torch.nn.Module):
    def __init__(self, c, dense):
        super().__init__()
        d = c["d"]
        self.hd = d // c["heads"]
        self.nh, self.nkv = c["heads"], c["kv_heads"]
        self.n1 = torch.nn.RMSNorm(d, eps=c["eps"])
        self.n2 = torch.nn.RMSNorm(d, eps=c["eps"])
        self.qkv = torch.nn.Linear(d, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.o = torch.nn.Linear(self.nh * self.hd, d, bias=False)
        if dense:
            self.ffn = SwiGLU(d, c["ffn"])
        else:
            self.ffn = MoE(d, c["experts"], c["top_k"], c["expert_hidden"], c["shared"])
        self.dense = dense

    def forward(self, x, cos, sin):  # x [B, T, d]
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).split(
            [self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = rope(q.view(b, t, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = rope(k.view(b, t, self.nkv, self.hd).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.nkv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        if self.dense:
            return x + self.ffn(h), torch.zeros((), device=x.device)
        y, aux = self.ffn(h.reshape(b * t, d))
        return x + y.view(b, t, d), aux


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.emb = torch.nn.Embedding(c["vocab"], c["d"])
        self.blocks = torch.nn.ModuleList(
            [Block(c, i < c["first_dense"]) for i in range(c["layers"])])
        self.norm = torch.nn.RMSNorm(c["d"], eps=c["eps"])
        self.head = torch.nn.Linear(c["d"], c["vocab"], bias=False)

    def forward(self, ids, targets, cos, sin):
        x = self.emb(ids)
        aux = torch.zeros((), device=ids.device)
        for blk in self.blocks:
            x, a = blk(x, cos, sin)
            aux = aux + a
        logits = self.head(self.norm(x)).float()
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        return loss + self.c["aux"] * aux


def n_active(c):
    d, hd = c["d"], c["d"] // c["heads"]
    attn = d * (c["heads"] + 2 * c["kv_heads"]) * hd + c["heads"] * hd * d
    dense = 3 * d * c["ffn"]
    moe = c["top_k"] * 3 * d * c["expert_hidden"] + 3 * d * c["shared"] + d * c["experts"]
    nd = c["first_dense"]
    return c["layers"] * attn + nd * dense + (c["layers"] - nd) * moe + d * c["vocab"]


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


def bench(c, compiled, warmup, iters, peak):
    torch.manual_seed(0)
    dev = "cuda"
    model = Model(c).to(dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    cos, sin = rope_tables(c["seq"], c["d"] // c["heads"], c["theta"], dev)
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), device=dev)
    tgt = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), device=dev)
    fwd = torch.compile(model) if compiled else model
    losses = []

    def step():
        loss = fwd(ids, tgt, cos, sin)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    torch.cuda.reset_peak_memory_stats()
    ms = timed(step, warmup, iters)
    tokens = c["batch"] * c["seq"]
    flops = tokens * (6 * n_active(c) + 6 * c["layers"] * c["seq"] * c["d"])
    res = {
        "mode": "torch.compile" if compiled else "eager", "step_ms": ms,
        "tokens_per_s": tokens / ms * 1e3, "mfu": flops / (ms * 1e-3) / (peak * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
        "params": sum(p.numel() for p in model.parameters()), "active": n_active(c),
    }
    del model, opt, fwd
    torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak", type=float, default=989.0, help="peak bf16 TFLOP/s")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    c = cfg_from(a.config)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": c,
           "runs": []}
    modes = [False] if a.no_compile else [False, True]
    for compiled in modes:
        r = bench(c, compiled, a.warmup, a.iters, a.peak)
        res["runs"].append(r)
        print(f"{res['device']} torch {res['torch']} {r['mode']:<13} step {r['step_ms']:7.1f} ms "
              f"{r['tokens_per_s'] / 1e3:6.1f} k tok/s MFU {100 * r['mfu']:5.1f} % "
              f"peak {r['peak_mem_gib']:5.1f} GiB loss {r['first_loss']:.3f} -> "
              f"{r['last_loss']:.3f} (params {r['params'] / 1e9:.3f} B, active "
              f"{r['active'] / 1e9:.3f} B)", flush=True)
        assert math.isfinite(r["last_loss"]), "non-finite loss"
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
