//! The planner describes what the trainer holds: under tensor (and expert) parallelism the
//! per-rank parameter count of `megamoe plan`'s memory model (`plan_memory`, the
//! `[memory]` parameters bucket) equals the elements of the parameters each rank of the
//! distributed trainer really holds, and every row of the `[fsdp shards]` table
//! (`fsdp_shard_table`) has the rows and row width of the trainer's tensor of that name.
//! Checked on the layout tests' tiny MoE model (4 query heads over 2 KV heads) under tp2
//! and tp2×ep2, plain and with an untied head, vector GateSkip gates, FlexiDepth and MTP
//! (matrices the trainer keeps whole on every TP rank), and at one rank.
#![allow(clippy::unwrap_used)]

use megamoe_plan::{fsdp_shard_table, plan_memory, Plan, RawConfig};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{Error, Trainer, TrainerOptions};

#[path = "common/layout.rs"]
mod layout;

use layout::{data, matches, BASE};

/// One rank's parameters: (name, dims).
type Held = Vec<(String, Vec<usize>)>;

/// Extra features whose matrices are not split over TP.
const FEATURES: &str = "\n[gateskip]\ngate = \"vector\"\nbudget_start = 0.34\nbudget_end = 0.34\n\
    budget_warmup_steps = 0\n[flexidepth]\nadaptive_layers = 1\nreduction = 2\n\
    [mtp]\ndepth = 1\nloss_weight = 0.5\n";

fn raw(features: bool, sets: &[String]) -> RawConfig {
    let mut all = vec![
        "model.n_heads=4".to_string(),
        "model.n_kv_heads=2".to_string(),
    ];
    if features {
        all.push("model.tie_embeddings=false".to_string());
    }
    all.extend_from_slice(sets);
    let toml = if features {
        format!("{BASE}{FEATURES}")
    } else {
        BASE.to_string()
    };
    RawConfig::from_toml_str_with_overrides(&toml, &all).unwrap()
}

/// Every rank's parameters (name, dims) under `tp` × `ep`, and the plan of that layout.
fn layout(features: bool, tp: usize, ep: usize) -> (Plan, Vec<Held>) {
    let raw = raw(
        features,
        &[format!("parallel.tp={tp}"), format!("parallel.ep={ep}")],
    );
    let plan = Plan::resolve(&raw, Some(tp * ep)).unwrap();
    let ranks = run_thread_ranks(tp * ep, |world| -> Result<_, Error> {
        let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        let mut held = Vec::new();
        t.params()
            .visit(&mut |n, p, _| held.push((n.to_string(), p.dims().to_vec())));
        Ok(held)
    })
    .unwrap();
    (plan, ranks)
}

fn check(features: bool, tp: usize, ep: usize) {
    let label = format!("tp{tp} ep{ep} features {features}");
    let (plan, ranks) = layout(features, tp, ep);
    let memory = plan_memory(&plan, None);
    let planned = memory.ranks[0].params.total();
    let planned_bytes = memory.ranks[0].breakdown.params_gb * (1u64 << 30) as f64;
    let table = fsdp_shard_table(&plan);
    assert!(table.len() >= 6, "{label}: {table:?}");
    for (rank, params) in ranks.iter().enumerate() {
        let held: usize = params
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        assert_eq!(
            planned, held as f64,
            "{label}: rank {rank} holds {held} parameter elements, the plan says {planned}"
        );
        // f32 parameters: 4 bytes each (the bucket is in GiB).
        let rel = (planned_bytes - 4.0 * held as f64).abs() / (4.0 * held as f64);
        assert!(
            rel < 1e-12,
            "{label}: rank {rank}: parameters bucket {planned_bytes} B vs {} B",
            4 * held
        );
        for row in &table {
            let found: Vec<&Vec<usize>> = params
                .iter()
                .filter(|(n, _)| matches(&row.name, n))
                .map(|(_, d)| d)
                .collect();
            assert!(
                !found.is_empty(),
                "{label}: rank {rank}: no parameter {}",
                row.name
            );
            for dims in found {
                let width: usize = dims[1..].iter().product();
                assert_eq!(
                    (row.rows, row.row_elems),
                    (dims[0], width),
                    "{label}: rank {rank}: {} is {dims:?} in the trainer",
                    row.name
                );
            }
        }
    }
}

#[test]
fn the_plan_counts_the_parameters_a_tp_rank_holds() {
    check(false, 2, 1);
    check(true, 2, 1);
}

#[test]
fn the_plan_counts_the_parameters_a_tp_ep_rank_holds() {
    check(false, 2, 2);
}

#[test]
fn the_plan_counts_one_rank_s_parameters() {
    check(true, 1, 1);
}

#[test]
fn the_pattern_matcher_needs_a_layer_index() {
    assert!(matches(
        "model.layers.{i}.mlp.router.weight",
        "model.layers.12.mlp.router.weight"
    ));
    assert!(!matches(
        "model.layers.{i}.mlp.router.weight",
        "model.layers..mlp.router.weight"
    ));
    assert!(!matches(
        "model.layers.{i}.mlp.up_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight"
    ));
    assert!(matches("lm_head.weight", "lm_head.weight"));
}
