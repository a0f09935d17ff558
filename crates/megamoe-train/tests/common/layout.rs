//! The models, layouts and one-rank reference runs shared by the layout-invariance tests:
//! - the tiny MoE model of `layouts.rs` and `layouts_tp.rs` (`BASE`: a dense layer and an
//!   MoE layer with a gated shared expert, aux and z losses and the expert bias);
//! - the 4-layer pipeline model of `pipeline_fsdp.rs`, `pipeline_tp.rs` and
//!   `pipeline_zero3.rs` ([`pipeline_sets`]), its layouts ([`Mesh`]), the comparison of a
//!   layout's curve with one rank's ([`assert_matches_one_rank`]) and the checkpoint round
//!   trip between a layout and one rank ([`resume_both_ways`]).
//!
//! Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use megamoe_plan::{RawConfig, TINY_CONFIG};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{DataSource, Error, StepMetrics, Tokenizer, Trainer, TrainerOptions};

pub const STEPS: usize = 10;

pub const BASE: &str = include_str!("../fixtures/layout_moe.toml");

pub fn data() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

/// (loss, grad norm) per step.
pub fn curve(metrics: &[StepMetrics]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .map(|m| (m.loss.total, m.grad_norm))
        .collect()
}

/// One rank running all `micro` micro-batches per step, on the config `raw` builds.
pub fn one_rank(raw: fn(&[String]) -> RawConfig, sets: &[String], micro: usize) -> Vec<(f64, f64)> {
    let mut sets = sets.to_vec();
    sets.push(format!("parallel.microbatches={micro}"));
    let mut t = Trainer::new(&raw(&sets), data(), TrainerOptions::default()).unwrap();
    let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step().unwrap()).collect();
    assert!(m.iter().all(|m| !m.skipped && m.loss.total.is_finite()));
    curve(&m)
}

/// Every rank's curve under `parallel.dp = dp, parallel.ep = ep` with `micro` micro-batches
/// per data rank, on the config `raw` builds.
pub fn ranks(
    raw: fn(&[String]) -> RawConfig,
    sets: &[String],
    (dp, ep): (usize, usize),
    micro: usize,
) -> Vec<Vec<(f64, f64)>> {
    let mut sets = sets.to_vec();
    sets.extend([
        format!("parallel.dp={dp}"),
        format!("parallel.ep={ep}"),
        format!("parallel.microbatches={micro}"),
    ]);
    let raw = raw(&sets);
    run_thread_ranks(dp * ep, |world| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step()).collect::<Result<_, _>>()?;
        Ok(curve(&m))
    })
    .unwrap()
}

/// Whether parameter `name` is `pattern` (a `megamoe plan` table row) with `{i}` standing
/// for a layer index.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once("{i}") {
        None => pattern == name,
        Some((head, tail)) => name
            .strip_prefix(head)
            .and_then(|rest| rest.strip_suffix(tail))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// |a − b| / |b|.
pub fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

/// Micro-batches of one step of the pipeline model (global batch 8 of 1 sequence each).
pub const MICRO: usize = 8;

/// An MoE stack of `n_layers` layers on the tiny config: d_model 16, `heads` query heads
/// over `kv_heads` KV heads, a dense first layer, 4 routed experts and a shared expert with
/// gate, expert bias, aux and z losses, dropless.
pub fn moe_stack(n_layers: usize, heads: usize, kv_heads: usize) -> Vec<String> {
    let mut sets = vec![
        "model.d_model=16".to_string(),
        format!("model.n_layers={n_layers}"),
        format!("model.n_heads={heads}"),
        format!("model.n_kv_heads={kv_heads}"),
    ];
    sets.extend(
        [
            "model.ffn_hidden=32",
            "model.seq_len=8",
            "moe.routed_experts=4",
            "moe.expert_hidden=16",
            "moe.shared_expert_hidden=16",
            "moe.shared_expert_gate=true",
            "moe.expert_bias=true",
            "moe.aux_loss_weight=0.05",
            "moe.z_loss_weight=0.01",
            "train.steps=10",
            "optim.warmup_steps=2",
        ]
        .map(String::from),
    );
    sets
}

/// The pipeline model: a 4-layer [`moe_stack`] with 4 query heads over 2 KV heads (so tp2
/// splits them), untied head, global batch [`MICRO`], optimizer `optim`.
pub fn pipeline_sets(optim: &str) -> Vec<String> {
    let mut sets = moe_stack(4, 4, 2);
    sets.extend([
        "model.tie_embeddings=false".to_string(),
        format!("train.global_batch={MICRO}"),
        format!("optim.name=\"{optim}\""),
    ]);
    sets
}

