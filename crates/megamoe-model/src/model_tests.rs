//! Whole-model tests: finite differences of the total loss with every feature on,
//! recompute and I/W orderings giving identical gradients, names, and a few SGD steps.

use megamoe_plan::Plan;
use megamoe_tensor::{Device, Tensor};

use super::*;
use crate::block::{BlockCx, BlockGradCx};
use crate::grad_check::fd_tensor;

/// Whole-model finite differences, per tensor:
/// `‖fd − analytic‖₂ ≤ FD_REL_TOL·‖analytic‖₂ + FD_ABS_TOL·√n` over the `n` compared elements. The floor is the f32 rounding of the
/// loss over the step (≈1e-4 per element here: tensors with tiny gradients are
/// noise-limited). Measured on these tests: every tensor within 0.61 of the bound;
/// with the MoE aux-loss gradient scaled by 0.8 the router, null-router, embedding and
/// post-attention-norm gradients exceed it by up to 3.8×.
const FD_REL_TOL: f64 = 5e-3;
/// See [`FD_REL_TOL`].
const FD_ABS_TOL: f64 = 2e-4;

/// A tiny config; `extra` is appended TOML (feature sections).
pub(crate) fn tiny_plan(extra: &str) -> Plan {
    let text = format!(
        "[model]\nvocab_size = 13\nd_model = 8\nn_layers = 3\nn_heads = 2\nn_kv_heads = 1\n\
         ffn_hidden = 32\nseq_len = 6\ntie_embeddings = false\n\
         [train]\nglobal_batch = 2\nseed = 7\n{extra}"
    );
    Plan::from_toml_str(&text, &[], Some(1)).unwrap()
}

pub(crate) const ALL_FEATURES: &str = "[gateskip]\nbudget_start = 0.34\nbudget_end = 0.34\n\
    budget_warmup_steps = 0\ninit_bias = 0.0\ninit_std = 0.5\nsparsity_weight = 0.5\n\
    [flexidepth]\nadaptive_layers = 1\nreduction = 2\nskip_loss_weight = 0.5\n\
    [mtp]\ndepth = 2\nloss_weight = 0.5\n";

pub(crate) fn batch(b: usize, t: usize, v: i32, seed: i32) -> (Tensor, Tensor) {
    let ids: Vec<i32> = (0..(b * t) as i32)
        .map(|i| (i * 7 + seed * 3 + i * i) % v)
        .collect();
    let mut tg: Vec<i32> = ids.iter().map(|x| (x * 5 + 1) % v).collect();
    tg[b * t - 1] = megamoe_tensor::IGNORE_INDEX; // one ignored target
    (
        Tensor::from_vec_i32(ids, [b, t], Device::Cpu).unwrap(),
        Tensor::from_vec_i32(tg, [b, t], Device::Cpu).unwrap(),
    )
}

/// Scales every parameter whose name contains `key` by `s` (to move scores off thresholds
/// and make gradients large enough for f32 finite differences).
fn scale_params(p: &mut ModelParams, key: &str, s: f32) {
    p.visit_mut(&mut |n, t, _| {
        if n.contains(key) {
            *t = t.scale(s).unwrap();
        }
    });
}

fn grads_of(model: &Model, p: &ModelParams, ids: &Tensor, tg: &Tensor, step: usize) -> ModelParams {
    let out = model.forward(p, ids, tg, step).unwrap();
    let mut g = p.zeros_like().unwrap();
    model.backward(p, out.saved, &mut g, 1.0).unwrap();
    g
}

fn named(p: &ModelParams) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    p.visit(&mut |n, t, _| v.push((n.to_string(), t.clone())));
    v
}

const GATE_SKIP: &str = "[gateskip]\nbudget_start = 0.34\nbudget_end = 0.34\n\
    budget_warmup_steps = 0\ninit_bias = 0.0\ninit_std = 0.5\nsparsity_weight = 0.5\n";
const FLEXI: &str =
    "[flexidepth]\nadaptive_layers = 1\nreduction = 2\nskip_loss_weight = 0.5\nthreshold = 0.045\n";
