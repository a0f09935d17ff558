#!/usr/bin/env python3
"""Independent PyTorch reference of megamoe's MoE layer (forward + autograd backward).

What this is
    A deliberately plain, loop-based float64 implementation of one MoE layer as
    specified by docs/moe.md and refined by the MoE decisions numbered
    below. It exists to check the Rust layer: it shares no code with
    it, computes every gradient with torch autograd, and reads/writes the probe
    format of `megamoe probe moe`.

What this is not
    Fast, distributed, or a training layer. Per-token and per-expert Python
    loops are used on purpose: each line should read like the spec.

Semantics (the numbering follows the lead's decisions)
    Shapes: x [T, d]; T = (number of sequences) * S with S = model.seq_len.
    1. logits z = x @ router.weight^T                               [T, E]
    7. null slots (moe.null_rho in (0, 1)): n_null = max(1, floor(E(1-rho)/rho)),
       k_max = min(ceil(k/rho), E + n_null); one learned row router.null_weight
       [1, d] whose logit is replicated n_null times: pool logits [T, E+n_null],
       null copies at indices E .. E+n_null-1. Without null slots the pool is E.
    2. scores: softmax & pre_softmax -> s = softmax(z_pool);
       softmax & !pre_softmax -> selection on logits, gates = softmax of the
       chosen logits; sigmoid -> s = sigmoid(z_pool).
    3. selection score = (s, or z for softmax & !pre_softmax) + b, with b the
       expert bias on real experts (0 on null copies, 0 when disabled).
    4. group-limited routing (n_groups G > 1): group score = sum of the top-2
       selection scores in the group (top-1 if E/G == 1); keep best topk_groups
       groups (ties -> lower group), other experts get -inf.
    5. top-k (k, or k_max with null slots): descending selection score, ties ->
       lower index.
    6. gates g = s[chosen] (pre_softmax false: softmax of the chosen logits,
       computed over all chosen pool slots). Only chosen REAL experts keep a
       gate; if normalize: g /= (sum over chosen real g + 1e-20); g *= route_scale.
    8. capacity C = ceil(T*k/E*cf) per real expert (k = top_k); "probs" keeps the
       C highest gates (ties -> lower token, then lower slot), "position" the
       first C in (token, slot) order; dropped assignments contribute zero and
       other gates are NOT renormalised. No capacity_factor = dropless.
    9. experts: swiglu (silu(x Wg^T) * (x Wu^T)) Wd^T; relu2 relu(x Wu^T)^2 Wd^T;
       gelu gelu_erf(x Wu^T) Wd^T.  y_r[t] = sum over kept g * expert(x_t).
   10. shared experts: one dense FFN of hidden shared_experts*shared_expert_hidden,
       same activation; optional gate sigmoid(x @ shared_expert_gate.weight^T).
   11. losses over the pool (size Ep, picks kk = k or k_max): count_i = picks of
       slot i before capacity, f_i = count_i/(kk*T), P_i = mean_t p[t, i] with
       p = softmax(z_pool) (softmax) or sigmoid(z_pool)/row-sum (sigmoid);
       aux = Ep * sum_i f_i P_i (gradient through P only); seq_aux = the same per
       sequence of S tokens, averaged; global_aux = aux in one call; none = 0.
       z = mean_t logsumexp(z_pool[t])^2.
       Probe objective L = sum(y * dy) + aux_loss_weight*aux + z_loss_weight*z.
   12. probe outputs (all f32): y, aux_loss [1], z_loss [1] (unweighted),
       tokens_per_expert [E] (kept, after capacity), dropped [1], dx,
       grad.<param> for every parameter except router.expert_bias.

Commands
    probe     --config C.toml --tensors IN.safetensors --out OUT.safetensors
    inputs    --config C.toml --tokens T --seed N --out IN.safetensors
    compare   REF.safetensors GOT.safetensors [--rtol 1e-5]
    fixtures  --out-dir crates/megamoe-moe/tests/fixtures
    selftest
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Selection/capacity decisions must be at least this far from a tie so that an
# f32 implementation makes the same discrete choices as this f64 reference.
MIN_MARGIN = 1e-3
# Budget for |f32 run - f64 run| / max|f64| per tensor when making fixtures;
# a fifth of the 1e-5 tolerance the Rust tests use.
F32_BUDGET = 2e-6
# Tensors holding integer counts are compared exactly, never relatively.
COUNT_TENSORS = ("tokens_per_expert", "dropped")


class ConfigError(ValueError):
    """A config value breaks a rule (names the field, value and rule)."""


class TensorError(ValueError):
    """An input tensor is missing or has the wrong shape or dtype."""


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def null_slot_plan(n_routed: int, top_k: int, null_rho: float) -> tuple[int, int]:
    """Seed plan: returns (n_null_copies, k_max). Exact formulas of the seed."""
    if n_routed <= 0:
        raise ConfigError(f"moe.routed_experts={n_routed} must be > 0")
    if top_k <= 0:
        raise ConfigError(f"moe.top_k={top_k} must be > 0")
    if not (0.0 < null_rho <= 1.0):
        raise ConfigError(f"moe.null_rho={null_rho} must be in (0, 1]")
    if null_rho < 1.0:
        n_null = max(1, math.floor(n_routed * (1.0 - null_rho) / null_rho))
        k_max = math.ceil(top_k / null_rho)
    else:
        n_null, k_max = 0, top_k
    return n_null, min(k_max, n_routed + n_null)


def expert_capacity(tokens: int, top_k: int, n_routed: int, capacity_factor: float | None):
    """C = ceil(T * k / E * cf) per expert; None means dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(tokens * top_k / n_routed * capacity_factor)


