//! The planner describes what a pipeline rank holds: for each pipeline rank, the
//! parameter count of `megamoe plan`'s memory model (`plan_memory`, per pp rank) equals
//! the parameter elements the rank's stages really hold (`PipelineRank::param_elements`)
//! — under a linear (1F1B), looped (interleaved), V (DualPipeV) and mirrored (DualPipe)
//! stage map, with expert parallelism, with a tied or untied head, with and without MTP
//! (the head stage holds a copy of the embedding when the tied head or MTP reads it and
//! the embedding lives on another rank). Under pp × tp, pp × ep × tp and pp × dp with
//! fsdp 1/2/3 (`check_plan`) the per-rank parameter count and bytes, the `[fsdp shards]`
//! rows and the optimizer bucket are what each rank of the stage holds.
#![allow(clippy::unwrap_used)]

#[path = "common/layout.rs"]
mod layout;

use layout::{data, matches, pipeline_raw, pipeline_sets, Mesh};
use megamoe_plan::{chunk, fsdp_shard_table, plan_memory, Plan, RawConfig, TINY_CONFIG};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{Error, Trainer, TrainerOptions};

#[test]
fn the_plan_counts_the_parameters_each_pipeline_rank_holds() {
    let heads: [&[&str]; 4] = [
        &[],
        &["model.tie_embeddings=false"],
        &["mtp.depth=1"],
        &["mtp.depth=1", "model.tie_embeddings=false"],
    ];
    let layouts = [
        (2, "1f1b", 1),
        (2, "interleaved", 1),
        (2, "dualpipev", 1),
        (4, "dualpipe", 1),
        (2, "1f1b", 2),
    ];
    for head in heads {
        for (pp, schedule, ep) in layouts {
            let vpp = if schedule == "interleaved" { 2 } else { 1 };
            let mut sets: Vec<String> = head.iter().map(|s| s.to_string()).collect();
            sets.extend([
                format!("parallel.pp={pp}"),
                format!("parallel.ep={ep}"),
                format!("parallel.vpp={vpp}"),
                format!("parallel.schedule=\"{schedule}\""),
                "parallel.microbatches=8".to_string(),
                "train.global_batch=16".to_string(),
            ]);
            let raw = RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &sets).unwrap();
            let plan = Plan::resolve(&raw, Some(pp * ep)).unwrap();
            let planned: Vec<f64> = plan_memory(&plan, None)
                .ranks
                .iter()
                .map(|r| r.params.total())
                .collect();
            let held = run_thread_ranks(pp * ep, |world| -> Result<_, Error> {
                let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
                let pp_rank = t.parallel().unwrap().coords().pp;
                Ok((pp_rank, t.pipeline().unwrap().param_elements()))
            })
            .unwrap();
            let label = format!("{head:?} pp{pp} {schedule} ep{ep}");
            assert_eq!(planned.len(), pp, "{label}");
            for (pp_rank, n) in held {
                assert_eq!(
                    planned[pp_rank], n as f64,
                    "{label}: pp rank {pp_rank} holds {n} parameter elements, the plan says {}",
                    planned[pp_rank]
                );
            }
        }
    }
}

/// What one rank of a pipeline mesh holds.
struct Held {
    pp: usize,
    dp: usize,
    ep: usize,
    tp: usize,
    /// Its stage parameters: (name, dims).
    params: Vec<(String, Vec<usize>)>,
    /// Elements of its optimizer state.
    state: u64,
}

impl Held {
    fn elements(&self) -> u64 {
        let each = self.params.iter().map(|(_, d)| d.iter().product::<usize>());
        each.sum::<usize>() as u64
    }
}

