"""Self-checks of moe_reference.py (run: python3 tools/reference/moe_reference.py selftest).

Expected values come from the spec's formulas and identities or from hand
computations written beside them, and every autograd gradient is checked by
central finite differences on small cases.
"""

from __future__ import annotations

import math

import torch

from moe_reference import (
    MIN_MARGIN,
    ConfigError,
    config_from_dict,
    expert_capacity,
    moe_layer,
    null_slot_plan,
    parameter_shapes,
    random_inputs,
    run_probe,
    switch_aux,
    z_loss,
)


def make_cfg(model=None, **moe):
    base_model = {"d_model": 4, "seq_len": 4}
    base_model.update(model or {})
    base = {"routed_experts": 4, "top_k": 2, "expert_hidden": 3}
    base.update(moe)
    return config_from_dict({"model": base_model, "moe": base})


def expect_config_error(fragment, **moe):
    try:
        make_cfg(**moe)
    except ConfigError as e:
        assert fragment in str(e), f"error {e!r} does not mention {fragment!r}"
        return
    raise AssertionError(f"no ConfigError for {moe}")


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"selftest {name} failed {detail}")
    print(f"ok  {name}")


# ---------------------------------------------------------------------------


def test_null_slot_plan():
    # Seed plan: n_null = max(1, floor(E(1-rho)/rho)), k_max = min(ceil(k/rho), E+n_null).
    check("null plan E=8 k=2 rho=0.5 -> (8, 4)", null_slot_plan(8, 2, 0.5) == (8, 4))
    check("null plan rho=1 -> (0, k)", null_slot_plan(8, 2, 1.0) == (0, 2))
    # floor(8*0.75/0.25) = 24, ceil(2/0.25) = 8
    check("null plan E=8 k=2 rho=0.25 -> (24, 8)", null_slot_plan(8, 2, 0.25) == (24, 8))
    # floor(4*0.1/0.9) = 0 -> max(1, 0) = 1; ceil(1/0.9) = 2
    check("null plan E=4 k=1 rho=0.9 -> (1, 2)", null_slot_plan(4, 1, 0.9) == (1, 2))
    # floor(2*0.8/0.2) = 8; ceil(2/0.2) = 10 -> min(10, 2+8) = 10
    check("null plan E=2 k=2 rho=0.2 -> (8, 10)", null_slot_plan(2, 2, 0.2) == (8, 10))
    # floor(1*0.9/0.1) = 9; ceil(1/0.1) = 10 -> min(10, 1+9) = 10
    check("null plan E=1 k=1 rho=0.1 -> (9, 10)", null_slot_plan(1, 1, 0.1) == (9, 10))
    for bad in (0.0, -0.5, 1.5):
        try:
            null_slot_plan(8, 2, bad)
        except ConfigError as e:
            check(f"null plan rho={bad} is an error", "null_rho" in str(e))
        else:
            raise AssertionError(f"rho={bad} accepted")
    for E, k in ((0, 2), (8, 0)):
        try:
            null_slot_plan(E, k, 0.5)
        except ConfigError:
            check(f"null plan E={E} k={k} is an error", True)
        else:
            raise AssertionError("accepted")


def test_capacity():
    # C = ceil(T*k/E*cf)
    check("capacity T=32 k=2 E=8 cf=1.25 -> 10", expert_capacity(32, 2, 8, 1.25) == 10)
    check("capacity T=32 k=2 E=8 cf=1.0 -> 8", expert_capacity(32, 2, 8, 1.0) == 8)
    check("capacity T=10 k=1 E=4 cf=1.0 -> ceil(2.5) = 3", expert_capacity(10, 1, 4, 1.0) == 3)
    check("capacity T=64 k=2 E=16 cf=0.5 -> 4", expert_capacity(64, 2, 16, 0.5) == 4)
    check("capacity T=6 k=2 E=4 cf=1.5 -> ceil(4.5) = 5", expert_capacity(6, 2, 4, 1.5) == 5)
    check("capacity cf=None -> dropless", expert_capacity(32, 2, 8, None) is None)