@dataclass(frozen=True)
class MoeConfig:
    """The [model] and [moe] keys the layer needs, with defaults resolved."""

    d_model: int
    seq_len: int
    routed_experts: int
    top_k: int
    expert_hidden: int
    activation: str = "swiglu"
    score_fn: str = "softmax"
    pre_softmax: bool = False
    normalize: bool = False
    route_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    expert_bias: bool = False
    null_rho: float = 1.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    shared_experts: int = 0
    shared_expert_hidden: int = 0
    shared_expert_gate: bool = False
    aux_loss: str = "aux"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    # derived
    n_null: int = 0
    k_max: int = 0

    @property
    def pool(self) -> int:
        """Number of router slots: real experts plus null copies."""
        return self.routed_experts + self.n_null

    @property
    def picks(self) -> int:
        """Slots each token picks: k, or k_max with null slots."""
        return self.k_max


MOE_DEFAULTS = dict(
    activation="swiglu",
    score_fn="softmax",
    pre_softmax=False,
    route_scale=1.0,
    n_groups=1,
    topk_groups=1,
    expert_bias=False,
    null_rho=1.0,
    capacity_factor=None,
    drop_policy="probs",
    pad_to_capacity=False,
    shared_experts=0,
    shared_expert_gate=False,
    aux_loss="aux",
    aux_loss_weight=0.01,
    z_loss_weight=1e-3,
)
MOE_REQUIRED = ("routed_experts", "top_k", "expert_hidden")
MOE_OPTIONAL = tuple(MOE_DEFAULTS) + ("normalize", "shared_expert_hidden")


