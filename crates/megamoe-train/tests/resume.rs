//! End-to-end use of the training infrastructure with a stand-in model (a bigram
//! logit table trained by SGD with momentum): data → steps → metrics → checkpoints →
//! resume → report. The real trainer follows the same sequence of calls.

// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use megamoe_train::checkpoint::checkpoint_dir_name;
use megamoe_train::metrics::{latest_steps, GoodputRecord};
use megamoe_train::{
    load_checkpoint, read_metrics, render_report, save_checkpoint, BatchConfig, Batcher,
    DataSource, Expected, GoodputTracker, LossParts, MetricsRecord, MetricsWriter, NamedTensor,
    Progress, RunDir, StepMetrics, TimeCategory, Tokenizer, TrainState,
};

const V: usize = 256;
const CONFIG: &str = "[train]\nbatch_size = 4\nseq_len = 32\nseed = 5\nlr = 10.0\n";
const BATCH: BatchConfig = BatchConfig {
    batch_size: 4,
    seq_len: 32,
    seed: 5,
};

/// Bigram model: logits of the next token = W[current token], W (V, V).
struct Bigram {
    w: Vec<f32>,
    momentum: Vec<f32>,
}

impl Bigram {
    /// Mean cross-entropy of the batch; applies one SGD-with-momentum update.
    fn step(&mut self, inputs: &[i32], targets: &[i32], lr: f32) -> f64 {
        let n = inputs.len() as f32;
        let mut grad = vec![0f32; V * V];
        let mut loss = 0f64;
        for (&x, &y) in inputs.iter().zip(targets) {
            let row = &self.w[x as usize * V..(x as usize + 1) * V];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            loss -= f64::from((exp[y as usize] / sum).ln());
            let g = &mut grad[x as usize * V..(x as usize + 1) * V];
            for (j, e) in exp.iter().enumerate() {
                g[j] += (e / sum - if j == y as usize { 1.0 } else { 0.0 }) / n;
            }
        }
        for ((w, m), g) in self.w.iter_mut().zip(&mut self.momentum).zip(&grad) {
            *m = 0.9 * *m + g;
            *w -= lr * *m;
        }
        loss / f64::from(n)
    }
}

/// Trains until `stop_at` (resuming from the run's latest checkpoint if `resume`),
/// checkpointing every 5 steps. Returns (step, loss) of the steps run here.
fn train(run_dir: &Path, stop_at: u64, resume: bool) -> Vec<(u64, f64)> {
    let run = RunDir::create(run_dir).unwrap();
    let source = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let mut batcher = Batcher::new(source.clone(), BATCH).unwrap();
    let mut model = Bigram {
        w: vec![0.0; V * V],
        momentum: vec![0.0; V * V],
    };
    let mut start = 0;
    let mut goodput = GoodputTracker::new();
    if resume {
        let specs = [NamedTensor::new("bigram.weight", vec![V, V], vec![]).spec()];
        let opt_specs =
            [NamedTensor::new("momentum_buffer.bigram.weight", vec![V, V], vec![]).spec()];
        let ckpt = load_checkpoint(
            run.path(),
            &Expected {
                config_toml: Some(CONFIG),
                model: Some(&specs),
                optimizer: Some(&opt_specs),
            },
        )
        .unwrap();
        batcher.seek(&ckpt.state.data).unwrap();
        model.w = ckpt.model[0].data.clone();
        model.momentum = ckpt.optimizer[0].data.clone();
        start = ckpt.state.step;
        goodput = GoodputTracker::resume(ckpt.state.goodput);
    } else {
        run.write_config(CONFIG).unwrap();
    }
    let mut metrics = MetricsWriter::open(&run.metrics_path()).unwrap();
    let mut progress = Progress::hidden(start, stop_at);
    let mut losses = Vec::new();
    for step in start + 1..=stop_at {
        let batch = goodput
            .time(TimeCategory::Data, || batcher.next_batch())
            .unwrap();
        let t0 = std::time::Instant::now();
        let loss = model.step(&batch.inputs, &batch.targets, 10.0);
        let step_time = t0.elapsed();
        goodput.record(TimeCategory::Step, step_time);
        let m = StepMetrics {
            step,
            loss: LossParts {
                total: loss,
                lm: loss,
                ..Default::default()
            },
            lr: 10.0,
            tokens: batch.num_tokens() as u64,
            step_time_s: step_time.as_secs_f64(),
            ..Default::default()
        };
        metrics.write(&MetricsRecord::Step(m.clone())).unwrap();
        progress.step(&m);
        losses.push((step, loss));
        if step.is_multiple_of(5) {
            let t0 = std::time::Instant::now();
            let state = TrainState {
                step,
                rng: vec![],
                optimizer_steps: step,
                data: batcher.position(),
                config_toml: CONFIG.to_string(),
                goodput: goodput.totals(),
                extra: Default::default(),
            };
            let weights = [NamedTensor::new(
                "bigram.weight",
                vec![V, V],
                model.w.clone(),
            )];
            let moments = [NamedTensor::new(
                "momentum_buffer.bigram.weight",
                vec![V, V],
                model.momentum.clone(),
            )];
            save_checkpoint(&run.checkpoints_dir(), &state, &weights, &moments).unwrap();
            goodput.record(TimeCategory::Checkpoint, t0.elapsed());
        }
    }
    let totals = goodput.totals();
    metrics
        .write(&MetricsRecord::Goodput(GoodputRecord {
            step: stop_at,
            totals,
        }))
        .unwrap();
    progress.finish();
    losses
}

fn temp_run(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("megamoe-train-it-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses_bit_for_bit() {
    let straight_dir = temp_run("straight");
    let straight = train(&straight_dir, 20, false);
    // Loss falls from ln(256) well below it (a bigram fits the synthetic corpus).
    assert!(
        (straight[0].1 - (V as f64).ln()).abs() < 1e-4,
        "{:?}",
        straight[0]
    );
    assert!(straight[19].1 < 0.8 * straight[0].1, "{straight:?}");

    let split_dir = temp_run("split");
    // The first process stops at 12: checkpoint at 10, steps 11-12 logged and lost.
    train(&split_dir, 12, false);
    // A save of step 15 crashed half-way, leaving only its temp directory.
    let ckpts = split_dir.join("checkpoints");
    std::fs::create_dir(ckpts.join(format!("{}.tmp", checkpoint_dir_name(15)))).unwrap();
    let resumed = train(&split_dir, 20, true);
    assert_eq!(resumed.first().map(|r| r.0), Some(11));
    assert_eq!(resumed, straight[10..], "losses after resume differ");

    // The log holds steps 11-12 twice; readers keep the later records.
    let records = read_metrics(&split_dir.join("metrics.jsonl")).unwrap();
    let steps = latest_steps(&records);
    assert_eq!(steps.len(), 20);
    let logged: Vec<f64> = steps.iter().map(|s| s.loss.total).collect();
    let want: Vec<f64> = straight.iter().map(|s| s.1).collect();
    assert_eq!(logged, want);

    let summary = render_report(&split_dir).unwrap();
    assert_eq!(summary.steps, 20);
    assert_eq!(summary.last_loss, straight[19]);
    assert!(split_dir.join("report").join("loss.svg").is_file());
    assert!(summary.goodput.unwrap().wall_s > 0.0);

    for d in [straight_dir, split_dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