def test_loss_identities():
    T, E, k = 16, 8, 2
    # uniform routing: p = 1/E everywhere, every expert gets T*k/E picks -> aux = 1
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    counts = torch.full((E,), T * k / E, dtype=torch.float64)
    aux = switch_aux(probs, counts, k).item()
    check("aux uniform routing = 1 (weighted: c_aux)", abs(aux - 1.0) < 1e-12, aux)
    check("aux uniform routing weighted 0.01 -> 0.01", abs(0.01 * aux - 0.01) < 1e-14)
    # total collapse (k=1): every token on expert 0 with p = 1 -> aux = E
    probs = torch.zeros((T, E), dtype=torch.float64)
    probs[:, 0] = 1.0
    counts = torch.zeros(E, dtype=torch.float64)
    counts[0] = T
    aux = switch_aux(probs, counts, 1).item()
    check("aux total collapse = E", abs(aux - E) < 1e-12, aux)
    # zero logits -> z = (ln E)^2
    z = z_loss(torch.zeros((T, E), dtype=torch.float64)).item()
    check("z-loss zero logits = (ln E)^2", abs(z - math.log(E) ** 2) < 1e-12, z)

    # the same two identities through the whole layer: zero router weights.
    cfg = make_cfg(routed_experts=8, top_k=2, aux_loss_weight=1.0)
    t = random_inputs(cfg, 8, seed=1)
    t["router.weight"].zero_()
    out, res = run_probe(cfg, t)
    check("layer: zero logits -> z_loss = (ln 8)^2", abs(out["z_loss"].item() - math.log(8) ** 2) < 1e-12)
    # zero logits: ties everywhere -> every token picks experts 0 and 1 (lower index wins)
    check("layer: ties pick lower expert index", all(c == [0, 1] for c in res.chosen), res.chosen)
    # f = (1/2, 1/2, 0...), P = 1/8 -> aux = 8 * (1/2 + 1/2) / 8 = 1
    check("layer: aux with uniform P = 1", abs(out["aux_loss"].item() - 1.0) < 1e-12)
    # null slots: pool = E + n_null = 8 + 8 -> z = (ln 16)^2
    cfg = make_cfg(routed_experts=8, top_k=2, null_rho=0.5)
    t = random_inputs(cfg, 8, seed=1)
    t["router.weight"].zero_()
    t["router.null_weight"].zero_()
    out, res = run_probe(cfg, t)
    check("layer: null slots zero logits -> z = (ln 16)^2", abs(out["z_loss"].item() - math.log(16) ** 2) < 1e-12)
    # ties: k_max = 4 slots, all real experts 0..3 (lower index) -> no nulls chosen
    check("layer: null-slot ties pick real experts 0..3", all(c == [0, 1, 2, 3] for c in res.chosen))
    cfg = make_cfg(aux_loss="none")
    out, _ = run_probe(cfg, random_inputs(cfg, 8, seed=1))
    check("aux_loss none -> 0", out["aux_loss"].item() == 0.0)


def one_token_cfg_and_inputs(logits, **moe):
    """A one-token layer whose router logits equal `logits` (x = e_0 basis)."""
    E = len(logits)
    cfg = make_cfg(model={"d_model": 2, "seq_len": 1}, routed_experts=E, **moe)
    t = random_inputs(cfg, 1, seed=0)
    t["x"] = torch.tensor([[1.0, 0.0]])
    w = torch.zeros(E, 2)
    w[:, 0] = torch.tensor(logits)
    t["router.weight"] = w
    return cfg, t


def layer_of(cfg, t):
    to64 = {k: v.to(torch.float64) for k, v in t.items()}
    bias = to64.get("router.expert_bias", torch.zeros(cfg.routed_experts, dtype=torch.float64))
    p = {n: to64[n] for n in parameter_shapes(cfg)}
    return moe_layer(cfg, to64["x"], p, bias)


def gates_of(res):
    return {a.expert: a.gate.item() for a in res.assignments}


