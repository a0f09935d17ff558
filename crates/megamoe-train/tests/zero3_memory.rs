//! `parallel.fsdp = 3` (ZeRO-3) keeps only each rank's rows of the parameters between
//! steps. Measured with the process-wide live-bytes counter after two steps, all ranks
//! together, against `parallel.fsdp = 2` (same gradients and optimizer state, but full
//! parameters on every rank): the difference is the full parameters of every rank, and
//! a rank's parameters add up to about 1/dp of the model. The same inside pipeline stages
//! (dp2 × pp2, 1F1B and ZB-H1): the difference is every rank's full stage parameters,
//! and the two data ranks of a stage hold its rows. One test in its own binary: the counter
//! is process-wide, and parallel tests would share it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{DataSource, Error, Tokenizer, Trainer, TrainerOptions};

const CONFIG: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
seq_len = 8

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
first_dense_layers = 1

[train]
global_batch = 8
steps = 4
seed = 7

[optim]
warmup_steps = 2
"#;

/// Runs `sets` on `world` thread ranks for two steps: (live bytes of every rank together
/// after them, `f` of each rank's trainer).
fn after_two_steps_of<T: Send>(
    world: usize,
    sets: &[String],
    f: impl Fn(&Trainer) -> T + Sync,
) -> (u64, Vec<T>) {
    let raw = RawConfig::from_toml_str_with_overrides(CONFIG, sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let out = run_thread_ranks(world, |comm| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data.clone(), TrainerOptions::default(), comm)?;
        t.step()?;
        t.step()?;
        let comm = t.parallel().map(|p| p.world()).unwrap();
        comm.barrier()?;
        let live = megamoe_tensor::live_bytes();
        comm.barrier()?;
        Ok((live, f(&t)))
    })
    .unwrap();
    let live = out[0].0;
    (live, out.into_iter().map(|o| o.1).collect())
}

/// (live bytes of every rank together after two steps, each rank's parameter elements,
/// the model's parameter elements).
fn after_two_steps(dp: usize, fsdp: usize) -> (u64, Vec<u64>, u64) {
    let sets = [
        format!("parallel.dp={dp}"),
        format!("parallel.fsdp={fsdp}"),
        "parallel.microbatches=1".to_string(),
    ];
    let (live, out) = after_two_steps_of(dp, &sets, |t| {
        (t.params().numel() as u64, t.counts().params)
    });
    (live, out.iter().map(|o| o.0).collect(), out[0].1)
}

/// Under dp2 × pp2 with `schedule`: (live bytes of every rank together after two steps,
/// each rank's (pp rank, stage parameter elements)).
fn pipeline_after_two_steps(schedule: &str, fsdp: usize) -> (u64, Vec<(usize, u64)>) {
    let sets = [
        "parallel.dp=2".to_string(),
        "parallel.pp=2".to_string(),
        format!("parallel.fsdp={fsdp}"),
        format!("parallel.schedule=\"{schedule}\""),
        "parallel.microbatches=4".to_string(),
    ];
    after_two_steps_of(4, &sets, |t| {
        let pp = t.parallel().unwrap().coords().pp;
        (pp, t.pipeline().unwrap().param_elements())
    })
}

fn pipeline_ranks_hold_their_rows(schedule: &str) {
    let (sharded_state, stages) = pipeline_after_two_steps(schedule, 2);
    let (rows_only, rows) = pipeline_after_two_steps(schedule, 3);
    // fsdp 2: every rank holds its stages' full f32 parameters (and its rows of them as the
    // optimizer's copy); fsdp 3 only the rows.
    let full: u64 = stages.iter().map(|s| 4 * s.1).sum();
    let freed = sharded_state - rows_only;
    eprintln!(
        "dp2 pp2 {schedule}: live bytes fsdp2 {sharded_state}, fsdp3 {rows_only}, freed \
         {freed} (every rank's full stage parameters: {full}); stage parameters {stages:?}, \
         rows {rows:?}"
    );
    assert!(
        freed * 100 >= full * 95 && freed * 100 <= full * 110,
        "dp2 pp2 {schedule}: fsdp2 {sharded_state} B, fsdp3 {rows_only} B, freed {freed} B, \
         full stage parameters of every rank {full} B"
    );
    for pp in 0..2 {
        let of = |list: &[(usize, u64)]| -> Vec<u64> {
            list.iter().filter(|s| s.0 == pp).map(|s| s.1).collect()
        };
        let (whole, mine) = (of(&stages), of(&rows));
        assert_eq!(
            whole[0], whole[1],
            "pp {pp}: both data ranks hold the stage"
        );
        assert_eq!(
            mine.iter().sum::<u64>(),
            whole[0],
            "pp {pp}: the rows tile the stage"
        );
        assert!(
            mine.iter().all(|&n| n * 10 <= whole[0] * 6),
            "pp {pp}: {mine:?}"
        );
    }
}

#[test]
fn fsdp3_ranks_hold_their_rows_of_the_parameters_between_steps() {
    for schedule in ["1f1b", "zb-h1"] {
        pipeline_ranks_hold_their_rows(schedule);
    }
    for dp in [2, 4] {
        let (sharded_state, _, params) = after_two_steps(dp, 2);
        let (rows_only, rows, _) = after_two_steps(dp, 3);
        // Every rank's full f32 parameters are gone (padding rows of the gathers aside).
        let full = dp as u64 * 4 * params;
        let freed = sharded_state - rows_only;
        eprintln!(
            "dp{dp}: live bytes fsdp2 {sharded_state}, fsdp3 {rows_only}, freed {freed} \
             (every rank's full parameters: {full}); parameters per rank {rows:?} of {params}"
        );
        assert!(
            freed * 100 >= full * 95 && freed * 100 <= full * 110,
            "dp{dp}: fsdp2 {sharded_state} B, fsdp3 {rows_only} B, freed {freed} B, \
             full parameters of every rank {full} B"
        );
        // What a rank keeps: its chunk of every parameter, about 1/dp of the model.
        assert_eq!(rows.iter().sum::<u64>(), params, "the rows tile the model");
        for (r, &n) in rows.iter().enumerate() {
            assert!(
                n * dp as u64 * 10 >= params * 8 && n * dp as u64 * 10 <= params * 12,
                "dp{dp} rank {r}: {n} of {params} parameters"
            );
        }
    }
}
