//! Expert parallelism through the injectable dispatcher, in one process: two layers, each
//! owning half of the experts, exchange rows through the `all_to_all_v` of a thread-rank
//! communicator (megamoe-comm's `ThreadWorld`) and must reproduce one layer holding every
//! expert.
//!
//! Per-micro-batch semantics: each rank routes its own tokens (capacity and router losses
//! per call), so the reference runs the single-rank layer once per rank's tokens,
//! accumulating gradients. Outputs and input gradients must match bit for bit (every row
//! meets the same expert weights in the same kernels); expert weight gradients sum the same
//! rows in one GEMM instead of two, and replicated weights' gradients are summed over ranks,
//! so those are compared at f32 tolerance.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::sync::Arc;

use common::exchange::group;
use common::*;
use megamoe_comm::{Communicator, ThreadWorld};
use megamoe_moe::{
    Error, ExpertParallelDispatcher, MoeConfig, MoeLayer, MoeParams, RouterLossScale,
};
use megamoe_tensor::Tensor;

/// What one rank's (or one reference call's) forward + backward produced.
struct RankRun {
    y: Vec<f32>,
    aux: Vec<f32>,
    z: Vec<f32>,
    dx: Vec<f32>,
    grads: MoeParams,
}

fn run(layer: &MoeLayer, p: &MoeParams, x: &Tensor, dy: &Tensor, grads: MoeParams) -> RankRun {
    let cfg = layer.config();
    let scale = RouterLossScale {
        aux: cfg.aux_loss_weight as f32,
        z: cfg.z_loss_weight as f32,
    };
    let mut grads = grads;
    let (out, saved) = layer.forward(p, x).unwrap();
    let dx = layer.backward(p, dy, saved, scale, &mut grads).unwrap();
    RankRun {
        y: host(&out.y),
        aux: host(&out.aux_loss),
        z: host(&out.z_loss),
        dx: host(&dx),
        grads,
    }
}

/// Rank params: the full params with the expert banks narrowed to `e0..e0 + el`.
fn shard(full: &MoeParams, e0: usize, el: usize) -> MoeParams {
    let mut p = full.clone();
    let rows = |t: &Tensor| t.narrow(0, e0, el).unwrap();
    p.experts.in_proj = rows(&full.experts.in_proj);
    p.experts.down_proj = rows(&full.experts.down_proj);
    p
}

/// max |a − b| / max |b| (0 when b is all zero and a equals it).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

fn named(p: &MoeParams) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    p.visit("", &mut |n, t, _| v.push((n.to_string(), host(t))));
    v
}

fn two_ranks_match_one(name: &str, cfg: &MoeConfig) {
    let (world, tokens, seed) = (2, 16, 7);
    let e = cfg.router.num_routed_experts;
    let el = e / world;
    let full = params(cfg, seed);
    let inputs: Vec<(Tensor, Tensor)> = (0..world)
        .map(|r| inputs(tokens, cfg.d_model, 100 + r as u64))
        .collect();

    // reference: one layer with every expert, one call per rank's tokens
    let reference = MoeLayer::new(cfg.clone()).unwrap();
    let mut g_ref = full.zeros_like().unwrap();
    let mut ref_runs = Vec::new();
    for (x, dy) in &inputs {
        let r = run(&reference, &full, x, dy, g_ref);
        ref_runs.push((r.y, r.aux, r.z, r.dx));
        g_ref = r.grads; // accumulated over the calls, like micro-batches
    }

    // expert parallel: thread ranks of a ThreadWorld, the exchange is the world communicator
    let runs: Vec<RankRun> = ThreadWorld::new(world)
        .unwrap()
        .run(|comm| -> Result<RankRun, Error> {
            let rank = comm.rank();
            let ep: Arc<dyn Communicator> = Arc::new(comm);
            let d = ExpertParallelDispatcher::new(ep, e)?;
            let layer = MoeLayer::with_dispatcher(cfg.clone(), Arc::new(d))?;
            assert_eq!(layer.local_experts(), rank * el..(rank + 1) * el);
            let p = shard(&full, rank * el, el);
            let g = p.zeros_like()?;
            let (x, dy) = &inputs[rank];
            Ok(run(&layer, &p, x, dy, g))
        })
        .unwrap();

    for (rank, (r, (y, aux, z, dx))) in runs.iter().zip(&ref_runs).enumerate() {
        assert_eq!(&r.y, y, "{name}: rank {rank} output");
        assert_eq!(&r.dx, dx, "{name}: rank {rank} d_x");
        assert_eq!(
            (&r.aux, &r.z),
            (aux, z),
            "{name}: rank {rank} router losses"
        );
    }
    // Gradients: expert banks are the rank's rows of the reference; replicated weights'
    // gradients summed over the ranks equal the reference's accumulation over both calls.
    // f32 tolerance: the same products summed in a different order.
    let ref_named = named(&g_ref);
    let rank_named: Vec<_> = runs.iter().map(|r| named(&r.grads)).collect();
    for (i, (pname, want)) in ref_named.iter().enumerate() {
        let got: Vec<f32> = if pname.starts_with("experts.") {
            let per = want.len() / e;
            let mut v = Vec::new();
            for rn in &rank_named {
                v.extend_from_slice(&rn[i].1);
            }
            assert_eq!(v.len(), per * e);
            v
        } else {
            let mut v = vec![0.0f32; want.len()];
            for rn in &rank_named {
                v.iter_mut().zip(&rn[i].1).for_each(|(a, b)| *a += b);
            }
            v
        };
        let err = rel(&got, want);
        assert!(err <= 1e-5, "{name}: grad {pname} rel err {err:e}");
        assert!(
            want.iter().any(|&v| v != 0.0),
            "{name}: grad {pname} is all zero"
        );
    }
}

