"""Committed MoE fixtures (run: python3 tools/reference/moe_reference.py fixtures --out-dir DIR).

Each fixture is <name>.toml (config), <name>.in.safetensors (probe inputs,
f32) and <name>.out.safetensors (probe outputs of the float64 reference,
stored as f32). Inputs are random from a fixed seed; a seed is rejected (and
the next one tried) unless
  * every discrete decision has margin >= MIN_MARGIN (top-k boundary, group
    boundary, probs-policy capacity boundary), so an f32 layer decides alike;
  * the fixture's own requirement holds (e.g. capacity really drops);
  * the same reference run in float32 makes identical decisions and stays
    within F32_BUDGET of the float64 outputs (relative to max|tensor|);
  * no compared float tensor is ~0 (max|t| >= MIN_SCALE).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from moe_reference import (
    COUNT_TENSORS,
    F32_BUDGET,
    MIN_MARGIN,
    config_from_dict,
    expert_capacity,
    input_shapes,
    random_inputs,
    relative_errors,
    run_probe,
    to_f32,
)

MIN_SCALE = 1e-3
FIRST_SEED = 20250
MAX_TRIES = 300
EMPTY_EXPERT = 5  # the expert that receives no token in dropless_empty_expert


@dataclass
class Fixture:
    name: str
    covers: str
    model: dict
    moe: dict
    tokens: int = 32
    # extra condition on a candidate (cfg, inputs, result) -> bool; resample when False
    requirement: Callable | None = None
    requirement_text: str = ""
    # edit the random inputs before use (e.g. a planted expert bias)
    tweak: Callable | None = None


def kept_pairs(res):
    return sorted((a.token, a.expert) for a in res.assignments if a.kept)


def rerun(cfg, inputs, **changes):
    """Run the same inputs under a changed config (used to show a feature matters)."""
    new = dataclasses.replace(cfg, **changes)
    used = input_shapes(new, inputs["x"].shape[0])
    _, res = run_probe(new, {k: v for k, v in inputs.items() if k in used})
    return res


def drops_and_policy_matters(cfg, inputs, res):
    other = "position" if cfg.drop_policy == "probs" else "probs"
    return res.dropped > 0 and kept_pairs(res) != kept_pairs(rerun(cfg, inputs, drop_policy=other))


def bias_and_groups_matter(cfg, inputs, res):
    no_bias = rerun(cfg, inputs, expert_bias=False)
    no_groups = rerun(cfg, inputs, n_groups=1, topk_groups=1)
    return res.chosen != no_bias.chosen and res.chosen != no_groups.chosen


def null_variety(cfg, inputs, res):
    real = [sum(1 for j in c if j < cfg.routed_experts) for c in res.chosen]
    return 0 in real and len(set(real)) >= 3 and any(j >= cfg.routed_experts for c in res.chosen for j in c)


def nulls_and_drops(cfg, inputs, res):
    return null_variety(cfg, inputs, res) and res.dropped > 0


def plant_empty_expert(inputs):
    inputs["router.expert_bias"][EMPTY_EXPERT] = -30.0


def expert_is_empty(cfg, inputs, res):
    return res.tokens_per_expert[EMPTY_EXPERT] == 0 and all(
        c > 0 for e, c in enumerate(res.tokens_per_expert) if e != EMPTY_EXPERT
    )


M16 = {"d_model": 16, "seq_len": 16}
BASE = {"routed_experts": 8, "top_k": 2, "expert_hidden": 12}

FIXTURES = [
    Fixture(
        "softmax_k2_capacity_drop",
        "softmax after top-k (Megatron default), k=2, capacity_factor 1.0 (C=8) that drops, "
        "drop_policy probs, swiglu, Switch aux loss",
        M16,
        {**BASE, "activation": "swiglu", "capacity_factor": 1.0, "drop_policy": "probs"},
        requirement=drops_and_policy_matters,
        requirement_text="dropped > 0 and the kept set differs from the position policy",
    ),
    Fixture(
        "softmax_position_drop",
        "softmax after top-k, capacity_factor 0.75 (C=6), drop_policy position, "
        "pad_to_capacity (values unchanged), z_loss_weight 0.01",
        M16,
        {**BASE, "capacity_factor": 0.75, "drop_policy": "position", "pad_to_capacity": True,
         "z_loss_weight": 0.01},
        requirement=drops_and_policy_matters,
        requirement_text="dropped > 0 and the kept set differs from the probs policy",
    ),
    Fixture(
        "softmax_pre_topk",
        "softmax before top-k (pre_softmax), k=3, normalize, dropless, aux_loss_weight 0.1",
        M16,
        {**BASE, "top_k": 3, "pre_softmax": True, "normalize": True, "aux_loss_weight": 0.1},
    ),
    Fixture(
        "sigmoid_groups_bias_scale",
        "sigmoid scores (DeepSeek-V3), E=16, k=4, n_groups 4, topk_groups 2, non-zero expert "
        "bias (selection only), route_scale 2.5, normalize (default for sigmoid), seq_aux over "
        "4 sequences of 8, dropless",
        {"d_model": 16, "seq_len": 8},
        {"routed_experts": 16, "top_k": 4, "expert_hidden": 12, "score_fn": "sigmoid",
         "n_groups": 4, "topk_groups": 2, "expert_bias": True, "route_scale": 2.5,
         "aux_loss": "seq_aux", "aux_loss_weight": 0.1},
        requirement=bias_and_groups_matter,
        requirement_text="routing differs from the same inputs without bias and without groups",
    ),
    Fixture(
        "null_slots",
        "null-slot routing, null_rho 0.5 -> 8 null copies, k_max 4, softmax after top-k, "
        "normalize among the real picks, dropless; aux and z over the 16-slot pool with large "
        "weights (0.5, 0.1) so grad.router.null_weight (aux and z only: the renormalised gates "
        "do not depend on the null logit) stands well above f32 cancellation noise",
        M16,
        {**BASE, "null_rho": 0.5, "normalize": True, "aux_loss_weight": 0.5, "z_loss_weight": 0.1},
        requirement=null_variety,
        requirement_text="some token picks only nulls and tokens use >= 3 different real counts",
    ),
    Fixture(
        "null_slots_pre_softmax_unnormalized",
        "null slots (rho 0.5) with softmax before top-k over the whole pool and normalize false: "
        "gates of the real picks are full-pool softmax values, so the null logit enters them",
        M16,
        {**BASE, "null_rho": 0.5, "pre_softmax": True, "normalize": False},
        requirement=null_variety,
        requirement_text="some token picks only nulls and tokens use >= 3 different real counts",
    ),
    Fixture(
        "null_slots_sigmoid_capacity",
        "null slots (rho 0.5) with sigmoid scores, capacity_factor 0.75 (C=6, from top_k) "
        "with probs policy",
        M16,
        {**BASE, "null_rho": 0.5, "score_fn": "sigmoid", "capacity_factor": 0.75},
        requirement=nulls_and_drops,
        requirement_text="as null_slots, and dropped > 0",
    ),
    Fixture(
        "shared_expert_gate",
        "2 shared experts of hidden 8 (one FFN of hidden 16) with the sigmoid shared gate, swiglu, "
        "aux_loss_weight 0.1, z_loss_weight 0.01, dropless",
        M16,
        {**BASE, "shared_experts": 2, "shared_expert_hidden": 8, "shared_expert_gate": True,
         "aux_loss_weight": 0.1, "z_loss_weight": 0.01},
    ),
    Fixture(
        "relu2",
        "relu2 experts (up_proj = fc), one ungated shared expert (relu2), capacity_factor 1.25",
        M16,
        {**BASE, "activation": "relu2", "shared_experts": 1, "capacity_factor": 1.25},
    ),
    Fixture(
        "gelu",
        "gelu (exact erf) experts, global_aux (= aux in one call), dropless",
        M16,
        {**BASE, "activation": "gelu", "aux_loss": "global_aux"},
    ),
    Fixture(
        "dropless_empty_expert",
        f"dropless with expert {EMPTY_EXPERT} receiving zero tokens (expert bias -30 on it, small "
        "random bias elsewhere): its expert grads are exactly 0",
        M16,
        {**BASE, "expert_bias": True},
        requirement=expert_is_empty,
        requirement_text=f"tokens_per_expert[{EMPTY_EXPERT}] == 0, every other expert non-empty",
        tweak=plant_empty_expert,
    ),
]


def toml_text(fx: Fixture) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    lines = [
        f"# MoE fixture {fx.name}: {fx.covers}.",
        "# Generated by tools/reference/moe_reference.py fixtures; see README.md here.",
        "[model]",
    ]
    # A complete [model] section so the file is a valid megamoe run config;
    # the layer itself reads only d_model and seq_len.
    model = {"vocab_size": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 32}
    model.update(fx.model)
    lines += [f"{k} = {value(v)}" for k, v in model.items()]
    lines += ["", "[moe]"]
    lines += [f"{k} = {value(v)}" for k, v in fx.moe.items()]
    return "\n".join(lines) + "\n"


def candidate(fx: Fixture, cfg, seed: int):
    """Returns (inputs, outputs, report) or a string saying why the seed is rejected."""
    inputs = random_inputs(cfg, fx.tokens, seed)
    if fx.tweak:
        fx.tweak(inputs)
    out, res = run_probe(cfg, inputs)
    margin = min(res.margins.values())
    if margin < MIN_MARGIN:
        return f"margin {margin:.1e}"
    if fx.requirement and not fx.requirement(cfg, inputs, res):
        return "requirement"
    out32, res32 = run_probe(cfg, inputs, dtype=torch.float32)
    if res32.chosen != res.chosen or kept_pairs(res32) != kept_pairs(res):
        return "f32 decides differently"
    errs = relative_errors(out, out32)
    worst = max(errs.values())
    if worst > F32_BUDGET:
        return f"f32 error {worst:.1e}"
    for name, t in out.items():
        if name not in COUNT_TENSORS and t.abs().max().item() < MIN_SCALE:
            return f"{name} ~0"
    report = {
        "seed": seed,
        "margins": res.margins,
        "f32_err": worst,
        "f32_worst": max(errs, key=errs.get),
        "dropped": res.dropped,
        "tokens_per_expert": res.tokens_per_expert,
        "real_per_token": sorted({sum(1 for j in c if j < cfg.routed_experts) for c in res.chosen}),
    }
    return inputs, out, report


def write_fixtures(out_dir: Path):
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, fx in enumerate(FIXTURES):
        cfg = config_from_dict({"model": fx.model, "moe": fx.moe})
        first = FIRST_SEED + 1000 * i
        rejected = {}
        for seed in range(first, first + MAX_TRIES):
            got = candidate(fx, cfg, seed)
            if not isinstance(got, str):
                break
            rejected[got.split()[0]] = rejected.get(got.split()[0], 0) + 1
        else:
            raise RuntimeError(f"{fx.name}: no acceptable seed in {MAX_TRIES} tries: {rejected}")
        inputs, out, report = got
        if fx.name == "dropless_empty_expert":
            assert report["tokens_per_expert"][EMPTY_EXPERT] == 0, "planted empty expert got tokens"
            assert cfg.capacity_factor is None and report["dropped"] == 0
        (out_dir / f"{fx.name}.toml").write_text(toml_text(fx))
        save_file(inputs, str(out_dir / f"{fx.name}.in.safetensors"))
        save_file(to_f32(out), str(out_dir / f"{fx.name}.out.safetensors"))
        print(
            f"{fx.name}: seed {report['seed']} (rejected {sum(rejected.values())}: {rejected}) "
            f"f32 err {report['f32_err']:.1e} ({report['f32_worst']}) dropped {report['dropped']} "
            f"tokens/expert {report['tokens_per_expert']}"
        )
        rows.append((fx, cfg, report, input_shapes(cfg, fx.tokens), {k: tuple(v.shape) for k, v in out.items()}))
    (out_dir / "README.md").write_text(readme(rows))
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"total fixture size {total / 1024:.1f} KiB")


def shape_list(shapes):
    return ", ".join(f"`{n}` {list(s)}" for n, s in shapes.items())


def readme(rows) -> str:
    r = [
        "# MoE layer fixtures",
        "",
        "Generated by `python3 tools/reference/moe_reference.py fixtures --out-dir "
        "crates/megamoe-moe/tests/fixtures` — the independent float64 PyTorch reference",
        f"(torch {torch.__version__}, CPU). Do not edit by hand; regenerate with that command.",
        "",
        "Per fixture `<name>`: `<name>.toml` (megamoe config: [model] d_model, seq_len; [moe]),",
        "`<name>.in.safetensors` (probe inputs, f32, names of the spec's probe table) and",
        "`<name>.out.safetensors` (reference outputs computed in float64, stored f32).",
        "Probe objective: L = Σ(y ⊙ dy) + aux_loss_weight·aux + z_loss_weight·z.",
        "",
        "How to compare: run the layer on `<name>.in.safetensors` with `<name>.toml` and check",
        "every tensor of `<name>.out.safetensors`: `tokens_per_expert` and `dropped` exactly",
        "(integer counts), all others with max|got − ref| ≤ 1e-5 · max|ref| per tensor. From a shell:",
        "",
        "```",
        "megamoe probe moe --config F.toml --tensors F.in.safetensors --out /tmp/got.safetensors",
        "python3 tools/reference/moe_reference.py compare F.out.safetensors /tmp/got.safetensors",
        "```",
        "",
        "Robustness (checked for every fixture when generated; a seed failing any check is",
        "skipped and the next seed tried, starting at "
        f"{FIRST_SEED} + 1000·index):",
        f"- every top-k boundary (k-th vs (k+1)-th selection score; null copies among themselves",
        f"  excluded, they are identical), every group boundary (topk_groups-th vs next group score)",
        f"  and every probs-policy capacity boundary (gate at rank C vs C+1 in an expert) has a",
        f"  margin ≥ {MIN_MARGIN:g};",
        f"- the same reference run in float32 makes identical routing/drop decisions and is within",
        f"  {F32_BUDGET:g} of the float64 outputs (relative to max|tensor|) — a fifth of the test tolerance;",
        f"- no compared float tensor has max|t| < {MIN_SCALE:g}.",
        "",
        "Random inputs: x, dy ~ N(0, 1); router and expert weights ~ N(0, 1/fan_in); expert bias",
        "~ N(0, 0.1²). Null copies are at pool indices E..E+n_null−1.",
        "",
        "| fixture | seed | T | S | E | k | covers |",
        "|---|---|---|---|---|---|---|",
    ]
    for fx, cfg, rep, _, _ in rows:
        r.append(
            f"| `{fx.name}` | {rep['seed']} | {fx.tokens} | {cfg.seq_len} | {cfg.routed_experts} | "
            f"{cfg.top_k} | {fx.covers} |"
        )
    r.append("")
    for fx, cfg, rep, ins, outs in rows:
        C = expert_capacity(fx.tokens, cfg.top_k, cfg.routed_experts, cfg.capacity_factor)
        m = rep["margins"]
        r += [
            f"## {fx.name}",
            "",
            f"{fx.covers}.",
            "",
            f"- seed {rep['seed']}; d={cfg.d_model}, h={cfg.expert_hidden}, "
            f"capacity C={'dropless' if C is None else C}, n_null={cfg.n_null}, k_max={cfg.k_max}, "
            f"normalize={str(cfg.normalize).lower()}",
            f"- tokens_per_expert {rep['tokens_per_expert']}, dropped {rep['dropped']}, "
            f"real experts per token ∈ {rep['real_per_token']}",
            "- min margins: "
            + ", ".join(f"{k} {'—' if math.isinf(v) else f'{v:.2e}'}" for k, v in m.items()),
            f"- float32 run vs float64: worst rel. error {rep['f32_err']:.1e} ({rep['f32_worst']})",
        ]
        if fx.requirement_text:
            r.append(f"- generation requires: {fx.requirement_text}")
        r += [f"- inputs: {shape_list(ins)}", f"- outputs: {shape_list(outs)}", ""]
    return "\n".join(r)
