//! The planner describes what a pipeline rank holds: for each pipeline rank, the
//! parameter count of `megamoe plan`'s memory model (`plan_memory`, per pp rank) equals
//! the parameter elements the rank's stages really hold (`PipelineRank::param_elements`)
//! — under a linear (1F1B), looped (interleaved), V (DualPipeV) and mirrored (DualPipe)
//! stage map, with expert parallelism, with a tied or untied head, with and without MTP
//! (the head stage holds a copy of the embedding when the tied head or MTP reads it and
//! the embedding lives on another rank).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::{plan_memory, Plan, RawConfig, TINY_CONFIG};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{DataSource, Error, Tokenizer, Trainer, TrainerOptions};

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
            let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
            let held = run_thread_ranks(pp * ep, |world| -> Result<_, Error> {
                let t = Trainer::new_rank(&raw, data.clone(), TrainerOptions::default(), world)?;
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