const MTP: &str = "[mtp]\ndepth = 2\nloss_weight = 0.5\n";

#[test]
fn dense_model_matches_finite_differences() {
    fd_case("", false);
}

#[test]
fn gate_skip_model_matches_finite_differences() {
    fd_case(GATE_SKIP, false);
}

#[test]
fn flexi_depth_model_matches_finite_differences() {
    fd_case(FLEXI, false);
}

#[test]
fn mtp_model_matches_finite_differences() {
    fd_case(MTP, false);
}

#[test]
fn sequential_mtp_with_embedding_first_matches_finite_differences() {
    // DeepSeek-V3 layout: one module per depth, proj([RMSNorm(e); RMSNorm(h)]).
    fd_case(
        "[mtp]\ndepth = 2\nloss_weight = 0.5\nmode = \"sequential\"\n\
         concat_order = \"embedding_first\"\n",
        false,
    );
}

#[test]
fn whole_model_with_every_feature_matches_finite_differences() {
    fd_case(ALL_FEATURES, true);
}

/// MoE (layers 1, 2) with a gated shared expert and null slots (ρ = 0.5), dropless.
pub(crate) const MOE: &str =
    "[moe]\nrouted_experts = 4\ntop_k = 2\nexpert_hidden = 8\npre_softmax = true\n\
    shared_experts = 1\nshared_expert_hidden = 8\nshared_expert_gate = true\nnull_rho = 0.5\n\
    aux_loss = \"aux\"\naux_loss_weight = 0.5\nz_loss_weight = 0.1\nfirst_dense_layers = 1\n";

#[test]
fn whole_model_with_moe_and_every_feature_matches_finite_differences() {
    fd_case(&format!("{MOE}{ALL_FEATURES}"), true);
}

#[test]
fn all_features_config_trains_without_nan_and_reports_every_stat() {
    let plan = Plan::from_toml_str(
        include_str!("../../../configs/all_features.toml"),
        &["train.global_batch=2".into()],
        Some(1),
    )
    .unwrap();
    let model = Model::new(ModelConfig::from_plan(&plan).unwrap()).unwrap();
    let mut p = model.init_params().unwrap();
    let (ids, tg) = batch(2, 64, 256, 5);
    let mut first = None;
    for step in 0..3 {
        let out = model.forward(&p, &ids, &tg, step * 50).unwrap();
        let v = out.losses.to_host().unwrap();
        assert!(v.total.is_finite() && v.aux > 0.0 && v.z > 0.0 && v.gate_skip > 0.0);
        assert!(v.flexi_depth > 0.0 && v.mtp_losses.len() == 3);
        let st = out.stats.to_host(4).unwrap();
        assert_eq!(st.moe.len(), 3, "MoE layers 1..3");
        assert!(
            st.moe.iter().all(|(_, r)| r.null_picks > 0),
            "null slots are used"
        );
        assert_eq!(st.gate_skip_kept.len(), 4);
        assert!(st.layers_used_mean.is_some());
        first.get_or_insert(v.total);
        let mut g = p.zeros_like().unwrap();
        model.backward(&p, out.saved, &mut g, 1.0).unwrap();
        let gs = named(&g);
        let mut i = 0;
        p.visit_mut(&mut |_, t, _| {
            t.axpy(-0.05, &gs[i].1).unwrap();
            i += 1;
        });
        let mut nb = 0;
        p.visit_buffers(&mut |n, b| {
            assert!(n.ends_with("mlp.router.expert_bias"));
            assert_eq!(b.dims(), [8]);
            nb += 1;
        });
        assert_eq!(nb, 3);
        let mut names = Vec::new();
        p.visit_buffers_mut(&mut |n, _| names.push(n.to_string()));
        assert_eq!(names[0], "model.layers.1.mlp.router.expert_bias");
        assert_eq!(names.len(), 3);
    }
}

