//! `parallel.fsdp = 3` (ZeRO-3) keeps only each rank's rows of the parameters between
//! steps. Measured with the process-wide live-bytes counter after two steps, all ranks
//! together, against `parallel.fsdp = 2` (same gradients and optimizer state, but full
//! parameters on every rank): the difference is the full parameters of every rank, and
//! a rank's parameters add up to about 1/dp of the model. One test in its own binary:
//! the counter is process-wide, and parallel tests would share it.
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

/// (live bytes of every rank together after two steps, each rank's parameter elements,
/// the model's parameter elements).
fn after_two_steps(dp: usize, fsdp: usize) -> (u64, Vec<u64>, u64) {
    let sets = vec![
        format!("parallel.dp={dp}"),
        format!("parallel.fsdp={fsdp}"),
        "parallel.microbatches=1".to_string(),
    ];
    let raw = RawConfig::from_toml_str_with_overrides(CONFIG, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let out = run_thread_ranks(dp, |world| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data.clone(), TrainerOptions::default(), world)?;
        t.step()?;
        t.step()?;
        let comm = t.parallel().map(|p| p.world()).unwrap();
        comm.barrier()?;
        let live = megamoe_tensor::live_bytes();
        comm.barrier()?;
        Ok((live, t.params().numel() as u64, t.counts().params))
    })
    .unwrap();
    let rows = out.iter().map(|o| o.1).collect();
    (out[0].0, rows, out[0].2)
}

#[test]
fn fsdp3_ranks_hold_their_rows_of_the_parameters_between_steps() {
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