def test_routing_rules():
    z = [1.0, 3.0, 2.0, 0.0]
    # softmax after top-k (pre_softmax false): picks 1, 2; gates softmax([3, 2])
    cfg, t = one_token_cfg_and_inputs(z, top_k=2)
    g = gates_of(layer_of(cfg, t))
    e1 = math.exp(3) / (math.exp(3) + math.exp(2))
    check("softmax after top-k: gates = softmax of chosen logits", abs(g[1] - e1) < 1e-12 and abs(g[2] - (1 - e1)) < 1e-12, g)
    # softmax before top-k, no normalize: gates = full softmax values
    cfg, t = one_token_cfg_and_inputs(z, top_k=2, pre_softmax=True, normalize=False)
    g = gates_of(layer_of(cfg, t))
    den = sum(math.exp(v) for v in z)
    check("softmax before top-k: gates = full softmax", abs(g[1] - math.exp(3) / den) < 1e-12, g)
    check("pre_softmax with k>1 normalizes by default", make_cfg(pre_softmax=True).normalize)
    check("softmax after top-k does not normalize by default", not make_cfg().normalize)
    check("sigmoid normalizes by default", make_cfg(score_fn="sigmoid").normalize)
    # sigmoid + route_scale: g = 2.5 * s / (sum s)
    cfg, t = one_token_cfg_and_inputs(z, top_k=2, score_fn="sigmoid", route_scale=2.5)
    g = gates_of(layer_of(cfg, t))
    s1, s2 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-2))
    check("sigmoid normalize + route_scale", abs(g[1] - 2.5 * s1 / (s1 + s2)) < 1e-12, g)
    # expert bias changes selection, not gates: bias +5 on expert 3 -> picks 3 and 1
    cfg, t = one_token_cfg_and_inputs(z, top_k=2, expert_bias=True)
    t["router.expert_bias"] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    g = gates_of(layer_of(cfg, t))
    e3 = math.exp(0) / (math.exp(0) + math.exp(3))
    check("bias selects expert 3, gate ignores bias", set(g) == {1, 3} and abs(g[3] - e3) < 1e-12, g)
    # groups: E=4, G=2, M=1: group0 = {1, 3} -> sum 4, group1 = {2, 0} -> 2; keep group0
    cfg, t = one_token_cfg_and_inputs([1.0, 3.0, 2.0, 0.0], top_k=2, n_groups=2, topk_groups=1)
    check("group routing keeps group 0 -> experts {0, 1}", set(gates_of(layer_of(cfg, t))) == {0, 1})
    # groups of one expert use top-1: E=4, G=4, M=2 with k=2 -> experts 1 and 2
    cfg, t = one_token_cfg_and_inputs(z, top_k=2, n_groups=4, topk_groups=2)
    check("groups of one expert -> experts {1, 2}", set(gates_of(layer_of(cfg, t))) == {1, 2})
    # group sum of top-2: group0 = {5, -9} -> -4, group1 = {1, 1} -> 2: keep group1
    cfg, t = one_token_cfg_and_inputs([5.0, -9.0, 1.0, 1.0], top_k=1, n_groups=2, topk_groups=1)
    check("group score is the top-2 sum, not the max", set(gates_of(layer_of(cfg, t))) == {2})
    # null slots: E=4, k=1, rho=0.5 -> n_null 4, k_max 2; null logit 2.5 -> picks 1 then a null
    cfg, t = one_token_cfg_and_inputs(z, top_k=1, null_rho=0.5, normalize=True)
    t["router.null_weight"] = torch.tensor([[2.5, 0.0]])
    res = layer_of(cfg, t)
    check("null slots: chosen = [expert 1, first null copy]", res.chosen == [[1, 4]], res.chosen)
    check("null slots: real gate renormalised to 1", abs(gates_of(res)[1] - 1.0) < 1e-12)
    t["router.null_weight"] = torch.tensor([[9.0, 0.0]])
    res = layer_of(cfg, t)
    check("null slots: only nulls -> zero routed output", res.assignments == [] and res.y.abs().max().item() == 0.0)
    # config errors
    expect_config_error("n_groups", n_groups=3)
    expect_config_error("null_rho", null_rho=0.5, n_groups=2)
    expect_config_error("top_k", top_k=5)
    expect_config_error("topk_groups", n_groups=4, topk_groups=1, top_k=2)
    expect_config_error("capacity_factor", capacity_factor=0.0)
    expect_config_error("shared_expert_gate", shared_expert_gate=True)
    print("ok  config errors name their field")


def test_capacity_policies():
    # 4 tokens, 1 expert with k=1 -> C = ceil(4*1/1*0.5) = 2. Gates via sigmoid, no normalize.
    cfg = make_cfg(
        model={"d_model": 2, "seq_len": 4},
        routed_experts=1,
        top_k=1,
        score_fn="sigmoid",
        normalize=False,
        capacity_factor=0.5,
        drop_policy="probs",
    )
    t = random_inputs(cfg, 4, seed=0)
    t["x"] = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [0.7, 0.0]])
    t["router.weight"] = torch.tensor([[1.0, 0.0]])
    res = layer_of(cfg, t)
    kept = sorted(a.token for a in res.assignments if a.kept)
    check("probs policy keeps the 2 highest gates (tokens 1, 3)", kept == [1, 3], kept)
    check("probs policy: dropped = 2", res.dropped == 2)
    cfg = make_cfg(
        model={"d_model": 2, "seq_len": 4},
        routed_experts=1,
        top_k=1,
        score_fn="sigmoid",
        normalize=False,
        capacity_factor=0.5,
        drop_policy="position",
    )
    res = layer_of(cfg, t)
    kept = sorted(a.token for a in res.assignments if a.kept)
    check("position policy keeps the first 2 tokens (0, 1)", kept == [0, 1], kept)
    # a dropped assignment is not renormalised away: E=2, k=2, normalize, C = ceil(2*2/2*0.5) = 1
    cfg = make_cfg(
        model={"d_model": 2, "seq_len": 2},
        routed_experts=2,
        top_k=2,
        score_fn="sigmoid",
        capacity_factor=0.5,
    )
    t = random_inputs(cfg, 2, seed=0)
    t["x"] = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    t["router.weight"] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    res = layer_of(cfg, t)
    kept = {(a.token, a.expert): a.gate.item() for a in res.assignments if a.kept}
    # token 0: s = (σ(1), σ(-1)) -> gates (σ(1), σ(-1)) (sum 1); token 1: (σ(2), σ(-2)).
    # expert 0 keeps token 1 (σ(2) > σ(1)), expert 1 keeps token 0 (σ(-1) > σ(-2)).
    check("capacity drop keeps the other gates unchanged", set(kept) == {(1, 0), (0, 1)} and abs(kept[(1, 0)] - 1 / (1 + math.exp(-2))) < 1e-12, kept)


