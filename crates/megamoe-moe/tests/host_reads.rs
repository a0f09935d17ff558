//! Host reads of an MoE forward + backward, counted by the tensor crate's process-wide
//! counter: zero in static-capacity mode (one rank and two expert-parallel ranks), one per
//! forward (the group sizes) in packed mode. Its own test binary with a single test, so no
//! other test's reads land in the count.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::sync::Arc;

use common::*;
use megamoe_moe::{ExpertParallelDispatcher, MoeLayer, MoeParams, RouterLossScale};
use megamoe_tensor::host_reads;

/// Host reads of one forward, backward_input and backward_weight of `layer`.
fn reads_of_one_step(layer: &MoeLayer, p: &MoeParams, seed: u64) -> u64 {
    let cfg = layer.config();
    let (x, dy) = inputs(16, cfg.d_model, seed);
    let mut g = p.zeros_like().unwrap();
    let scale = RouterLossScale {
        aux: cfg.aux_loss_weight as f32,
        z: cfg.z_loss_weight as f32,
    };
    let before = host_reads();
    let (out, saved) = layer.forward(p, &x).unwrap();
    let (d_x, w) = layer.backward_input(p, &dy, saved, scale).unwrap();
    layer.backward_weight(w, &mut g).unwrap();
    let n = host_reads() - before;
    drop((out, d_x));
    n
}

/// Host reads of one step on each of two expert-parallel ranks (in-memory exchange), in total.
fn reads_of_two_ranks(cfg: &megamoe_moe::MoeConfig) -> u64 {
    let e = cfg.router.num_routed_experts;
    let full = params(cfg, 3);
    let ranks = common::exchange::group(2);
    let before = host_reads();
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|ex| {
                let full = &full;
                s.spawn(move || {
                    let d = ExpertParallelDispatcher::new(ex, e).unwrap();
                    let range = megamoe_moe::TokenDispatcher::local_experts(&d);
                    let layer = MoeLayer::with_dispatcher(cfg.clone(), Arc::new(d)).unwrap();
                    let mut p = full.clone();
                    let rows =
                        |t: &megamoe_tensor::Tensor| t.narrow(0, range.start, range.len()).unwrap();
                    p.experts.in_proj = rows(&full.experts.in_proj);
                    p.experts.down_proj = rows(&full.experts.down_proj);
                    // the counter is process-wide: only the total over both ranks counts
                    reads_of_one_step(&layer, &p, 20 + range.start as u64);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    host_reads() - before
}

#[test]
fn moe_forward_backward_host_reads_static_zero_packed_expert_parallel_one() {
    let body = "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nshared_experts = 1\n\
                shared_expert_hidden = 3\nshared_expert_gate = true\naux_loss = \"seq_aux\"\n\
                aux_loss_weight = 0.5\nz_loss_weight = 0.3\ncapacity_factor = 1.25\n";
    let fixed = config(&format!("{body}pad_to_capacity = true"));
    let packed = config(body);
    let dropless = config(
        "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nscore_fn = \"sigmoid\"\n\
         expert_bias = true\naux_loss_weight = 0.5\nz_loss_weight = 0.3",
    );
    // One rank: the grouped GEMM takes the counts as a device tensor, so neither mode reads
    // the host. (Packed buffers still have a data-dependent row count R, which the permute
    // op sizes itself; static buffers are [E·C, H] whatever the routing.)
    for (name, cfg) in [
        ("static", &fixed),
        ("packed", &packed),
        ("dropless", &dropless),
    ] {
        let layer = MoeLayer::new(cfg.clone()).unwrap();
        let p = params(cfg, 3);
        assert_eq!(reads_of_one_step(&layer, &p, 5), 0, "one rank, {name}");
    }
    // Two expert-parallel ranks: static capacity has fixed splits and no counts exchange;
    // packed mode reads the exchanged counts once per rank and forward (backward reuses them).
    assert_eq!(reads_of_two_ranks(&fixed), 0, "two ranks, static");
    assert_eq!(reads_of_two_ranks(&packed), 2, "two ranks, packed");
    assert_eq!(reads_of_two_ranks(&dropless), 2, "two ranks, dropless");
}