/// The pipeline model's config with `sets` applied.
pub fn pipeline_raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(TINY_CONFIG, sets).unwrap()
}

/// A layout of the pipeline model: dp × ep × pp × tp under `schedule` with `fsdp`.
#[derive(Debug, Clone, Copy)]
pub struct Mesh {
    pub dp: usize,
    pub ep: usize,
    pub pp: usize,
    pub tp: usize,
    pub schedule: &'static str,
    pub fsdp: usize,
}

impl Mesh {
    /// pp × dp × ep under `schedule` with `fsdp` (tp 1).
    pub const fn pp(pp: usize, dp: usize, ep: usize, schedule: &'static str, fsdp: usize) -> Mesh {
        Mesh {
            dp,
            ep,
            pp,
            tp: 1,
            schedule,
            fsdp,
        }
    }

    /// The same mesh with tensor parallelism `tp`.
    pub const fn with_tp(self, tp: usize) -> Mesh {
        Mesh { tp, ..self }
    }

    pub fn world(&self) -> usize {
        self.dp * self.ep * self.pp * self.tp
    }

    /// The `--set`s of the layout (each data rank runs MICRO / (dp·ep) micro-batches;
    /// the interleaved schedule with 2 virtual stages per rank).
    pub fn sets(&self) -> Vec<String> {
        let vpp = if self.schedule == "interleaved" { 2 } else { 1 };
        vec![
            format!("parallel.vpp={vpp}"),
            format!("parallel.dp={}", self.dp),
            format!("parallel.ep={}", self.ep),
            format!("parallel.pp={}", self.pp),
            format!("parallel.tp={}", self.tp),
            format!("parallel.fsdp={}", self.fsdp),
            format!("parallel.microbatches={}", MICRO / (self.dp * self.ep)),
            format!("parallel.schedule=\"{}\"", self.schedule),
        ]
    }

    pub fn label(&self) -> String {
        format!(
            "dp{} ep{} pp{} tp{} {} fsdp{}",
            self.dp, self.ep, self.pp, self.tp, self.schedule, self.fsdp
        )
    }

    /// The config of the pipeline model with `optim` under this layout.
    pub fn raw(&self, optim: &str) -> RawConfig {
        let mut s = pipeline_sets(optim);
        s.extend(self.sets());
        pipeline_raw(&s)
    }

    /// `f` of every rank's freshly built trainer, in world-rank order.
    pub fn per_rank<T: Send>(&self, optim: &str, f: impl Fn(&Trainer) -> T + Sync) -> Vec<T> {
        let raw = self.raw(optim);
        run_thread_ranks(self.world(), |w| {
            Trainer::new_rank(&raw, data(), TrainerOptions::default(), w).map(|t| f(&t))
        })
        .unwrap()
    }

    /// Rank 0's (loss, grad norm) per step, after checking every rank reports the same.
    pub fn curve(&self, optim: &str) -> Vec<(f64, f64)> {
        let raw = self.raw(optim);
        let curves = run_thread_ranks(self.world(), |world| -> Result<_, Error> {
            let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
            let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step()).collect::<Result<_, _>>()?;
            Ok(curve(&m))
        })
        .unwrap();
        for (r, c) in curves.iter().enumerate() {
            assert_eq!(
                c,
                &curves[0],
                "{}: rank {r} reports rank 0's losses",
                self.label()
            );
        }
        curves[0].clone()
    }
}

/// The value of the rank at (pipeline rank `pp`, data rank `dp`) in a list of
/// (pp, dp, value) per rank.
pub fn at_rank(list: &[(usize, usize, u64)], pp: usize, dp: usize) -> u64 {
    list.iter()
        .find(|&&(p, d, _)| p == pp && d == dp)
        .unwrap_or_else(|| panic!("no rank at pp {pp} dp {dp} in {list:?}"))
        .2
}

/// (loss, grad norm) per step of one rank running all micro-batches of the pipeline model.
pub fn pipeline_one_rank(optim: &str) -> Vec<(f64, f64)> {
    one_rank(pipeline_raw, &pipeline_sets(optim), MICRO)
}

/// The largest relative difference of the losses and of the gradient norms of `got` from
/// `want`.
pub fn max_rel_diff(got: &[(f64, f64)], want: &[(f64, f64)]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "steps");
    let worst = |pick: fn(&(f64, f64)) -> f64| {
        got.iter()
            .zip(want)
            .map(|(g, w)| rel(pick(g), pick(w)))
            .fold(0.0, f64::max)
    };
    (worst(|x| x.0), worst(|x| x.1))
}