# ---------------------------------------------------------------------------
# finite differences


def objective(cfg, t64):
    bias = t64.get("router.expert_bias", torch.zeros(cfg.routed_experts, dtype=torch.float64))
    res = moe_layer(cfg, t64["x"], {n: t64[n] for n in parameter_shapes(cfg)}, bias)
    L = (res.y * t64["dy"]).sum() + cfg.aux_loss_weight * res.aux + cfg.z_loss_weight * res.z
    return L.item(), res


def finite_difference_check(name, cfg, tokens, need_drop, eps=1e-6, tol=1e-6):
    for seed in range(100):
        t = random_inputs(cfg, tokens, seed)
        out, res = run_probe(cfg, t)
        if min(res.margins.values()) >= MIN_MARGIN and (res.dropped > 0 or not need_drop):
            break
    else:
        raise AssertionError(f"{name}: no seed with safe margins")
    t64 = {k: v.to(torch.float64) for k, v in t.items()}
    worst = 0.0
    for tname in ["x"] + list(parameter_shapes(cfg)):
        grad = out["dx" if tname == "x" else f"grad.{tname}"]
        fd = torch.zeros_like(grad)
        flat = t64[tname].view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            lp, rp = objective(cfg, t64)
            flat[i] = orig - eps
            lm, rm = objective(cfg, t64)
            flat[i] = orig
            assert rp.chosen == res.chosen and rm.chosen == res.chosen, "routing moved under FD"
            fd.view(-1)[i] = (lp - lm) / (2 * eps)
        scale = max(grad.abs().max().item(), 1e-12)
        rel = (fd - grad).abs().max().item() / scale
        worst = max(worst, rel)
        assert rel < tol, f"{name}: {tname} FD rel.err {rel:.2e} (scale {scale:.2e})"
    check(f"finite differences {name} (worst rel.err {worst:.1e}, dropped {res.dropped})", True)


def test_finite_differences():
    finite_difference_check(
        "softmax+capacity(probs)+shared gate+seq_aux",
        make_cfg(
            routed_experts=4, top_k=2, capacity_factor=0.75, shared_experts=1,
            shared_expert_hidden=3, shared_expert_gate=True, aux_loss="seq_aux",
            aux_loss_weight=0.3, z_loss_weight=0.1,
        ),
        tokens=8,
        need_drop=True,
    )
    finite_difference_check(
        "sigmoid+null slots+bias+route_scale+capacity(position)+relu2",
        make_cfg(
            routed_experts=4, top_k=2, score_fn="sigmoid", null_rho=0.5, expert_bias=True,
            route_scale=2.5, capacity_factor=0.75, drop_policy="position", activation="relu2",
            aux_loss_weight=0.3, z_loss_weight=0.1,
        ),
        tokens=8,
        need_drop=True,
    )
    finite_difference_check(
        "softmax pre-top-k+groups+gelu+global_aux",
        make_cfg(
            routed_experts=4, top_k=2, pre_softmax=True, n_groups=2, topk_groups=1,
            activation="gelu", aux_loss="global_aux", aux_loss_weight=0.3, z_loss_weight=0.1,
            shared_experts=1,
        ),
        tokens=8,
        need_drop=False,
    )
    finite_difference_check(
        "softmax after top-k + null slots (no normalize)",
        make_cfg(routed_experts=4, top_k=1, null_rho=0.5, aux_loss_weight=0.3, z_loss_weight=0.1),
        tokens=8,
        need_drop=False,
    )


def selftest():
    torch.set_num_threads(1)
    test_null_slot_plan()
    test_capacity()
    test_loss_identities()
    test_routing_rules()
    test_capacity_policies()
    test_finite_differences()
    print("selftest passed")
