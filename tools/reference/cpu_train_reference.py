#!/usr/bin/env python3
"""Eager PyTorch model of `megamoe train`'s default config, for a CPU speed comparison.

What `megamoe train` runs with no arguments (the built-in tiny config, `megamoe config`):
a decoder-only transformer, vocab 256, d_model 64, 4 pre-norm blocks (RMSNorm, eps 1e-5),
causal attention with 4 query heads and 2 KV heads (grouped-query, head size 16,
rotate-half RoPE with base 10000), embeddings tied to the output head, a final RMSNorm.
Layer 0 has a dense SwiGLU FFN of width 256; layers 1-3 are MoE: a linear router over
8 experts (no bias), top-2 on the logits, softmax over the 2 chosen (no renormalisation,
route scale 1), SwiGLU experts of width 128, dropless, plus one always-on SwiGLU shared
expert of width 128 (no gate). Losses: token cross-entropy + 0.01 * Switch aux loss
(E * sum_i f_i * P_i, f from the top-k counts) + 0.001 * router z-loss, per MoE layer.
AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices and the
embedding, none on norms), global gradient-norm clip 1.0, linear warmup 20 steps then
cosine to 3e-4 over 300 steps. Batch 16 sequences of 64 tokens = 1024 tokens per step.

The experts run as PyTorch users write them: gather each expert's tokens with the
top-k indices, one SwiGLU per expert, index_add back (what `tools/reference/moe_gpu_bench.py`
calls the per-expert loop). Data: random byte sequences (the speed does not depend on them).

Timing: `--warmup` steps untimed, then `--steps` timed steps of forward, backward, clip,
AdamW and LR update; prints tokens/s over the timed steps. Threads: `--threads` (2 by
default, the machine the comparison is made on).

    python3 tools/reference/cpu_train_reference.py --steps 300 --warmup 20

On a machine that other processes also load, set OMP_WAIT_POLICY=PASSIVE: OpenMP's default
spin-waiting then makes every small matmul tens of times slower (docs/perf.md).
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F


class Cfg:
    vocab = 256
    d = 64
    layers = 4
    heads = 4
    kv_heads = 2
    ffn = 256
    seq = 64
    theta = 10000.0
    eps = 1e-5
    experts = 8
    top_k = 2
    expert_hidden = 128
    shared_hidden = 128
    first_dense = 1
    aux_w = 0.01
    z_w = 0.001
    batch = 16
    lr = 3e-3
    min_lr = 3e-4
    warmup = 20
    total_steps = 300
    wd = 0.1
    betas = (0.9, 0.95)
    adam_eps = 1e-8
    clip = 1.0


class RmsNorm(torch.nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGlu(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, h, bias=False)
        self.up_proj = torch.nn.Linear(d, h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(c):
    hd = c.d // c.heads
    inv = 1.0 / (c.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(c.seq, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        hd = c.d // c.heads
        self.q_proj = torch.nn.Linear(c.d, c.heads * hd, bias=False)
        self.k_proj = torch.nn.Linear(c.d, c.kv_heads * hd, bias=False)
        self.v_proj = torch.nn.Linear(c.d, c.kv_heads * hd, bias=False)
        self.o_proj = torch.nn.Linear(c.heads * hd, c.d, bias=False)

    def forward(self, x, cos, sin):
        c = self.c
        b, t, _ = x.shape
        hd = c.d // c.heads
        q = self.q_proj(x).view(b, t, c.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c.heads // c.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, c.heads * hd))


class Moe(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.router = torch.nn.Linear(c.d, c.experts, bias=False)
        self.experts = torch.nn.ModuleList(SwiGlu(c.d, c.expert_hidden) for _ in range(c.experts))
        self.shared = SwiGlu(c.d, c.shared_hidden)

    def forward(self, x):
        c = self.c
        shape = x.shape
        x = x.reshape(-1, c.d)
        n = x.shape[0]
        logits = self.router(x)
        top_logits, top_idx = logits.topk(c.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)
        y = torch.zeros_like(x)
        flat_idx = top_idx.reshape(-1)
        token_of = torch.arange(n).repeat_interleave(c.top_k)
        flat_gate = gates.reshape(-1)
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=c.experts)
        start = 0
        for e, cnt in enumerate(counts.tolist()):
            if cnt == 0:
                continue
            sel = order[start:start + cnt]
            start += cnt
            tok = token_of[sel]
            out = self.experts[e](x[tok]) * flat_gate[sel].unsqueeze(-1)
            y = y.index_add(0, tok, out)
        y = y + self.shared(x)
        probs = logits.softmax(dim=-1)
        f = counts.to(x.dtype) / (c.top_k * n)
        aux = c.experts * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y.view(shape), c.aux_w * aux + c.z_w * z


class Block(torch.nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.input_layernorm = RmsNorm(c.d, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RmsNorm(c.d, c.eps)
        self.moe = layer >= c.first_dense
        self.mlp = Moe(c) if self.moe else SwiGlu(c.d, c.ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if self.moe:
            f, loss = self.mlp(self.post_attention_layernorm(x))
        else:
            f, loss = self.mlp(self.post_attention_layernorm(x)), x.new_zeros(())
        return x + f, loss


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = torch.nn.Embedding(c.vocab, c.d)
        self.layers = torch.nn.ModuleList(Block(c, l) for l in range(c.layers))
        self.norm = RmsNorm(c.d, c.eps)
        cos, sin = rope_tables(c)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets):
        x = self.embed_tokens(ids)
        router_loss = x.new_zeros(())
        for blk in self.layers:
            x, loss = blk(x, self.cos, self.sin)
            router_loss = router_loss + loss
        logits = F.linear(self.norm(x), self.embed_tokens.weight)
        ce = F.cross_entropy(logits.view(-1, self.c.vocab), targets.reshape(-1))
        return ce + router_loss, ce


def lr_at(c, step):
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    frac = min(1.0, (step - c.warmup) / max(1, c.total_steps - c.warmup))
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + math.cos(math.pi * frac))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    c = Cfg()
    model = Model(c)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=c.lr, betas=c.betas, eps=c.adam_eps, foreach=True,
    )
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)

    def step(i):
        data = torch.randint(0, c.vocab, (c.batch, c.seq + 1), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(c, i)
        opt.zero_grad(set_to_none=True)
        total, ce = model(data[:, :-1], data[:, 1:])
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip, foreach=True)
        opt.step()
        return ce

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        ce = step(args.warmup + i)
    ce = float(ce.detach())
    dt = time.perf_counter() - t0
    tokens = args.steps * c.batch * c.seq
    print(
        f"torch {torch.__version__} threads {torch.get_num_threads()} params {n_params} | "
        f"{args.steps} steps x {c.batch * c.seq} tokens in {dt:.2f} s = "
        f"{tokens / dt:.0f} tokens/s ({1e3 * dt / args.steps:.1f} ms/step) | last ce {ce:.3f}"
    )


if __name__ == "__main__":
    main()
