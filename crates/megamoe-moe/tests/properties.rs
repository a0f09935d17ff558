//! Routing and dispatch invariants (proptest), code-path testers and thread-count
//! determinism:
//! - permute then unpermute is the identity on kept assignments;
//! - no kept assignment is lost or duplicated, nothing dropped or null gets a row;
//! - capacity is never exceeded; Σ counts = T·k − dropped;
//! - `SequentialExperts` and `GroupedExperts` agree (empty experts included);
//! - every `DispatchFastPaths` setting gives bit-identical results;
//! - the whole layer gives identical bits in 1- and 3-thread rayon pools.
#![allow(clippy::unwrap_used)] // test code

mod common;

use common::*;
use megamoe_moe::dispatch::SourceRows;
use megamoe_moe::experts::zeros_like_experts;
use megamoe_moe::{
    compare_expert_banks, Assignments, DispatchFastPaths, ExpertBank, GroupedExperts,
    LocalDispatcher, MoeLayer, RoutedExpertsConfig, RoutedExpertsParams, SequentialExperts,
    TokenDispatcher,
};
use megamoe_plan::Activation;
use megamoe_tensor::ops::routing::KeepOrder;
use megamoe_tensor::{DType, Device, RowGroups, Tensor};
use proptest::prelude::*;

/// Random routing: per token k distinct slots out of a pool of `pool`, random gates.
/// (E, k, n_null, T, slots [T·k], gates [T·k], capacity, probs policy).
type RoutingCase = (
    usize,
    usize,
    usize,
    usize,
    Vec<i32>,
    Vec<f32>,
    Option<usize>,
    bool,
);

