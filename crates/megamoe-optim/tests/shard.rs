//! Local-shard Muon (Moonlight Algorithm 1, single process) equals full-matrix Muon.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use common::*;
use megamoe_optim::muon::{muon_update, MuonConfig};
use megamoe_optim::shard::{
    all_gather_rows, reduce_scatter_mean, shard_rows, ShardRule, ShardedMuon,
};
use megamoe_optim::NsPrecision;
use megamoe_plan::MuonScale;
use megamoe_tensor::{DType, Device, Tensor};

fn cfg(scale: MuonScale, p: NsPrecision) -> MuonConfig {
    MuonConfig {
        momentum: 0.95,
        nesterov: true,
        scale,
        weight_decay: 0.1,
        ns_precision: p,
    }
}

/// Runs 3 steps of sharded Muon over `world` ranks and of full-matrix Muon on the mean
/// gradient; returns the max relative difference of the parameters.
fn sharded_vs_full(
    dims: &[usize],
    world: usize,
    rule: ShardRule,
    c: MuonConfig,
    blocks: &[usize],
) -> f64 {
    let w0 = rand_t(1000 + dims[0] as u64, dims);
    let mut full = w0.clone();
    let mut full_mom = Tensor::zeros(dims, DType::F32, Device::Cpu).unwrap();
    let mut shards = shard_rows(&w0, rule, world).unwrap();
    let mut moms: Vec<Tensor> = shards
        .iter()
        .map(|s| Tensor::zeros(s.dims(), DType::F32, Device::Cpu).unwrap())
        .collect();
    let sm = ShardedMuon {
        rule,
        cfg: c,
        blocks: blocks.to_vec(),
    };
    for step in 0..3u64 {
        let rank_grads: Vec<Tensor> = (0..world as u64)
            .map(|r| rand_t(step * 31 + r, dims))
            .collect();
        // Single-rank reference: the DP-mean gradient on the whole matrix.
        let mut mean = rank_grads[0].scale(1.0).unwrap();
        for g in &rank_grads[1..] {
            mean.add_assign(g).unwrap();
        }
        let mean = mean.scale(1.0 / world as f32).unwrap();
        full = muon_update(&full, &mean, &mut full_mom, &c, 0.02, blocks, true).unwrap();
        sm.step(&mut shards, &mut moms, &rank_grads, 0.02, true)
            .unwrap();
    }
    let gathered = all_gather_rows(&shards, rule, dims[0]).unwrap();
    rel_err(&host(&gathered), &host(&full))
}

#[test]
fn local_shard_muon_equals_full_muon_over_1_to_4_ranks() {
    for world in 1..=4 {
        for rule in [ShardRule::Chunk, ShardRule::Even] {
            // [5, 7]: under chunk with W=4, c=2 → rank 3 holds 0 rows.
            for dims in [[5usize, 7], [10, 4]] {
                let e = sharded_vs_full(
                    &dims,
                    world,
                    rule,
                    cfg(MuonScale::Keller, NsPrecision::F32),
                    &[],
                );
                assert!(e <= 1e-6, "W={world} {rule:?} {dims:?}: {e}");
            }
        }
    }
    assert_eq!(ShardRule::Chunk.rows(5, 4, 3).len, 0);
}

#[test]
fn local_shard_muon_with_moonlight_fused_blocks_bf16_and_expert_banks() {
    let e = sharded_vs_full(
        &[12, 6],
        3,
        ShardRule::Chunk,
        cfg(MuonScale::Moonlight, NsPrecision::F32),
        &[6, 3, 3],
    );
    assert!(e <= 1e-6, "fused: {e}");
    // bf16 on the wire and in NS: the full path rounds U to bf16 at the same point.
    let e = sharded_vs_full(
        &[9, 8],
        4,
        ShardRule::Chunk,
        cfg(MuonScale::Keller, NsPrecision::Bf16),
        &[],
    );
    assert!(e <= 1e-6, "bf16: {e}");
    // An expert bank sharded over experts (chunk, W=3: 2, 2, 0 experts).
    let e = sharded_vs_full(
        &[4, 3, 5],
        3,
        ShardRule::Chunk,
        cfg(MuonScale::Keller, NsPrecision::F32),
        &[],
    );
    assert!(e <= 1e-6, "bank: {e}");
}

#[test]
fn collectives_pad_and_unpad() {
    // n=5, W=4, chunk: shards of 2, 2, 1, 0 rows; gather ∘ shard = identity.
    let x = rand_t(5, &[5, 3]);
    let s = shard_rows(&x, ShardRule::Chunk, 4).unwrap();
    assert_eq!(
        s.iter().map(|t| t.dims()[0]).collect::<Vec<_>>(),
        vec![2, 2, 1, 0]
    );
    assert_eq!(
        host(&all_gather_rows(&s, ShardRule::Chunk, 5).unwrap()),
        host(&x)
    );
    // reduce-scatter of [x, 3x] (mean 2x) gives rank r its rows of 2x.
    let rs = reduce_scatter_mean(&[x.clone(), x.scale(3.0).unwrap()], ShardRule::Even).unwrap();
    let two = host(&x.scale(2.0).unwrap());
    assert_eq!(host(&rs[0]), two[..9].to_vec());
    assert_eq!(host(&rs[1]), two[9..].to_vec());
    // A shard of the wrong size is a named error (even rule: the seed's message).
    let bad = vec![x.narrow(0, 0, 2).unwrap(), x.narrow(0, 2, 3).unwrap()];
    let e = all_gather_rows(&bad, ShardRule::Even, 5).unwrap_err();
    assert!(
        e.to_string().contains("local_rows=2") && e.to_string().contains("shard length=3"),
        "{e}"
    );
    let e = all_gather_rows(&bad, ShardRule::Chunk, 5).unwrap_err();
    assert!(e.to_string().contains("local shard rows"), "{e}");
}