/// The plan of `mesh` (the pipeline model with `optim` and `extra` sets) against what each
/// of its ranks holds:
/// - without `fsdp = 3` every rank holds its pp rank's planned parameter count, and the
///   parameters bucket is those elements' f32 bytes;
/// - with `fsdp = 3` the data ranks of a stage (same tp rank) hold rows adding up to it;
/// - every `[fsdp shards]` row the rank holds has the table's row width and rows (with
///   `fsdp = 3` the rank's `chunk` of them in its data group);
/// - the optimizer bucket is the rank's optimizer state in f32 bytes (with fsdp the data
///   ranks' rows add up to the bucket × the group size).
fn check_plan(mesh: Mesh, optim: &str, extra: &[&str]) {
    let label = format!("{} {optim} {extra:?}", mesh.label());
    let mut sets = pipeline_sets(optim);
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets.extend(mesh.sets());
    let raw = pipeline_raw(&sets);
    let plan = Plan::resolve(&raw, Some(mesh.world())).unwrap();
    let memory = plan_memory(&plan, None);
    let table = fsdp_shard_table(&plan);
    let ranks = run_thread_ranks(mesh.world(), |world| -> Result<_, Error> {
        let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        let c = t.parallel().unwrap().coords();
        let p = t.pipeline().unwrap();
        Ok(Held {
            pp: c.pp,
            dp: c.dp,
            ep: c.ep,
            tp: c.tp,
            params: p.param_shapes(),
            state: p.optimizer_state_elements(),
        })
    })
    .unwrap();
    let gib = (1u64 << 30) as f64;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    let (rows_only, sharded) = (mesh.fsdp == 3, mesh.fsdp > 0);
    let group = mesh.dp * mesh.ep;
    assert_eq!(memory.ranks.len(), mesh.pp, "{label}");
    for h in &ranks {
        let planned = &memory.ranks[h.pp];
        let at = format!("{label}: pp {} dp {} ep {} tp {}", h.pp, h.dp, h.ep, h.tp);
        let held = h.elements() as f64;
        if !rows_only {
            assert_eq!(planned.params.total(), held, "{at}: parameter elements");
            let bytes = planned.breakdown.params_gb * gib;
            assert!(close(bytes, 4.0 * held), "{at}: {bytes} B vs {held} f32");
        }
        for row in &table {
            for (name, dims) in h.params.iter().filter(|(n, _)| matches(&row.name, n)) {
                let rank = if row.group == group {
                    h.dp * mesh.ep + h.ep
                } else {
                    h.dp
                };
                let rows = if rows_only {
                    chunk(row.rows, row.group, rank).len
                } else {
                    row.rows
                };
                let width: usize = dims[1..].iter().product();
                assert_eq!(
                    (dims[0], width),
                    (rows, row.row_elems),
                    "{at}: {name} is {dims:?}, the table row {row:?}"
                );
            }
        }
    }
    for pp in 0..mesh.pp {
        for tp in 0..mesh.tp {
            let stage: Vec<&Held> = ranks.iter().filter(|h| h.pp == pp && h.tp == tp).collect();
            let at = format!("{label}: pp {pp} tp {tp}");
            let planned = &memory.ranks[pp];
            let optimizer = planned.breakdown.optimizer_gb * gib;
            if sharded {
                let rows: u64 = stage.iter().map(|h| h.elements()).sum();
                let whole = planned.params.total() * if rows_only { 1.0 } else { group as f64 };
                assert_eq!(rows as f64, whole, "{at}: the data ranks' parameters");
                let state: u64 = stage.iter().map(|h| h.state).sum();
                let want = optimizer * group as f64;
                assert!(
                    close(4.0 * state as f64, want),
                    "{at}: state {state} vs {want} B"
                );
            } else {
                for h in &stage {
                    let got = 4.0 * h.state as f64;
                    assert!(
                        close(got, optimizer),
                        "{at}: state {got} B vs {optimizer} B"
                    );
                }
            }
        }
    }
}

#[test]
fn the_plan_counts_what_pp_tp_ranks_hold() {
    let tp = |schedule| Mesh::pp(2, 1, 1, schedule, 0).with_tp(2);
    for optim in ["adamw", "muon"] {
        check_plan(tp("1f1b"), optim, &[]);
        check_plan(
            tp("dualpipev"),
            optim,
            &["model.tie_embeddings=true", "mtp.depth=1"],
        );
    }
    check_plan(Mesh::pp(2, 1, 2, "1f1b", 0).with_tp(2), "adamw", &[]);
    // Vector GateSkip gates are square matrices stepped by AdamW (gates), routers by Muon.
    let gates = ["gateskip.enabled=true", "gateskip.gate=\"vector\""];
    check_plan(tp("1f1b"), "muon", &gates);
}

#[test]
fn the_plan_counts_what_pp_fsdp_ranks_hold() {
    for optim in ["adamw", "muon"] {
        for fsdp in [1, 2, 3] {
            check_plan(Mesh::pp(2, 2, 1, "1f1b", fsdp), optim, &[]);
        }
        check_plan(
            Mesh::pp(2, 2, 1, "dualpipev", 3),
            optim,
            &["model.tie_embeddings=true", "mtp.depth=1"],
        );
        check_plan(Mesh::pp(2, 2, 1, "1f1b", 3).with_tp(2), optim, &[]);
    }
}