fn routing_strategy() -> impl Strategy<Value = RoutingCase> {
    (1usize..6, 1usize..4, 0usize..4, 1usize..12).prop_flat_map(|(e, k, n_null, t)| {
        let pool = e + n_null;
        let k = k.min(pool);
        (
            Just(e),
            Just(k),
            Just(n_null),
            Just(t),
            proptest::collection::vec(
                proptest::sample::subsequence((0..pool as i32).collect::<Vec<_>>(), k),
                t,
            )
            .prop_map(|v| v.into_iter().flatten().collect::<Vec<i32>>()),
            proptest::collection::vec(0.0f32..1.0, t * k),
            proptest::option::of(0usize..6),
            any::<bool>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn dispatch_invariants_hold((e, k, _n_null, t, slots, gates, cap, by_gate) in routing_strategy()) {
        let idx = Tensor::from_vec_i32(slots.clone(), [t, k], Device::Cpu).unwrap();
        let g = Tensor::from_vec_f32(gates, [t, k], Device::Cpu).unwrap();
        let order = if by_gate { KeepOrder::HighestGate } else { KeepOrder::Earliest };
        let keep = idx.capacity_keep(&g, e, cap, order).unwrap();
        let kv = host(&keep);
        let perm = idx.sort_by_expert(&keep, e).unwrap();
        let counts = perm.counts.to_host_i32().unwrap();
        let assignment = perm.assignment.to_host_i32().unwrap();
        let token = perm.token.to_host_i32().unwrap();

        // capacity never exceeded
        if let Some(c) = cap {
            prop_assert!(counts.iter().all(|&n| n as usize <= c));
        }
        // Σ counts = real picks − dropped (= T·k − dropped without null slots)
        let real = slots.iter().filter(|&&s| (s as usize) < e).count();
        let kept = kv.iter().filter(|&&v| v != 0.0).count();
        let dropped = real - kept;
        prop_assert_eq!(counts.iter().sum::<i32>() as usize, real - dropped);
        // no kept assignment lost or duplicated; dropped/null ones absent
        let mut seen = vec![0u8; t * k];
        for &a in &assignment { seen[a as usize] += 1; }
        for a in 0..t * k {
            prop_assert_eq!(seen[a] as f32, kv[a]);
        }
        // rows are expert-major, token-ordered within an expert, and point at their token
        let mut r = 0;
        for (ex, &c) in counts.iter().enumerate() {
            for i in 0..c as usize {
                let a = assignment[r] as usize;
                prop_assert_eq!(slots[a] as usize, ex);
                prop_assert_eq!(token[r] as usize, a / k);
                if i > 0 { prop_assert!(assignment[r - 1] < assignment[r]); }
                r += 1;
            }
        }
        // permute ∘ unpermute = identity on kept assignments
        let h = 3;
        let x = Tensor::randn_named(t as u64, "x", [t, h], 1.0, Device::Cpu).unwrap();
        let d = LocalDispatcher::new(e);
        let a = Assignments { slots: &idx, keep: &keep, gates: &g };
        let (rows, layout) = d.permute(&x, a, None, false).unwrap();
        let SourceRows::Packed { assignment, .. } = &layout.rows else {
            panic!("no capacity padding asked: rows must be packed");
        };
        let back = Tensor::zeros([t * k, h], DType::F32, Device::Cpu).unwrap()
            .index_add_rows(assignment, &rows, None).unwrap();
        let (xb, xv) = (host(&back), host(&x));
        for a in 0..t * k {
            for j in 0..h {
                let want = if kv[a] != 0.0 { xv[(a / k) * h + j] } else { 0.0 };
                prop_assert_eq!(xb[a * h + j], want);
            }
        }
        // static buffers are the packed rows padded to C per expert, fused or not, and the
        // unweighted combine of them is the packed scatter-add (permute's backward)
        if let Some(c) = cap {
            let padded = rows.pad_groups(&layout.counts, c).unwrap();
            prop_assert_eq!(padded.dims(), &[e * c, h]);
            for fused in [false, true] {
                let (buffers, fixed) = d.permute(&x, a, Some(c), fused).unwrap();
                prop_assert_eq!(host(&buffers), host(&padded));
                prop_assert_eq!(fixed.capacity(), Some(c));
                prop_assert_eq!(
                    host(&d.dispatch_backward(&buffers, &fixed).unwrap()),
                    host(&d.dispatch_backward(&rows, &layout).unwrap())
                );
            }
        }
    }
}

fn bank(e: usize, act: Activation) -> (RoutedExpertsConfig, RoutedExpertsParams) {
    let cfg = RoutedExpertsConfig {
        num_routed_experts: e,
        d_model: 6,
        hidden: 5,
        activation: act,
    };
    let w = |n: &str, s: [usize; 3]| Tensor::randn_named(3, n, s, 0.4, Device::Cpu).unwrap();
    let rows = if act == Activation::SwiGlu { 10 } else { 5 };
    let p = RoutedExpertsParams {
        in_proj: w("u", [e, rows, 6]),
        down_proj: w("d", [e, 6, 5]),
    };
    (cfg, p)
}

#[test]
fn grouped_and_sequential_experts_agree_with_empty_experts() {
    for act in [Activation::SwiGlu, Activation::Relu2, Activation::Gelu] {
        let sizes = [3, 0, 2, 0, 4];
        let (cfg, p) = bank(sizes.len(), act);
        let x = Tensor::randn_named(1, "x", [9, 6], 1.0, Device::Cpu).unwrap();
        let dy = Tensor::randn_named(1, "dy", [9, 6], 1.0, Device::Cpu).unwrap();
        let worst = compare_expert_banks(cfg, &p, &x, &sizes, &dy).unwrap();
        // Same dense kernels on the same rows; allow f32 reassociation only.
        assert!(
            worst <= 1e-6,
            "{act:?}: grouped vs sequential rel. diff {worst:e}"
        );
        // empty experts get exactly zero gradients
        let b = GroupedExperts { cfg };
        let groups = RowGroups::from_sizes(&sizes, Device::Cpu).unwrap();
        let (_, s) = b.forward(&p, &x, &groups).unwrap();
        let (_, w) = b.backward_input(&p, &dy, s).unwrap();
        let mut g = zeros_like_experts(&p).unwrap();
        b.backward_weight(w, &mut g).unwrap();
        // expert e's block of the input projection's gradient: [rows, 6]
        let per = g.in_proj.dims()[1] * 6;
        let w_in = host(&g.in_proj);
        assert!(
            w_in[per..2 * per].iter().all(|&v| v == 0.0),
            "expert 1 has no rows"
        );
        assert!(w_in[..per].iter().any(|&v| v != 0.0));
    }
    // a bank with no rows at all
    let (cfg, p) = bank(2, Activation::SwiGlu);
    let x = Tensor::zeros([0, 6], DType::F32, Device::Cpu).unwrap();
    assert_eq!(compare_expert_banks(cfg, &p, &x, &[0, 0], &x).unwrap(), 0.0);
    let none = RowGroups::from_sizes(&[0, 0], Device::Cpu).unwrap();
    let (y, _) = SequentialExperts { cfg }.forward(&p, &x, &none).unwrap();
    assert_eq!(y.dims(), &[0, 6]);
}

/// Forward + backward outputs of a layer as host bit patterns.
fn run_bits(layer: &MoeLayer, cfg_seed: u64, tokens: usize) -> Vec<Vec<u32>> {
    let cfg = layer.config();
    let p = params(cfg, cfg_seed);
    let (x, dy) = inputs(tokens, cfg.d_model, cfg_seed);
    let (out, saved) = layer.forward(&p, &x).unwrap();
    let mut g = p.zeros_like().unwrap();
    let dx = layer
        .backward(&p, &dy, saved, layer.loss_scale(1, 1).unwrap(), &mut g)
        .unwrap();
    let bits = |t: &Tensor| host(t).iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let mut v = vec![
        bits(&out.y),
        bits(&out.aux_loss),
        bits(&out.z_loss),
        bits(&dx),
    ];
    g.visit("", &mut |_, t, _| v.push(bits(t)));
    v
}

#[test]
fn dispatch_fast_paths_agree_bit_for_bit() {
    for (name, cfg) in fd_configs() {
        let mut results = Vec::new();
        for fused_permute in [false, true] {
            for overlap_shared in [false, true] {
                let mut c = cfg.clone();
                c.fast_paths = DispatchFastPaths {
                    fused_permute,
                    overlap_shared,
                };
                results.push(run_bits(&MoeLayer::new(c).unwrap(), 4, 16));
            }
        }
        for r in &results[1..] {
            assert_eq!(r, &results[0], "{name}: fast paths changed the result");
        }
    }
}

#[test]
fn pad_to_capacity_changes_shapes_not_values() {
    let base = config(
        "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 0.75\n\
         drop_policy = \"position\"",
    );
    let mut padded = base.clone();
    padded.pad_to_capacity = true;
    let a = run_bits(&MoeLayer::new(base).unwrap(), 8, 16);
    let b = run_bits(&MoeLayer::new(padded).unwrap(), 8, 16);
    assert_eq!(a, b);
}

#[test]
fn layer_is_deterministic_across_thread_counts() {
    // Shapes large enough that every kernel splits into several rayon tasks (16k elements
    // per task): 512 tokens × width 64, experts of width 96, and the small FD configs.
    let big = {
        let text = "[model]\nvocab_size = 16\nd_model = 64\nn_layers = 1\nn_heads = 1\n\
                    ffn_hidden = 8\nseq_len = 64\n[moe]\nrouted_experts = 8\ntop_k = 2\n\
                    expert_hidden = 96\ncapacity_factor = 1.0\nshared_experts = 1\n\
                    shared_expert_gate = true\naux_loss = \"seq_aux\"";
        megamoe_moe::MoeConfig::from_toml_str(text).unwrap()
    };
    let mut cases = fd_configs();
    cases.push(("big", big));
    for (name, cfg) in cases {
        let mut c = cfg.clone();
        c.fast_paths = DispatchFastPaths {
            fused_permute: true,
            overlap_shared: true,
        };
        let tokens = if name == "big" { 512 } else { 16 };
        let layer = MoeLayer::new(c).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let a = one.install(|| run_bits(&layer, 6, tokens));
        let b = three.install(|| run_bits(&layer, 6, tokens));
        assert_eq!(a, b, "{name}: 1 vs 3 threads");
    }
}
