//! Parallel layouts: for a few layouts of `configs/tiny.toml` prints the mesh (rank ↔
//! coordinates, the process groups), and each rank's shard (pipeline layers, the routed
//! experts of every MoE layer, FSDP rows of the largest matrices), then checks that every
//! layer, expert and row is held by exactly the right number of ranks.
//!
//! Run: `cargo run --release -p megamoe-plan --example parallel_layouts`

use megamoe_plan::shard::{chunk, fsdp_shard_table};
use megamoe_plan::{MeshGroup, Plan, APPLICATION_ORDER};

const TINY: &str = include_str!("../../../configs/tiny.toml");

fn show(name: &str, overrides: &[&str]) -> Result<(), megamoe_plan::PlanError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let plan = Plan::from_toml_str(TINY, &overrides, None)?;
    let mesh = plan.mesh;
    let world = mesh.world();
    println!("== {name}: {} ({world} ranks)", mesh.describe());
    for rank in 0..world {
        let c = mesh.coords(rank).expect("rank inside the mesh");
        assert_eq!(mesh.rank(c), Some(rank), "coordinates map back to the rank");
        println!(
            "  rank {rank}: pp {} dp {} ep {} cp {} tp {}",
            c.pp, c.dp, c.ep, c.cp, c.tp
        );
    }
    for kind in MeshGroup::ALL {
        let groups = mesh.groups(kind);
        // the groups of one kind partition the world
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..world).collect::<Vec<_>>(),
            "{} groups",
            kind.name()
        );
        if groups.iter().any(|g| g.len() > 1) {
            println!("  {:<9} groups {groups:?}", kind.name());
        }
    }
    let n_layers = plan.model.n_layers;
    let mut layer_holders = vec![0usize; n_layers];
    let moe = plan.moe.as_ref();
    let mut expert_holders = vec![0usize; moe.map_or(0, |m| m.routed_experts)];
    for rank in 0..world {
        let c = mesh.coords(rank).expect("rank inside the mesh");
        let stages = &plan.stages.ranks[c.pp];
        for l in stages.layers.iter().flat_map(|r| r.clone()) {
            layer_holders[l] += 1;
        }
        let mut line = format!("  rank {rank} holds layers {:?}", stages.layers);
        if let Some(m) = moe {
            let lo = c.ep * m.experts_per_ep_rank;
            let hi = lo + m.experts_per_ep_rank;
            for holders in &mut expert_holders[lo..hi] {
                *holders += 1;
            }
            line += &format!(", routed experts {lo}..{hi} of each of its MoE layers");
        }
        println!("{line}");
    }
    // every layer on the ranks of exactly one pipeline rank; every routed expert on
    // the ranks of one ep rank
    assert!(layer_holders.iter().all(|&h| h == world / mesh.pp));
    assert!(expert_holders.iter().all(|&h| h == world / mesh.ep));
    if plan.parallel.zero.level() > 0 {
        for s in fsdp_shard_table(&plan).iter().take(3) {
            let rows: Vec<usize> = (0..s.group)
                .map(|r| chunk(s.rows, s.group, r).len)
                .collect();
            assert_eq!(rows.iter().sum::<usize>(), s.rows, "{} rows", s.name);
            println!(
                "  fsdp {}: {} rows x {} over {} ranks: {rows:?} rows, {:?} bytes (f32)",
                s.name,
                s.rows,
                s.row_elems,
                s.group,
                rows.iter().map(|r| r * s.row_elems * 4).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), megamoe_plan::PlanError> {
    println!("parallelisms cut the model in this order:");
    for (name, what) in APPLICATION_ORDER {
        println!("  {name}: {what}");
    }
    show("dp2", &["parallel.dp=2"])?;
    show("ep2", &["parallel.ep=2"])?;
    show(
        "dp2 x ep2, fsdp 2",
        &["parallel.dp=2", "parallel.ep=2", "parallel.fsdp=2"],
    )?;
    show(
        "pp2 dualpipev",
        &[
            "parallel.pp=2",
            "parallel.schedule=\"dualpipev\"",
            "parallel.microbatches=4",
        ],
    )?;
    show(
        "dp2 x ep2 x pp2",
        &[
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.pp=2",
            "parallel.microbatches=2",
        ],
    )?;
    show("tp2", &["parallel.tp=2"])?;
    show(
        "dp2 x tp2, fsdp 3",
        &["parallel.dp=2", "parallel.tp=2", "parallel.fsdp=3"],
    )?;
    show(
        "dp2 x pp2, fsdp 2",
        &[
            "parallel.dp=2",
            "parallel.pp=2",
            "parallel.fsdp=2",
            "parallel.microbatches=2",
        ],
    )?;
    Ok(())
}
