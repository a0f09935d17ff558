//! Stage-only memory: a pipeline rank builds and keeps only its stages' parameters and
//! their optimizer state, never the whole model. For 1F1B (one model stage per rank) and
//! DualPipeV (rank r holds model stages r and 2pp−1−r) on pp2 and pp4:
//! - each rank's parameters are exactly the tensors of its model stages, counted here
//!   from a one-rank model by name (layers of the stage's slice; the embedding on the
//!   input stage and, when the head reads it, on the head stage; norm, LM head and MTP
//!   on the head stage);
//! - the trainer's whole-model parameter set is empty;
//! - the live bytes of all ranks together after two AdamW steps are their parameters
//!   plus two moments each (12 bytes per parameter element, within 10 %), and less than
//!   one rank training the whole model (parameters, gradients, moments: 16 bytes per
//!   element) — a whole-model replica per rank would be ≥ pp times that.
//!
//! One test in its own binary: the live-bytes counter is process-wide.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use megamoe_model::ChunkSpec;
use megamoe_plan::{RawConfig, ScheduleKind, StageMap};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{DataSource, Error, Tokenizer, Trainer, TrainerOptions};

const CONFIG: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 8
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
seq_len = 8
tie_embeddings = true

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
first_dense_layers = 1

[mtp]
depth = 1

[train]
global_batch = 8
steps = 4
seed = 7

[optim]
warmup_steps = 2
"#;

fn raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(CONFIG, sets).unwrap()
}

fn data() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

/// Every parameter of the one-rank model: name → elements.
fn one_rank_params() -> BTreeMap<String, u64> {
    let t = Trainer::new(&raw(&[]), data(), TrainerOptions::default()).unwrap();
    let mut out = BTreeMap::new();
    t.params().visit(&mut |n, x, _| {
        out.insert(n.to_string(), x.numel() as u64);
    });
    out
}

/// Live bytes of one rank after two steps (parameters, flat gradients, AdamW moments).
fn one_rank_live_bytes() -> u64 {
    let mut t = Trainer::new(&raw(&[]), data(), TrainerOptions::default()).unwrap();
    t.step().unwrap();
    t.step().unwrap();
    megamoe_tensor::live_bytes()
}

/// The elements pipeline rank `rank` must hold: the tensors of its model stages.
fn expected_elements(
    params: &BTreeMap<String, u64>,
    map: &StageMap,
    rank: usize,
    n_layers: usize,
) -> u64 {
    let specs = ChunkSpec::even(n_layers, map.model_stages()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for s in map.stages_of(rank) {
        let spec = &specs[map.model_stage(s).unwrap()];
        for (name, _) in params.iter() {
            let layer = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let held = match layer {
                Some(l) => spec.layers.contains(&l),
                // tied head and MTP read the embedding on the head stage
                None if name == "model.embed_tokens.weight" => spec.embed || spec.head,
                None => spec.head, // final norm, MTP
            };
            if held {
                names.insert(name.clone());
            }
        }
    }
    names.iter().map(|n| params[n]).sum()
}

/// (each rank's parameter elements, live bytes of all ranks after two steps).
fn pipeline_run(pp: usize, schedule: &str) -> (Vec<u64>, u64) {
    let sets = vec![
        format!("parallel.pp={pp}"),
        format!("parallel.schedule=\"{schedule}\""),
        "parallel.microbatches=8".to_string(),
    ];
    let raw = raw(&sets);
    let out = run_thread_ranks(pp, |world| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        assert_eq!(
            t.params().numel(),
            0,
            "no whole-model parameter set on a pp rank"
        );
        t.step()?;
        t.step()?;
        let comm = t.parallel().map(|p| p.world()).unwrap();
        comm.barrier()?;
        let live = megamoe_tensor::live_bytes();
        comm.barrier()?;
        Ok((t.pipeline().unwrap().param_elements(), live))
    })
    .unwrap();
    (out.iter().map(|o| o.0).collect(), out[0].1)
}

#[test]
fn pipeline_ranks_hold_only_their_stages() {
    let params = one_rank_params();
    let model: u64 = params.values().sum();
    let single = one_rank_live_bytes();
    eprintln!("one rank: {model} parameter elements, live bytes {single}");
    for (pp, schedule, kind) in [
        (2, "1f1b", ScheduleKind::OneFOneB),
        (4, "1f1b", ScheduleKind::OneFOneB),
        (2, "dualpipev", ScheduleKind::DualPipeV),
        (4, "dualpipev", ScheduleKind::DualPipeV),
    ] {
        let (per_rank, live) = pipeline_run(pp, schedule);
        let map = StageMap::for_schedule(kind, pp, 1);
        let want: Vec<u64> = (0..pp)
            .map(|r| expected_elements(&params, &map, r, 8))
            .collect();
        let held: u64 = per_rank.iter().sum();
        eprintln!(
            "pp{pp} {schedule}: elements per rank {per_rank:?} (stages {want:?}) of {model}; \
             live bytes {live} ({:.2} per element held; one rank {single})",
            live as f64 / held as f64
        );
        assert_eq!(
            per_rank, want,
            "pp{pp} {schedule}: each rank holds its stages"
        );
        // The tied embedding is on the input and the head stage: the only tensor twice.
        let embed = params["model.embed_tokens.weight"];
        let twice = if map.rank(0) == map.rank(map.stages() - 1) {
            0
        } else {
            embed
        };
        assert_eq!(
            held,
            model + twice,
            "pp{pp} {schedule}: the stages tile the model"
        );
        let state = 12 * held;
        assert!(
            live * 10 >= state * 9 && live * 10 <= state * 11,
            "pp{pp} {schedule}: live {live} B vs parameters + moments {state} B"
        );
        assert!(
            live < single,
            "pp{pp} {schedule}: {live} B, one rank {single} B"
        );
    }
}