def config_from_dict(doc: dict) -> MoeConfig:
    """Build and validate a MoeConfig from a parsed megamoe TOML document."""
    model = doc.get("model", {})
    moe = doc.get("moe")
    if moe is None:
        raise ConfigError("config has no [moe] table")
    for key in ("d_model", "seq_len"):
        if key not in model:
            raise ConfigError(f"model.{key} is missing")
    for key in MOE_REQUIRED:
        if key not in moe:
            raise ConfigError(f"moe.{key} is missing")
    for key in moe:
        if key not in MOE_REQUIRED and key not in MOE_OPTIONAL:
            print(f"warning: moe.{key} is not used by the reference", file=sys.stderr)
    v = dict(MOE_DEFAULTS)
    v.update({k: moe[k] for k in moe if k in MOE_REQUIRED or k in MOE_OPTIONAL})

    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")

    positive_int("model.d_model", model["d_model"])
    positive_int("model.seq_len", model["seq_len"])
    for key in ("routed_experts", "top_k", "expert_hidden", "n_groups", "topk_groups"):
        positive_int(f"moe.{key}", v[key])
    E, k = v["routed_experts"], v["top_k"]
    if k > E:
        raise ConfigError(f"moe.top_k={k} must be <= moe.routed_experts={E}")
    if v["activation"] not in ("swiglu", "relu2", "gelu"):
        raise ConfigError(f"moe.activation={v['activation']!r} must be swiglu|relu2|gelu")
    if v["score_fn"] not in ("softmax", "sigmoid"):
        raise ConfigError(f"moe.score_fn={v['score_fn']!r} must be softmax|sigmoid")
    if v["drop_policy"] not in ("probs", "position"):
        raise ConfigError(f"moe.drop_policy={v['drop_policy']!r} must be probs|position")
    if v["aux_loss"] not in ("aux", "seq_aux", "global_aux", "none"):
        raise ConfigError(f"moe.aux_loss={v['aux_loss']!r} must be aux|seq_aux|global_aux|none")
    cf = v["capacity_factor"]
    if cf is not None and not cf > 0:
        raise ConfigError(f"moe.capacity_factor={cf} must be > 0")
    G, M = v["n_groups"], v["topk_groups"]
    if E % G != 0:
        raise ConfigError(f"moe.n_groups={G} must divide moe.routed_experts={E}")
    if M > G:
        raise ConfigError(f"moe.topk_groups={M} must be <= moe.n_groups={G}")
    if k > M * (E // G):
        raise ConfigError(
            f"moe.top_k={k} must be <= moe.topk_groups*experts_per_group={M * (E // G)}"
        )
    rho = float(v["null_rho"])
    n_null, k_max = null_slot_plan(E, k, rho)
    if n_null > 0 and G > 1:
        raise ConfigError(f"moe.null_rho={rho} cannot be combined with moe.n_groups={G} > 1")
    if v["shared_experts"] < 0:
        raise ConfigError(f"moe.shared_experts={v['shared_experts']} must be >= 0")
    if v["shared_expert_gate"] and v["shared_experts"] == 0:
        raise ConfigError("moe.shared_expert_gate=true needs moe.shared_experts >= 1")
    if "shared_expert_hidden" not in v:
        v["shared_expert_hidden"] = v["expert_hidden"]
    if "normalize" not in v:
        sigmoid = v["score_fn"] == "sigmoid"
        v["normalize"] = sigmoid or (v["pre_softmax"] and k > 1)
    return MoeConfig(
        d_model=model["d_model"],
        seq_len=model["seq_len"],
        routed_experts=E,
        top_k=k,
        expert_hidden=v["expert_hidden"],
        activation=v["activation"],
        score_fn=v["score_fn"],
        pre_softmax=bool(v["pre_softmax"]),
        normalize=bool(v["normalize"]),
        route_scale=float(v["route_scale"]),
        n_groups=G,
        topk_groups=M,
        expert_bias=bool(v["expert_bias"]),
        null_rho=rho,
        capacity_factor=None if cf is None else float(cf),
        drop_policy=v["drop_policy"],
        pad_to_capacity=bool(v["pad_to_capacity"]),
        shared_experts=v["shared_experts"],
        shared_expert_hidden=v["shared_expert_hidden"],
        shared_expert_gate=bool(v["shared_expert_gate"]),
        aux_loss=v["aux_loss"],
        aux_loss_weight=float(v["aux_loss_weight"]),
        z_loss_weight=float(v["z_loss_weight"]),
        n_null=n_null,
        k_max=k_max,
    )


def load_config(path: str | Path, overrides: list[str] | None = None) -> MoeConfig:
    """Reads a megamoe TOML config; `overrides` are `section.key=value` strings, applied
    the way `megamoe --set` applies them (the value parsed as TOML, else a bare string)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    for item in overrides or []:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key or "." in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. moe.top_k=2")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item!r}: `{section}` is not a table")
        table[key] = value
    return config_from_dict(doc)


# --------------------------------------------------------------------------
# Tensors in
# --------------------------------------------------------------------------


def parameter_shapes(cfg: MoeConfig) -> dict[str, tuple[int, ...]]:
    """Trainable parameters (probe names, PyTorch Linear layout) and their shapes."""
    E, d, h = cfg.routed_experts, cfg.d_model, cfg.expert_hidden
    shapes = {"router.weight": (E, d)}
    if cfg.n_null > 0:
        shapes["router.null_weight"] = (1, d)
    if cfg.activation == "swiglu":
        shapes["experts.gate_proj"] = (E, h, d)
    shapes["experts.up_proj"] = (E, h, d)
    shapes["experts.down_proj"] = (E, d, h)
    if cfg.shared_experts > 0:
        hs = cfg.shared_experts * cfg.shared_expert_hidden
        if cfg.activation == "swiglu":
            shapes["shared_experts.gate_proj"] = (hs, d)
        shapes["shared_experts.up_proj"] = (hs, d)
        shapes["shared_experts.down_proj"] = (d, hs)
    if cfg.shared_expert_gate:
        shapes["shared_expert_gate.weight"] = (1, d)
    return shapes


def input_shapes(cfg: MoeConfig, tokens: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the probe reads, with its expected shape."""
    shapes = {"x": (tokens, cfg.d_model), "dy": (tokens, cfg.d_model)}
    if cfg.expert_bias:
        shapes["router.expert_bias"] = (cfg.routed_experts,)
    shapes.update(parameter_shapes(cfg))
    return shapes


def check_inputs(cfg: MoeConfig, tensors: dict[str, torch.Tensor]) -> int:
    """Validate names, shapes and dtypes; return T."""
    if "x" not in tensors:
        raise TensorError("tensor x: missing (expected [T, d_model] f32)")
    x = tensors["x"]
    if x.dim() != 2 or x.shape[1] != cfg.d_model:
        raise TensorError(f"tensor x: expected [T, {cfg.d_model}], got {list(x.shape)}")
    T = x.shape[0]
    if T == 0 or T % cfg.seq_len != 0:
        raise TensorError(f"tensor x: T={T} must be a positive multiple of model.seq_len={cfg.seq_len}")
    expected = input_shapes(cfg, T)
    for name, shape in expected.items():
        if name not in tensors:
            raise TensorError(f"tensor {name}: missing (expected {list(shape)} f32)")
        t = tensors[name]
        if t.dtype != torch.float32:
            raise TensorError(f"tensor {name}: expected dtype f32, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise TensorError(f"tensor {name}: expected shape {list(shape)}, got {list(t.shape)}")
    for name in tensors:
        if name not in expected:
            print(f"warning: input tensor {name} is not used by this config", file=sys.stderr)
    return T


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------


@dataclass
class Assignment:
    """One (token, real expert) pick with its differentiable gate."""

    token: int
    slot: int  # rank of the pick among the token's chosen pool slots (0 = best)
    expert: int
    gate: torch.Tensor  # 0-dim
    kept: bool = True


@dataclass
class LayerResult:
    y: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    chosen: list[list[int]]  # per token: chosen pool slots, best first
    assignments: list[Assignment]
    tokens_per_expert: list[int]
    dropped: int
    margins: dict[str, float] = field(default_factory=dict)


def silu(a):
    return a * torch.sigmoid(a)


def gelu_erf(a):
    return 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))


