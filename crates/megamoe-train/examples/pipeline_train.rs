//! Trains a small MoE (configs/tiny.toml with 8 layers) for a few steps on pipeline ranks
//! (threads) under every schedule, prints each step's loss next to one rank's, and each
//! rank's measured busy / idle time of the last step next to the simulator's prediction
//! under the costs measured in that step.
//!
//! `cargo run --release -p megamoe-train --example pipeline_train -- 3`
//! (steps; default 2). Ends in an assert: every layout's losses within 1e-5 of one rank's.

use std::sync::Arc;

use megamoe_comm::ThreadWorld;
use megamoe_pipeline::executor::{compare, measured_costs};
use megamoe_pipeline::simulate;
use megamoe_plan::{Plan, RawConfig, TINY_CONFIG};
use megamoe_train::distributed::PipelineRank;
use megamoe_train::{BatchConfig, Batcher, DataSource, Tokenizer, Trainer, TrainerOptions};

const SETS: [&str; 5] = [
    "model.n_layers=8",
    "model.seq_len=32",
    "train.global_batch=8",
    "parallel.microbatches=8",
    "optim.warmup_steps=1",
];

const LAYOUTS: [(usize, &str, usize); 8] = [
    (2, "gpipe", 1),
    (2, "1f1b", 1),
    (2, "interleaved", 2),
    (2, "zb-h1", 1),
    (2, "zbv", 1),
    (2, "dualpipev", 1),
    (4, "dualpipe", 1),
    (4, "dualpipev", 1),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("steps {a:?}: {e}"))?,
        None => 2,
    };
    let mut sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    sets.push(format!("train.steps={steps}"));
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));

    let raw = RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &sets)?;
    let mut one = Trainer::new(&raw, data.clone(), TrainerOptions::default())?;
    let reference: Vec<f64> = (0..steps)
        .map(|_| one.step().map(|m| m.loss.total))
        .collect::<Result<_, _>>()?;
    println!("1 rank: losses {reference:.6?}");

    for (pp, schedule, vpp) in LAYOUTS {
        let mut layout = sets.clone();
        layout.extend([
            format!("parallel.pp={pp}"),
            format!("parallel.schedule=\"{schedule}\""),
            format!("parallel.vpp={vpp}"),
        ]);
        let plan = Plan::resolve(
            &RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &layout)?,
            Some(pp),
        )?;
        let ranks = ThreadWorld::new(pp)?.run(|comm| -> megamoe_train::Result<_> {
            let mut rank = PipelineRank::new(&plan, &comm)?;
            let mut batcher = Batcher::new(
                data.clone(),
                BatchConfig {
                    batch_size: plan.batch.global_batch,
                    seq_len: plan.model.seq_len,
                    seed: plan.train.seed,
                },
            )?;
            let mut losses = Vec::new();
            let mut timing = None;
            for _ in 0..steps {
                let out = rank.step(&comm, &batcher.next_batch()?)?;
                losses.push(out.loss.total);
                timing = Some(out.timing);
            }
            Ok((losses, timing, rank.schedule().clone()))
        })?;
        let losses = &ranks[0].0;
        let worst = losses
            .iter()
            .zip(&reference)
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0.0, f64::max);
        println!("pp{pp} {schedule}: losses {losses:.6?}, max rel diff to 1 rank {worst:.1e}");
        assert!(worst <= 1e-5, "pp{pp} {schedule} departs from one rank");
        let timings: Vec<_> = ranks.iter().filter_map(|r| r.1.clone()).collect();
        let sim = simulate(&ranks[0].2, &measured_costs(&timings))?;
        for row in compare(&timings, &sim) {
            println!(
                "    rank {}: busy {:.1} ms, idle {:.1} ms ({:.0} %), simulated idle {:.0} %",
                row.rank,
                row.busy_s * 1e3,
                row.idle_s * 1e3,
                row.idle_fraction * 100.0,
                row.predicted_idle_fraction * 100.0
            );
        }
    }
    Ok(())
}