fn fd_case(extra: &str, all: bool) {
    let plan = tiny_plan(extra);
    let model = Model::new(ModelConfig::from_plan(&plan).unwrap()).unwrap();
    let mut p = model.init_params().unwrap();
    // Larger weights: gradients well above f32 FD noise; router scores away from τ.
    scale_params(&mut p, "proj", 10.0);
    scale_params(&mut p, "embed", 20.0);
    scale_params(&mut p, "lm_head", 20.0);
    scale_params(&mut p, "depth_router", 30.0);
    // The gate input is detached, so the analytic gradient deliberately omits ∂g/∂h and
    // cannot match FD of the loss while g depends on h. With W_g = 0 the gates do not
    // depend on h (detach is moot) yet still vary per channel through b_g, and every
    // token has the same importance, so skip masks (ties → lowest positions) do not move
    // under FD. W_g itself is FD-checked with a budget in gate_skip.rs.
    let mut k = 0;
    p.visit_mut(&mut |n, t, _| {
        if n.contains("skip_gate") && n.ends_with(".weight") {
            *t = t.scale(0.0).unwrap();
        } else if n.contains("skip_gate") {
            k += 1;
            *t = crate::grad_check::randn(40 + k, t.dims(), 1.0);
        }
    });
    let (ids, tg) = batch(2, 6, 13, 1);
    let out = model.forward(&p, &ids, &tg, 5).unwrap();
    let st = out.stats.to_host(3).unwrap();
    if let Some(used) = &st.layers_used_hist {
        assert!(
            used[2] > 0 && used[3] > 0,
            "both FlexiDepth paths taken: {used:?}"
        );
    }
    // Every feature is live: MTP losses, GateSkip skipping, FlexiDepth mixing both paths.
    if all {
        assert_eq!(out.losses.mtp_losses.len(), 2);
        let st = out.stats.to_host(3).unwrap();
        assert_eq!(st.gate_skip_kept[1], (4.0 / 6.0, 4.0 / 6.0)); // ⌊0.34·6⌋ = 2 skipped
        assert_eq!(st.gate_skip_kept[0], (1.0, 1.0)); // layer 0 never skipped
        let used = st.layers_used_hist.unwrap();
        assert!(
            used[2] > 0 && used[3] > 0,
            "both FlexiDepth paths taken: {used:?}"
        );
    }
    let g = grads_of(&model, &p, &ids, &tg, 5);
    let total = |q: &ModelParams| -> f64 {
        model
            .forward(q, &ids, &tg, 5)
            .unwrap()
            .losses
            .total
            .to_scalar_f32()
            .unwrap() as f64
    };
    let grads = named(&g);
    let mut checked = 0;
    let mut kinks = 0;
    let mut failures = Vec::new();
    for (name, base) in named(&p) {
        // One of each kind of weight (every layer type, gate, router, adapter, MTP, head).
        let want = [
            "embed_tokens",
            "layers.0.self_attn.q_proj",
            "layers.1.self_attn.k_proj",
            "layers.2.self_attn.v_proj",
            "layers.1.mlp.down_proj",
            "layers.1.post_attention_layernorm",
            "layers.2.skip_gate.mlp.bias",
            "layers.1.skip_gate.attn.bias",
            "depth_router.enc",
            "depth_router.head",
            "adapter.up_proj",
            "model.norm",
            "lm_head",
            "mtp.layers.0.input_proj",
            "mtp.layers.0.mlp.gate_proj",
            "mtp.layers.0.self_attn.o_proj",
            "mtp.layers.1.input_proj",
            "mtp.layers.1.mlp.up_proj",
            "mlp.router.weight",
            "mlp.router.null_weight",
            "layers.2.mlp.experts.gate_up_proj",
            "layers.1.mlp.experts.down_proj",
            "mlp.shared_experts.up_proj",
            "shared_expert_gate",
        ];
        if !want.iter().any(|w| name.contains(w)) && !name.contains("embed") {
            continue;
        }
        let grad = &grads.iter().find(|(n, _)| *n == name).unwrap().1;
        let r = fd_tensor(&name, &base, grad, 2e-3, |t| {
            let mut q = p.clone();
            q.visit_mut(&mut |n, v, _| {
                if n == name {
                    *v = t.clone()
                }
            });
            total(&q)
        });
        kinks += r.kinks;
        checked += 1;
        if r.err > FD_REL_TOL * r.norm + FD_ABS_TOL * (r.checked as f64).sqrt() {
            failures.push(format!(
                "{name}: ‖fd − analytic‖ {:.3e}, ‖analytic‖ {:.3e} (relative {:.2e})",
                r.err,
                r.norm,
                r.rel()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "gradients off finite differences:\n{}",
        failures.join("\n")
    );
    if all {
        assert!(checked >= 16, "{checked}");
    }
    if extra.contains("[moe]") {
        // + router, null router, two expert banks, shared expert, shared gate (×2 layers
        // for the names without a layer index).
        assert!(checked >= 25, "{checked}");
    }
    // A mask boundary within ±1e-3 of a weight is rare; most elements must be checked.
    assert!(kinks <= 8, "{kinks} elements on mask boundaries");
}

#[test]
fn recompute_full_gives_bit_identical_grads() {
    let mut cfg = ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap();
    let (ids, tg) = batch(2, 6, 13, 2);
    let keep = Model::new(cfg.clone()).unwrap();
    cfg.recompute = megamoe_plan::Recompute::Full;
    let rec = Model::new(cfg).unwrap();
    let p = keep.init_params().unwrap();
    let (a, b) = (
        grads_of(&keep, &p, &ids, &tg, 3),
        grads_of(&rec, &p, &ids, &tg, 3),
    );
    for ((n, x), (_, y)) in named(&a).into_iter().zip(named(&b)) {
        assert_eq!(x.to_host_f32().unwrap(), y.to_host_f32().unwrap(), "{n}");
    }
}

#[test]
fn all_inputs_then_all_weights_equals_interleaved_backward() {
    // Zero-bubble order: I of every block first, W later in another order, must give the
    // same bits as I then W per block (W only reads what I handed it).
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let x = crate::grad_check::randn(3, &[12, 8], 1.0);
    let d_y = crate::grad_check::randn(4, &[12, 8], 1.0);
    let cx = BlockCx {
        b: 2,
        t: 6,
        skip_budget: 0.34,
        never_skip: None,
    };
    let gcx = BlockGradCx {
        gate_penalty: 0.1,
        ..Default::default()
    };
    let run = |split: bool| -> (Tensor, Vec<(String, Tensor)>) {
        let (y1, _, s1) = model.blocks[1].forward(&p.layers[1], &x, &cx).unwrap();
        let (_, _, s2) = model.blocks[2].forward(&p.layers[2], &y1, &cx).unwrap();
        let mut g1 = p.layers[1].clone();
        let mut g2 = p.layers[2].clone();
        crate::init::zeros_like_params(&mut |f| g1.visit_mut("a", f)).unwrap();
        crate::init::zeros_like_params(&mut |f| g2.visit_mut("b", f)).unwrap();
        let d_x = if split {
            let (d1, w2) = model.blocks[2]
                .backward_input(&p.layers[2], &d_y, s2, &gcx)
                .unwrap();
            let (d0, w1) = model.blocks[1]
                .backward_input(&p.layers[1], &d1, s1, &gcx)
                .unwrap();
            model.blocks[1].backward_weight(w1, &mut g1).unwrap();
            model.blocks[2].backward_weight(w2, &mut g2).unwrap();
            d0
        } else {
            let d1 = model.blocks[2]
                .backward(&p.layers[2], &d_y, s2, &gcx, &mut g2)
                .unwrap();
            model.blocks[1]
                .backward(&p.layers[1], &d1, s1, &gcx, &mut g1)
                .unwrap()
        };
        let mut v = Vec::new();
        g1.visit("a", &mut |n, t, _| v.push((n.to_string(), t.clone())));
        g2.visit("b", &mut |n, t, _| v.push((n.to_string(), t.clone())));
        (d_x, v)
    };
    let (da, ga) = run(false);
    let (db, gb) = run(true);
    assert_eq!(da.to_host_f32().unwrap(), db.to_host_f32().unwrap());
    for ((n, x), (_, y)) in ga.into_iter().zip(gb) {
        assert_eq!(x.to_host_f32().unwrap(), y.to_host_f32().unwrap(), "{n}");
    }
}

#[test]
fn params_have_hf_names_roles_and_matching_visit_order() {
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
    let mut p = model.init_params().unwrap();
    let names: Vec<String> = named(&p).into_iter().map(|(n, _)| n).collect();
    for want in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.2.depth_router.enc.weight",
        "model.layers.1.skip_gate.attn.weight",
        "model.norm.weight",
        "lm_head.weight",
        "mtp.layers.0.input_proj.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    assert!(!names.iter().any(|n| n.contains("layers.1.depth_router")));
    let mut mut_names = Vec::new();
    p.visit_mut(&mut |n, _, _| mut_names.push(n.to_string()));
    assert_eq!(names, mut_names);
    let mut roles = std::collections::HashMap::new();
    p.visit(&mut |n, _, r| {
        roles.insert(n.to_string(), r);
    });
    assert_eq!(roles["model.embed_tokens.weight"], ParamRole::Embedding);
    assert_eq!(roles["lm_head.weight"], ParamRole::Head);
    assert_eq!(roles["model.norm.weight"], ParamRole::Norm);
    assert_eq!(
        roles["model.layers.0.self_attn.o_proj.weight"],
        ParamRole::Matrix
    );
    // Layout-invariant init: same seed and name → same values, independent of model shape.
    let other = Model::new(ModelConfig::from_plan(&tiny_plan("")).unwrap()).unwrap();
    let q = other.init_params().unwrap();
    assert_eq!(
        p.embed_tokens.to_host_f32().unwrap(),
        q.embed_tokens.to_host_f32().unwrap()
    );
}

#[test]
fn dense_model_loss_falls_under_sgd() {
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
    let mut p = model.init_params().unwrap();
    let (ids, tg) = batch(2, 6, 13, 3);
    let first = model
        .forward(&p, &ids, &tg, 0)
        .unwrap()
        .losses
        .to_host()
        .unwrap()
        .total;
    for step in 0..30 {
        let g = grads_of(&model, &p, &ids, &tg, step);
        let gs = named(&g);
        let mut i = 0;
        p.visit_mut(&mut |_, t, _| {
            t.axpy(-0.5, &gs[i].1).unwrap();
            i += 1;
        });
    }
    let last = model
        .forward(&p, &ids, &tg, 30)
        .unwrap()
        .losses
        .to_host()
        .unwrap()
        .total;
    assert!(last < 0.5 * first, "{first} → {last}");
}

#[test]
fn generate_is_deterministic_and_extends_the_prompt() {
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let s = Sampling {
        temperature: 0.8,
        seed: 3,
    };
    let a = model.generate(&p, &[1, 2, 3], 8, s).unwrap();
    assert_eq!(a.len(), 11);
    assert_eq!(&a[..3], &[1, 2, 3]);
    assert_eq!(a, model.generate(&p, &[1, 2, 3], 8, s).unwrap());
    assert!(a.iter().all(|&t| (0..13).contains(&t)));
    assert!(model.generate(&p, &[], 2, s).is_err());
}

#[test]
fn bad_inputs_are_named_errors() {
    let model = Model::new(ModelConfig::from_plan(&tiny_plan("")).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let (ids, _) = batch(2, 6, 13, 1);
    let wrong = Tensor::from_vec_i32(vec![0; 6], [1, 6], Device::Cpu).unwrap();
    let e = model.forward(&p, &ids, &wrong, 0).unwrap_err().to_string();
    assert!(e.contains("targets"), "{e}");
    let oov = Tensor::from_vec_i32(vec![13; 12], [2, 6], Device::Cpu).unwrap();
    assert!(model.forward(&p, &oov, &ids, 0).is_err());
}

#[test]
fn lm_head_cross_entropy_with_ignore_index_matches_finite_differences() {
    // L = CE(h Wᵀ, targets) with one ignored row; grads: dW = dlᵀ h, dh = dl W.
    let h = crate::grad_check::randn(1, &[5, 4], 1.0);
    let w = crate::grad_check::randn(2, &[7, 4], 1.0);
    let tg = Tensor::from_vec_i32(vec![3, -100, 0, 6, 3], [5], Device::Cpu).unwrap();
    let loss = |h: &Tensor, w: &Tensor| {
        let (l, _) = h
            .matmul(w, false, true)
            .unwrap()
            .cross_entropy(&tg, -100)
            .unwrap();
        l.to_scalar_f32().unwrap() as f64
    };
    let (_, dl) = h
        .matmul(&w, false, true)
        .unwrap()
        .cross_entropy(&tg, -100)
        .unwrap();
    let d_w = dl.matmul(&h, true, false).unwrap();
    let d_h = dl.matmul(&w, false, false).unwrap();
    crate::grad_check::check("d_w", &w, &d_w, |t| loss(&h, t));
    crate::grad_check::check("d_h", &h, &d_h, |t| loss(t, &w));
    // The ignored row gets no gradient.
    assert!(d_h.to_host_f32().unwrap()[4..8].iter().all(|&v| v == 0.0));
}

#[test]
fn flexi_depth_rows_follow_full_or_skip_path_by_mask() {
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(FLEXI)).unwrap()).unwrap();
    let mut p = model.init_params().unwrap();
    scale_params(&mut p, "depth_router", 30.0);
    let (block, bp) = (&model.blocks[2], &p.layers[2]);
    let fc = block.flexi_depth.unwrap();
    let fp = bp.flexi_depth.as_ref().unwrap();
    let x = crate::grad_check::randn(9, &[12, 8], 1.0);
    let cx = BlockCx {
        b: 2,
        t: 6,
        skip_budget: 0.0,
        never_skip: None,
    };
    let (y, out, _) = block.forward(bp, &x, &cx).unwrap();
    // Reference paths, computed separately.
    let n = block.norm;
    let (h1, _) = n.forward(&x, Some(&bp.input_layernorm)).unwrap();
    let a = block.attn.forward(&bp.self_attn, &h1, 2, 6).unwrap().0;
    let xp = x.add(&a).unwrap();
    let (h2, _) = n.forward(&xp, Some(&bp.post_attention_layernorm)).unwrap();
    let f = block.ffn.forward(&bp.mlp, &h2).unwrap().0;
    let (h2s, _) = n.forward(&x, Some(&bp.post_attention_layernorm)).unwrap();
    let ad = Mlp { cfg: fc.adapter() }
        .forward(&fp.adapter, &h2s)
        .unwrap()
        .0;
    let g = out.depth_score.unwrap().to_host_f32().unwrap();
    let m = out.full_path.unwrap().to_host_f32().unwrap();
    let (yv, xv, xpv, fv, adv) = (
        y.to_host_f32().unwrap(),
        x.to_host_f32().unwrap(),
        xp.to_host_f32().unwrap(),
        f.to_host_f32().unwrap(),
        ad.to_host_f32().unwrap(),
    );
    assert!(m.contains(&1.0) && m.contains(&0.0), "both paths: {m:?}");
    for r in 0..12 {
        assert_eq!(m[r] == 1.0, g[r] > 0.045);
        for j in 0..8 {
            let i = r * 8 + j;
            let want = if m[r] == 1.0 {
                xpv[i] + g[r] * fv[i]
            } else {
                xv[i] + (1.0 - g[r]) * adv[i]
            };
            assert!((yv[i] - want).abs() < 1e-5, "row {r}: {} vs {want}", yv[i]);
        }
    }
}

/// [`MOE`] with capacity (drops), for the micro-batch tests.
const MOE_CAPACITY: &str = "[moe]\nrouted_experts = 4\ntop_k = 2\nexpert_hidden = 8\n\
    pre_softmax = true\nshared_experts = 1\nshared_expert_hidden = 8\n\
    shared_expert_gate = true\naux_loss = \"aux\"\naux_loss_weight = 0.5\n\
    z_loss_weight = 0.1\nfirst_dense_layers = 1\ncapacity_factor = 1.0\n";

#[test]
fn micro_batch_accumulation_is_the_mean_of_per_micro_batch_gradients_in_any_order() {
    // The written definition (docs/architecture.md, "Micro-batches"): a step over M
    // micro-batches of equal size has loss (1/M) Σ_k total_k and gradient
    // (1/M) Σ_k ∇total_k, where aux, z, capacity and CE are computed per micro-batch.
    // Reference: each micro-batch's gradient alone (grad_scale 1), averaged in f64.
    // Under test: accumulation with grad_scale = 1/M in several orders. An MoE model with
    // aux + z loss, capacity drops and a gated shared expert; every gradient tensor is
    // compared (a missing 1/M on any loss term's gradient changes that term's share 4×).
    let model = Model::new(ModelConfig::from_plan(&tiny_plan(MOE_CAPACITY)).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let m: usize = 4;
    let micro: Vec<(Tensor, Tensor)> = (0..m).map(|k| batch(4, 6, 13, 11 + k as i32)).collect();
    let mut reference: Vec<(String, Vec<f64>)> = Vec::new();
    let mut losses = Vec::new();
    let mut dropped = 0;
    for (ids, tg) in &micro {
        let out = model.forward(&p, ids, tg, 0).unwrap();
        let v = out.losses.to_host().unwrap();
        assert!(v.aux > 0.0 && v.z > 0.0, "aux and z are live: {v:?}");
        let st = out.stats.to_host(3).unwrap();
        dropped += st.moe.iter().map(|(_, r)| r.dropped).sum::<usize>();
        assert!(st.moe.iter().all(|(_, r)| r.shared_gate_mean.is_some()));
        losses.push(v.total as f64);
        let mut g = p.zeros_like().unwrap();
        model.backward(&p, out.saved, &mut g, 1.0).unwrap();
        for (i, (n, t)) in named(&g).into_iter().enumerate() {
            let v = t.to_host_f32().unwrap();
            if reference.len() <= i {
                reference.push((n, vec![0.0; v.len()]));
            }
            for (r, x) in reference[i].1.iter_mut().zip(v) {
                *r += x as f64 / m as f64;
            }
        }
    }
    assert!(dropped > 0, "capacity drops assignments");
    assert!(
        losses.windows(2).any(|w| w[0] != w[1]),
        "micro-batches differ: {losses:?}"
    );
    assert!(reference
        .iter()
        .any(|(n, _)| n.contains("shared_expert_gate")));
    for order in [[0, 1, 2, 3], [3, 1, 0, 2], [2, 0, 3, 1]] {
        let mut g = p.zeros_like().unwrap();
        let mut loss = 0.0;
        for &k in &order {
            let (ids, tg) = &micro[k];
            let out = model.forward(&p, ids, tg, 0).unwrap();
            let total = out.losses.to_host().unwrap().total as f64;
            assert_eq!(total, losses[k], "a micro-batch's loss is its own");
            loss += total / m as f64;
            model
                .backward(&p, out.saved, &mut g, 1.0 / m as f32)
                .unwrap();
        }
        let want = losses.iter().sum::<f64>() / m as f64;
        assert!((loss - want).abs() <= 1e-12 * want.abs());
        for ((name, got), (rname, want)) in named(&g).into_iter().zip(&reference) {
            assert_eq!(&name, rname);
            let got = got.to_host_f32().unwrap();
            let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(want)
                .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - y).abs()));
            // Four f32 partial sums in another order: ~1e-7 of the largest entry.
            assert!(
                err <= 1e-5 * scale,
                "{name} (order {order:?}): max error {err:.3e} vs scale {scale:.3e}"
            );
        }
    }
}
