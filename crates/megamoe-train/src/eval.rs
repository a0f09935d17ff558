//! Held-out evaluation and text samples of a [`Trainer`]: the eval loss per data
//! domain (the same held-out text for every run and seed) and a short generated
//! continuation. Both are booked to goodput's `Eval` category.

use std::collections::BTreeMap;
use std::time::Instant;

use megamoe_model::Sampling;

use crate::data::{heldout_batches, Batch};
use crate::error::Result;
use crate::goodput::TimeCategory;
use crate::metrics::{DomainLoss, EvalMetrics, SampleRecord};
use crate::trainer::{batch_tensors, splitmix, Trainer};

/// Sampling temperature of [`Trainer::sample`]: low enough to stay on the learnt
/// patterns, above 0 so a sample shows the spread of the model's predictions.
const SAMPLE_TEMPERATURE: f32 = 0.8;

impl Trainer {
    /// Held-out loss over `train.eval_batches` batches of `B = train.global_batch`
    /// sequences (the same text for every run), overall and per data domain.
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        let started = Instant::now();
        if self.heldout.is_none() {
            self.heldout = Some(self.heldout_by_domain()?);
        }
        let batches = self.heldout.as_deref().unwrap_or_default();
        let names = self.batcher.source().domain_names();
        let inputs = batches
            .iter()
            .map(|b| batch_tensors(b, self.options.device))
            .collect::<Result<Vec<_>>>()?;
        let losses: Vec<f32> = match (&self.pipeline, &self.parallel) {
            // A forward-only pass over the pipeline's stages; every rank gets the losses.
            (Some(rank), Some(par)) => {
                rank.eval_losses(par.pipeline_groups().pp, &inputs, self.step as usize)?
            }
            _ => {
                let params =
                    crate::distributed::working_params(self.parallel.as_ref(), &self.params)?;
                let mut losses = Vec::with_capacity(inputs.len());
                for (ids, targets) in &inputs {
                    let out = self
                        .model
                        .forward(&params, ids, targets, self.step as usize)?;
                    // SYNC: the eval loss is a host number.
                    losses.push(out.losses.lm_loss.to_scalar_f32()?);
                }
                losses
            }
        };
        let mut per_domain: BTreeMap<u16, (f64, u64)> = BTreeMap::new();
        for (b, &loss) in batches.iter().zip(&losses) {
            let loss = loss as f64;
            let tokens = b.num_tokens() as u64;
            let domain = b.domains.first().map_or(0, |d| d.0);
            let e = per_domain.entry(domain).or_default();
            e.0 += loss * tokens as f64;
            e.1 += tokens;
        }
        let (sum, tokens) = per_domain
            .values()
            .fold((0.0, 0u64), |(s, t), &(ls, lt)| (s + ls, t + lt));
        let metrics = EvalMetrics {
            step: self.step,
            loss: if tokens > 0 {
                sum / tokens as f64
            } else {
                f64::NAN
            },
            tokens,
            per_domain: per_domain
                .iter()
                .map(|(&d, &(ls, lt))| DomainLoss {
                    domain: names
                        .get(d as usize)
                        .cloned()
                        .unwrap_or_else(|| format!("domain {d}")),
                    loss: ls / lt.max(1) as f64,
                    tokens: lt,
                })
                .collect(),
            time_s: started.elapsed().as_secs_f64(),
        };
        self.goodput.record(TimeCategory::Eval, started.elapsed());
        Ok(metrics)
    }

    /// The held-out set regrouped so each batch holds one domain (at most
    /// `micro_batch_size` rows), so per-domain losses come straight from the forward.
    fn heldout_by_domain(&self) -> Result<Vec<Batch>> {
        let b = self.plan.batch.global_batch;
        let t = self.plan.model.seq_len;
        let all = heldout_batches(self.batcher.source(), b, t, self.plan.train.eval_batches)?;
        let mut rows: BTreeMap<u16, Vec<Batch>> = BTreeMap::new();
        for batch in &all {
            for r in 0..batch.batch_size {
                let row = batch.rows(r..r + 1)?;
                rows.entry(row.domains[0].0).or_default().push(row);
            }
        }
        let chunk = self.plan.batch.micro_batch_size.max(1);
        let mut out = Vec::new();
        for group in rows.values() {
            for part in group.chunks(chunk) {
                out.push(concat_rows(part));
            }
        }
        Ok(out)
    }

    /// Continues `prompt` by `n` tokens (at [`SAMPLE_TEMPERATURE`]) with the current parameters.
    pub fn sample(&mut self, prompt: &str, n: usize) -> Result<SampleRecord> {
        let started = Instant::now();
        let tok = self.batcher.source().tokenizer().clone();
        let ids: Vec<i32> = tok.encode(prompt)?.into_iter().map(|t| t as i32).collect();
        self.sample_rng = splitmix(self.sample_rng);
        let sampling = Sampling {
            temperature: SAMPLE_TEMPERATURE,
            seed: self.sample_rng,
        };
        let out = match (&self.pipeline, &self.parallel) {
            // Forward-only through the stages; the head's rank draws, every rank gets it.
            (Some(rank), Some(par)) => {
                rank.generate(par.pipeline_groups().pp, &ids, n, sampling)?
            }
            _ => {
                let params =
                    crate::distributed::working_params(self.parallel.as_ref(), &self.params)?;
                self.model.generate(&params, &ids, n, sampling)?
            }
        };
        let cont: Vec<u32> = out[ids.len()..].iter().map(|&t| t.max(0) as u32).collect();
        let text = tok.decode(&cont)?;
        self.goodput.record(TimeCategory::Eval, started.elapsed());
        Ok(SampleRecord {
            step: self.step,
            prompt: prompt.to_string(),
            text,
        })
    }
}

/// Stacks one-row batches into one batch.
fn concat_rows(rows: &[Batch]) -> Batch {
    let seq_len = rows.first().map_or(0, |r| r.seq_len);
    Batch {
        batch_size: rows.iter().map(|r| r.batch_size).sum(),
        seq_len,
        inputs: rows.iter().flat_map(|r| r.inputs.iter().copied()).collect(),
        targets: rows
            .iter()
            .flat_map(|r| r.targets.iter().copied())
            .collect(),
        domains: rows
            .iter()
            .flat_map(|r| r.domains.iter().copied())
            .collect(),
    }
}