def ffn(activation, x, up, down, gate=None):
    """One expert (or the shared FFN). up/gate: [h, d], down: [d, h]."""
    if activation == "swiglu":
        hidden = silu(x @ gate.T) * (x @ up.T)
    elif activation == "relu2":
        hidden = torch.relu(x @ up.T) ** 2
    else:
        hidden = gelu_erf(x @ up.T)
    return hidden @ down.T


def pool_logits(cfg, x, p):
    """[T, E + n_null]: real logits, then the null logit replicated n_null times."""
    z = x @ p["router.weight"].T
    if cfg.n_null > 0:
        z_null = x @ p["router.null_weight"].T  # [T, 1]
        z = torch.cat([z, z_null.expand(-1, cfg.n_null)], dim=1)
    return z


def selection_scores(cfg, z_pool, bias):
    """Detached scores used only to choose slots (bias on real experts only)."""
    with torch.no_grad():
        if cfg.score_fn == "sigmoid":
            s = torch.sigmoid(z_pool)
        elif cfg.pre_softmax:
            s = torch.softmax(z_pool, dim=-1)
        else:
            s = z_pool.clone()
        s[:, : cfg.routed_experts] += bias
        return s


def allowed_by_groups(cfg, sel_row: list[float]) -> tuple[set[int], float]:
    """Group-limited routing for one token: allowed experts and the group margin."""
    G, M = cfg.n_groups, cfg.topk_groups
    per = cfg.routed_experts // G
    group_score = []
    for g in range(G):
        members = sorted(sel_row[g * per : (g + 1) * per], reverse=True)
        group_score.append(members[0] + members[1] if per >= 2 else members[0])
    order = sorted(range(G), key=lambda g: (-group_score[g], g))
    margin = group_score[order[M - 1]] - group_score[order[M]] if M < G else math.inf
    allowed = {g * per + i for g in order[:M] for i in range(per)}
    return allowed, margin