#[test]
fn two_rank_expert_parallel_matches_one_rank_with_all_experts() {
    let cases = [
        (
            "dropless_shared_gate_swiglu",
            "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nshared_experts = 1\n\
             shared_expert_hidden = 3\nshared_expert_gate = true\naux_loss_weight = 0.5\n\
             z_loss_weight = 0.3",
        ),
        (
            "capacity_packed_probs_relu2",
            "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 0.75\n\
             activation = \"relu2\"\naux_loss_weight = 0.5\nz_loss_weight = 0.3",
        ),
        (
            "static_capacity_sigmoid_bias_gelu",
            "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 1.0\n\
             pad_to_capacity = true\nscore_fn = \"sigmoid\"\nexpert_bias = true\n\
             activation = \"gelu\"\naux_loss = \"seq_aux\"\naux_loss_weight = 0.5\n\
             z_loss_weight = 0.3",
        ),
        (
            "static_capacity_null_slots_position",
            "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nnull_rho = 0.5\n\
             capacity_factor = 0.75\ndrop_policy = \"position\"\npad_to_capacity = true\n\
             aux_loss_weight = 0.5\nz_loss_weight = 0.3",
        ),
    ];
    for (name, body) in cases {
        two_ranks_match_one(name, &config(body));
    }
    // shared experts computed on a helper thread while the ranks exchange
    let mut overlap = config(cases[0].1);
    overlap.fast_paths.overlap_shared = true;
    two_ranks_match_one("dropless_overlap_shared", &overlap);
}

#[test]
fn expert_shard_init_is_rows_of_the_global_bank() {
    let cfg = config("routed_experts = 8\ntop_k = 2\nexpert_hidden = 5");
    let full = MoeParams::init(&cfg, 11, "model.layers.3.mlp.").unwrap();
    let part = MoeParams::init_local(&cfg, 11, "model.layers.3.mlp.", 2..4).unwrap();
    let rows = |t: &Tensor| host(&t.narrow(0, 2, 2).unwrap());
    // swiglu: the fused gate‖up bank [E, 2F, H]
    assert_eq!(part.experts.in_proj.dims(), &[2, 10, 6]);
    assert_eq!(host(&part.experts.in_proj), rows(&full.experts.in_proj));
    assert_eq!(host(&part.experts.down_proj), rows(&full.experts.down_proj));
    assert_eq!(host(&part.router.weight), host(&full.router.weight));
    // a range outside the bank is a named error
    let e = MoeParams::init_local(&cfg, 11, "", 6..9).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                field: "moe.routed_experts",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn expert_parallel_rejects_experts_not_divisible_by_ranks() {
    let mut g = group(3);
    let e = ExpertParallelDispatcher::new(g.remove(0), 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                field: "moe.routed_experts",
                ..
            }
        ),
        "{e}"
    );
    // a layer refuses params that do not match its local expert count
    let cfg = config("routed_experts = 4\ntop_k = 2\nexpert_hidden = 5");
    let d = ExpertParallelDispatcher::new(group(2).remove(0), 4).unwrap();
    let layer = MoeLayer::with_dispatcher(cfg.clone(), Arc::new(d)).unwrap();
    let all = MoeParams::init(&cfg, 1, "").unwrap();
    let (x, _) = inputs(8, 6, 1);
    assert!(layer.forward(&all, &x).is_err());
}

#[test]
fn a_failed_expert_parallel_peer_is_an_exchange_error_naming_it() {
    let cfg = config("routed_experts = 4\ntop_k = 2\nexpert_hidden = 5");
    let full = params(&cfg, 3);
    let (x, _) = inputs(8, cfg.d_model, 5);
    let failures = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> Result<(), String> {
            if comm.rank() == 1 {
                return Err("injected fault".into());
            }
            let ep: Arc<dyn Communicator> = Arc::new(comm);
            let d = ExpertParallelDispatcher::new(ep, 4).map_err(|e| e.to_string())?;
            let layer = MoeLayer::with_dispatcher(cfg.clone(), Arc::new(d)).unwrap();
            let err = layer.forward(&shard(&full, 0, 2), &x).unwrap_err();
            assert!(matches!(err, Error::Exchange(_)), "{err}");
            Err(err.to_string())
        })
        .unwrap_err();
    assert_eq!(failures.first.0, 1, "{failures}");
    let (_, rank0) = &failures.failures[0];
    assert!(rank0.contains("rank 1 failed: injected fault"), "{rank0}");
}