/// Every mesh's 10 steps of the pipeline model with `optim` give one rank's per-step
/// losses (f32, ≤ 1e-5 relative) and gradient norms (≤ 1e-4).
pub fn assert_matches_one_rank(optim: &str, meshes: &[Mesh]) {
    let want = pipeline_one_rank(optim);
    assert!(
        rel(want[STEPS - 1].0, want[0].0) > 1e-3,
        "the loss moves: {want:?}"
    );
    for mesh in meshes {
        let got = mesh.curve(optim);
        let (loss, norm) = max_rel_diff(&got, &want);
        let label = mesh.label();
        eprintln!("{optim} {label}: max rel diff loss {loss:.2e}, grad norm {norm:.2e}");
        assert!(
            loss <= 1e-5 && norm <= 1e-4,
            "{optim} {label}: {got:?} vs one rank {want:?}"
        );
    }
}

/// Rank 0's losses of the steps a run of the pipeline model with `optim` takes: `mesh`
/// (one rank when `None`), resumed from `resume` if given, saving a checkpoint into
/// `save.0` at step `save.1` if given.
pub fn run_losses(
    optim: &str,
    mesh: Option<&Mesh>,
    resume: Option<&Path>,
    save: Option<(&Path, usize)>,
) -> Vec<f64> {
    let raw = match mesh {
        Some(m) => m.raw(optim),
        None => {
            let mut s = pipeline_sets(optim);
            s.push(format!("parallel.microbatches={MICRO}"));
            pipeline_raw(&s)
        }
    };
    let body = |mut t: Trainer| -> Result<Vec<f64>, Error> {
        if let Some(dir) = resume {
            t.load_checkpoint(dir)?;
        }
        let mut losses = Vec::new();
        while (t.step_count() as usize) < STEPS {
            losses.push(t.step()?.loss.total);
            match save {
                Some((dir, at)) if t.step_count() as usize == at => {
                    if t.is_writer() {
                        t.save_checkpoint(dir)?;
                    } else {
                        t.join_checkpoint()?;
                    }
                }
                _ => {}
            }
        }
        Ok(losses)
    };
    let Some(mesh) = mesh else {
        return body(Trainer::new(&raw, data(), TrainerOptions::default()).unwrap()).unwrap();
    };
    run_thread_ranks(mesh.world(), |w| {
        body(Trainer::new_rank(
            &raw,
            data(),
            TrainerOptions::default(),
            w,
        )?)
    })
    .unwrap()
    .remove(0)
}

/// A checkpoint written under `mesh` at step 4 continues under one rank, and one rank's
/// checkpoint continues under `mesh`, both with the uninterrupted one-rank losses (≤ 1e-5
/// relative), with Muon. `dir` is a fresh scratch directory.
pub fn resume_both_ways(mesh: &Mesh, dir: &Path) {
    const AT: usize = 4;
    let want = run_losses("muon", None, None, None);
    let saved = dir.join("mesh");
    let first = run_losses("muon", Some(mesh), None, Some((&saved, AT)));
    assert_eq!(first.len(), STEPS);
    let rest = run_losses("muon", None, Some(&saved), None);
    let one_saved = dir.join("one");
    run_losses("muon", None, None, Some((&one_saved, AT)));
    let rest_mesh = run_losses("muon", Some(mesh), Some(&one_saved), None);
    let label = mesh.label();
    for (way, got) in [("→ one rank", &rest), ("one rank →", &rest_mesh)] {
        assert_eq!(got.len(), STEPS - AT, "{label} {way}");
        for (s, (g, w)) in got.iter().zip(&want[AT..]).enumerate() {
            assert!(
                rel(*g, *w) <= 1e-5,
                "{label} {way} step {}: {g} vs uninterrupted {w}",
                s + AT + 1
            );
        }
    }
}

/// Trains `steps` steps of `raw` on `world` thread ranks; then the writer rank saves a
/// checkpoint into `dir` (the other ranks join it). Returns the checkpoint's directory.
pub fn thread_ranks_checkpoint(world: usize, raw: &RawConfig, steps: usize, dir: &Path) -> PathBuf {
    let saved = run_thread_ranks(world, |comm| -> Result<_, Error> {
        let mut t = Trainer::new_rank(raw, data(), TrainerOptions::default(), comm)?;
        for _ in 0..steps {
            t.step()?;
        }
        if t.is_writer() {
            Ok(Some(t.save_checkpoint(dir)?))
        } else {
            t.join_checkpoint()?;
            Ok(None)
        }
    })
    .unwrap();
    assert!(saved[1..].iter().all(Option::is_none), "one writer rank");
    saved[0].clone().unwrap()
}