def pick_slots(cfg, sel_row: list[float]) -> tuple[list[int], float]:
    """Top-k (k_max with nulls) by descending score, ties to lower index; and margin.

    The margin is min(score[a] - score[b]) over chosen a and eligible unchosen b,
    skipping pairs of two null copies (identical by construction: which copy
    is taken changes nothing)."""
    E = cfg.routed_experts
    eligible = [j for j in range(len(sel_row)) if sel_row[j] != -math.inf]
    order = sorted(eligible, key=lambda j: (-sel_row[j], j))
    chosen, rest = order[: cfg.picks], order[cfg.picks :]
    margin = math.inf
    for a in chosen:
        for b in rest:
            if a >= E and b >= E:
                continue
            margin = min(margin, sel_row[a] - sel_row[b])
    return chosen, margin


def token_gates(cfg, z_row, chosen):
    """Gates of the chosen real experts of one token (differentiable)."""
    idx = torch.tensor(chosen)
    if cfg.score_fn == "sigmoid":
        g = torch.sigmoid(z_row[idx])
    elif cfg.pre_softmax:
        g = torch.softmax(z_row, dim=0)[idx]
    else:
        g = torch.softmax(z_row[idx], dim=0)
    real_slots = [i for i, j in enumerate(chosen) if j < cfg.routed_experts]
    g = g[torch.tensor(real_slots, dtype=torch.long)]
    if cfg.normalize and real_slots:
        g = g / (g.sum() + 1e-20)
    g = g * cfg.route_scale
    return [(slot, chosen[slot], g[i]) for i, slot in enumerate(real_slots)]


def apply_capacity(cfg, assignments, tokens) -> float:
    """Mark dropped assignments (kept=False); return the probs-policy margin."""
    C = expert_capacity(tokens, cfg.top_k, cfg.routed_experts, cfg.capacity_factor)
    margin = math.inf
    if C is None:
        return margin
    for e in range(cfg.routed_experts):
        mine = [a for a in assignments if a.expert == e]  # in (token, slot) order
        if len(mine) <= C:
            continue
        if cfg.drop_policy == "position":
            ranked = mine
        else:
            ranked = sorted(mine, key=lambda a: (-a.gate.item(), a.token, a.slot))
            margin = min(margin, ranked[C - 1].gate.item() - ranked[C].gate.item())
        for a in ranked[C:]:
            a.kept = False
    return margin


def router_probs(cfg, z_pool):
    """p for the balancing loss: no bias, no group mask, over the whole pool."""
    if cfg.score_fn == "sigmoid":
        s = torch.sigmoid(z_pool)
        return s / s.sum(dim=-1, keepdim=True)
    return torch.softmax(z_pool, dim=-1)


def switch_aux(probs, counts, picks):
    """Ep * sum_i f_i P_i with f_i = count_i/(picks*T) (a constant), P_i = mean_t p."""
    T, Ep = probs.shape
    f = counts / (picks * T)
    return Ep * (f * probs.mean(dim=0)).sum()


def balance_loss(cfg, z_pool, chosen):
    T = z_pool.shape[0]
    if cfg.aux_loss == "none":
        return torch.zeros((), dtype=z_pool.dtype)
    probs = router_probs(cfg, z_pool)
    counts = torch.zeros(cfg.pool, dtype=z_pool.dtype)
    for slots in chosen:
        for j in slots:
            counts[j] += 1
    if cfg.aux_loss in ("aux", "global_aux"):
        return switch_aux(probs, counts, cfg.picks)
    # seq_aux: one Switch loss per sequence of S consecutive tokens, averaged
    S = cfg.seq_len
    per_seq = []
    for start in range(0, T, S):
        c = torch.zeros(cfg.pool, dtype=z_pool.dtype)
        for slots in chosen[start : start + S]:
            for j in slots:
                c[j] += 1
        per_seq.append(switch_aux(probs[start : start + S], c, cfg.picks))
    return torch.stack(per_seq).mean()


