//! FSDP2 local-shard Muon, single-process part (seed `fsdp2_muon_local_shard_sample.py`).
//!
//! 1. Shard maps of real attention matrices over W ranks under both dim-0 rules
//!    (`chunk` = FSDP2/DTensor, `even` = seed `shard0_bounds`), with the seed's
//!    `qkv_local_split_sizes` for each rank's local rows.
//! 2. Moonlight Algorithm 1 on W row shards held in one process (reduce-scatter →
//!    local momentum → gather → NS5 on the full matrix → keep the local slice → update)
//!    compared with single-rank Muon on the full matrix: they agree to ≤ 1e-6.
//!
//! Run: `cargo run -p megamoe-optim --example fsdp2_muon_local_shard`

use megamoe_optim::muon::{muon_update, MuonConfig};
use megamoe_optim::shard::{all_gather_rows, shard_rows, ShardRule, ShardedMuon};
use megamoe_optim::NsPrecision;
use megamoe_plan::{qkv_local_split_sizes, MuonScale};
use megamoe_tensor::{DType, Device, Tensor};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// (name, dims, world, rule, fused row blocks).
type Case<'a> = (&'a str, &'a [usize], usize, ShardRule, &'a [usize]);

/// A deterministic matrix with values in [-1, 1) (an LCG; the example needs no RNG crate).
fn matrix(seed: u64, dims: &[usize]) -> Res<Tensor> {
    let n: usize = dims.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec_f32(v, dims.to_vec(), Device::Cpu)?)
}

fn print_maps(name: &str, rows: usize, world: usize, fused: Option<&[usize]>) {
    println!("{name}: {rows} rows over W={world}");
    for rule in [ShardRule::Chunk, ShardRule::Even] {
        let maps = rule.map(rows, world);
        let cells: Vec<String> = maps
            .iter()
            .map(|s| {
                let mut c = format!("[{}, {})", s.start, s.start + s.len);
                if s.padded_len != s.len {
                    c.push_str(&format!(" pad {}", s.padded_len));
                }
                if let Some(splits) = fused {
                    c.push_str(&format!(" qkv {:?}", qkv_local_split_sizes(splits, s.len)));
                }
                c
            })
            .collect();
        println!("  {:<5} {}", format!("{rule:?}"), cells.join("  "));
    }
}

/// 3 steps of sharded and of full Muon; returns max |Δ| / max |W_full|.
fn compare(dims: &[usize], world: usize, rule: ShardRule, blocks: &[usize]) -> Res<f64> {
    let cfg = MuonConfig {
        momentum: 0.95,
        nesterov: true,
        scale: MuonScale::Keller,
        weight_decay: 0.1,
        ns_precision: NsPrecision::F32,
    };
    let w0 = matrix(7, dims)?;
    let (mut full, mut full_mom) = (w0.clone(), Tensor::zeros(dims, DType::F32, Device::Cpu)?);
    let mut shards = shard_rows(&w0, rule, world)?;
    let mut moms = shards
        .iter()
        .map(|s| Tensor::zeros(s.dims(), DType::F32, Device::Cpu))
        .collect::<Result<Vec<_>, _>>()?;
    let sharded = ShardedMuon {
        rule,
        cfg,
        blocks: blocks.to_vec(),
    };
    for step in 0..3 {
        // Each rank's gradient from its own data; DP reduction is the mean.
        let rank_grads = (0..world as u64)
            .map(|r| matrix(100 * step + r, dims))
            .collect::<Res<Vec<_>>>()?;
        let mut mean = rank_grads[0].scale(1.0)?;
        for g in &rank_grads[1..] {
            mean.add_assign(g)?;
        }
        let mean = mean.scale(1.0 / world as f32)?;
        full = muon_update(&full, &mean, &mut full_mom, &cfg, 0.02, blocks, true)?;
        sharded.step(&mut shards, &mut moms, &rank_grads, 0.02, true)?;
    }
    let gathered = all_gather_rows(&shards, rule, dims[0])?.to_host_f32()?;
    let reference = full.to_host_f32()?;
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let diff = gathered
        .iter()
        .zip(&reference)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    Ok(diff / scale)
}

fn main() -> Res<()> {
    // A GQA attention block: d_model 16, 4 query heads and 2 KV heads of size 4 →
    // fused qkv rows 16 + 8 + 8 = 32; o_proj [16, 16]; an odd matrix of 10 rows.
    let qkv_split = [16usize, 8, 8];
    println!("== shard maps ==");
    for world in [2, 3, 4] {
        print_maps("attn.qkv_proj.weight [32, 16]", 32, world, Some(&qkv_split));
    }
    print_maps("mlp.router.weight [10, 16]", 10, 4, None);
    print_maps("tiny [5, 8] (chunk leaves rank 3 empty)", 5, 4, None);
    assert_eq!(ShardRule::Chunk.rows(5, 4, 3).len, 0);
    assert_eq!(ShardRule::Even.rows(10, 4, 2).len, 2);
    assert_eq!(ShardRule::Chunk.rows(10, 4, 2).len, 3);

    println!("\n== local-shard Muon vs full-matrix Muon (3 steps, keller, Nesterov) ==");
    let cases: [Case; 6] = [
        (
            "qkv [32,16] fused",
            &[32, 16],
            3,
            ShardRule::Chunk,
            &qkv_split,
        ),
        (
            "qkv [32,16] fused",
            &[32, 16],
            3,
            ShardRule::Even,
            &qkv_split,
        ),
        ("o_proj [16,16]", &[16, 16], 4, ShardRule::Chunk, &[]),
        ("router [10,16]", &[10, 16], 4, ShardRule::Chunk, &[]),
        ("router [10,16]", &[10, 16], 4, ShardRule::Even, &[]),
        ("tiny [5,8]", &[5, 8], 4, ShardRule::Chunk, &[]),
    ];
    for (name, dims, world, rule, blocks) in cases {
        let err = compare(dims, world, rule, blocks)?;
        println!(
            "  {name:<18} W={world} {:<5} max rel diff {err:.2e}",
            format!("{rule:?}")
        );
        assert!(
            err <= 1e-6,
            "{name}: local-shard Muon differs from full Muon by {err}"
        );
    }
    println!("all local-shard updates equal the single-rank Muon update (≤ 1e-6)");
    Ok(())
}