def z_loss(z_pool):
    return (torch.logsumexp(z_pool, dim=-1) ** 2).mean()


def moe_layer(cfg: MoeConfig, x, p: dict, bias) -> LayerResult:
    """Forward of the whole layer. p: parameters (requires_grad as wanted)."""
    T, E = x.shape[0], cfg.routed_experts
    z = pool_logits(cfg, x, p)
    sel = selection_scores(cfg, z, bias).tolist()

    # --- routing: choose slots per token, then gates of the real experts
    chosen, assignments = [], []
    margins = {"topk": math.inf, "group": math.inf, "capacity": math.inf}
    for t in range(T):
        row = list(sel[t])
        if cfg.n_groups > 1:
            allowed, gm = allowed_by_groups(cfg, row)
            margins["group"] = min(margins["group"], gm)
            row = [s if j in allowed else -math.inf for j, s in enumerate(row)]
        slots, m = pick_slots(cfg, row)
        margins["topk"] = min(margins["topk"], m)
        chosen.append(slots)
        for slot, e, g in token_gates(cfg, z[t], slots):
            assignments.append(Assignment(token=t, slot=slot, expert=e, gate=g))

    # --- capacity
    margins["capacity"] = apply_capacity(cfg, assignments, T)

    # --- routed experts: per expert, its kept tokens
    y = torch.zeros_like(x)
    tokens_per_expert = []
    for e in range(E):
        kept = [a for a in assignments if a.expert == e and a.kept]
        tokens_per_expert.append(len(kept))
        if not kept:
            continue
        idx = torch.tensor([a.token for a in kept])
        gates = torch.stack([a.gate for a in kept])
        gate_w = p["experts.gate_proj"][e] if cfg.activation == "swiglu" else None
        out = ffn(cfg.activation, x[idx], p["experts.up_proj"][e], p["experts.down_proj"][e], gate_w)
        y = y.index_add(0, idx, out * gates[:, None])

    # --- shared experts
    if cfg.shared_experts > 0:
        ys = ffn(
            cfg.activation,
            x,
            p["shared_experts.up_proj"],
            p["shared_experts.down_proj"],
            p.get("shared_experts.gate_proj"),
        )
        if cfg.shared_expert_gate:
            ys = ys * torch.sigmoid(x @ p["shared_expert_gate.weight"].T)
        y = y + ys

    dropped = sum(1 for a in assignments if not a.kept)
    return LayerResult(
        y=y,
        aux=balance_loss(cfg, z, chosen),
        z=z_loss(z),
        chosen=chosen,
        assignments=assignments,
        tokens_per_expert=tokens_per_expert,
        dropped=dropped,
        margins=margins,
    )


def run_probe(cfg: MoeConfig, tensors: dict[str, torch.Tensor], dtype=torch.float64):
    """Forward + autograd backward of the probe objective.

    Returns (outputs dict in `dtype`, LayerResult)."""
    check_inputs(cfg, tensors)
    x = tensors["x"].to(dtype).requires_grad_(True)
    dy = tensors["dy"].to(dtype)
    names = list(parameter_shapes(cfg))
    p = {n: tensors[n].to(dtype).requires_grad_(True) for n in names}
    if cfg.expert_bias:
        bias = tensors["router.expert_bias"].to(dtype)
    else:
        bias = torch.zeros(cfg.routed_experts, dtype=dtype)
    res = moe_layer(cfg, x, p, bias)
    L = (res.y * dy).sum() + cfg.aux_loss_weight * res.aux + cfg.z_loss_weight * res.z
    grads = torch.autograd.grad(L, [x] + [p[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x] + [p[n] for n in names])]
    out = {
        "y": res.y.detach(),
        "aux_loss": res.aux.detach().reshape(1),
        "z_loss": res.z.detach().reshape(1),
        "tokens_per_expert": torch.tensor(res.tokens_per_expert, dtype=dtype),
        "dropped": torch.tensor([res.dropped], dtype=dtype),
        "dx": grads[0],
    }
    for n, g in zip(names, grads[1:]):
        out[f"grad.{n}"] = g
    return out, res


def to_f32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------
# Random inputs, comparison
# --------------------------------------------------------------------------


def random_inputs(cfg: MoeConfig, tokens: int, seed: int, bias_std: float = 0.1):
    """Random f32 inputs for `cfg` from a fixed torch.Generator seed."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(torch.float32)

    out = {}
    for name, shape in input_shapes(cfg, tokens).items():
        fan_in = shape[-1]
        if name in ("x", "dy"):
            out[name] = normal(shape, 1.0)
        elif name == "router.expert_bias":
            out[name] = normal(shape, bias_std)
        else:
            out[name] = normal(shape, 1.0 / math.sqrt(fan_in))
    return out


def compare(ref: dict, got: dict, rtol: float) -> list[str]:
    """Failures of `got` against `ref`: counts exact, the rest max|diff|/max|ref| <= rtol."""
    failures = []
    for name, r in sorted(ref.items()):
        if name not in got:
            failures.append(f"{name}: missing")
            continue
        g = got[name]
        if tuple(g.shape) != tuple(r.shape):
            failures.append(f"{name}: shape {list(g.shape)} != reference {list(r.shape)}")
            continue
        r64, g64 = r.to(torch.float64), g.to(torch.float64)
        if name in COUNT_TENSORS:
            if not torch.equal(r64, g64):
                failures.append(f"{name}: {g64.tolist()} != reference {r64.tolist()}")
            continue
        scale = r64.abs().max().item()
        err = (r64 - g64).abs().max().item()
        rel = err / scale if scale > 0 else err
        status = "ok" if rel <= rtol else "FAIL"
        print(f"  {name:32s} max|ref|={scale:.3e} rel.err={rel:.2e} {status}")
        if rel > rtol:
            failures.append(f"{name}: rel.err {rel:.3e} > {rtol:g}")
    return failures


def relative_errors(ref: dict, got: dict) -> dict[str, float]:
    errs = {}
    for name, r in ref.items():
        if name in COUNT_TENSORS:
            continue
        r64, g64 = r.to(torch.float64), got[name].to(torch.float64)
        scale = r64.abs().max().item()
        errs[name] = (r64 - g64).abs().max().item() / scale if scale > 0 else math.inf
    return errs


def warn_on_small_margins(res: LayerResult):
    for kind, m in res.margins.items():
        if m < MIN_MARGIN:
            print(
                f"warning: {kind} decision margin {m:.2e} < {MIN_MARGIN}: an f32 layer may "
                "choose differently on these inputs",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def cmd_probe(args):
    cfg = load_config(args.config, args.set)
    tensors = load_file(args.tensors)
    out, res = run_probe(cfg, tensors)
    warn_on_small_margins(res)
    save_file(to_f32(out), args.out)
    print(
        f"wrote {args.out}: aux={out['aux_loss'].item():.6g} z={out['z_loss'].item():.6g} "
        f"dropped={res.dropped} tokens_per_expert={res.tokens_per_expert}"
    )


def cmd_inputs(args):
    cfg = load_config(args.config, args.set)
    save_file(random_inputs(cfg, args.tokens, args.seed), args.out)
    print(f"wrote {args.out}")


def cmd_compare(args):
    ref, got = load_file(args.reference), load_file(args.got)
    failures = compare(ref, got, args.rtol)
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        sys.exit(1)
    print(f"all {len(ref)} tensors match (rtol {args.rtol:g}, counts exact)")


def cmd_fixtures(args):
    from moe_fixtures import write_fixtures  # same folder

    write_fixtures(Path(args.out_dir))


def cmd_selftest(args):
    from moe_selftest import selftest  # same folder

    selftest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="forward+backward on given tensors, write probe outputs")
    p.add_argument("--config", required=True)
    p.add_argument("--tensors", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), as `megamoe --set` does")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("inputs", help="write random probe inputs for a config")
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), as `megamoe --set` does")
    p.set_defaults(func=cmd_inputs)
    p = sub.add_parser("compare", help="compare probe outputs against reference outputs")
    p.add_argument("reference")
    p.add_argument("got")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("fixtures", help="regenerate the committed fixtures")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_fixtures)
    p = sub.add_parser("selftest", help="loss identities, plan/capacity examples, finite differences")
    p.set_defaults(func=cmd_selftest)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, TensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Re-enter through the importable module so that the helper modules
    # (moe_fixtures, moe_selftest) and this command share one copy of it.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import moe_reference

    moe_reference.main()
