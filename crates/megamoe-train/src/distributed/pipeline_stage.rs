//! The executor's [`Stage`] over a [`ModelChunk`]: one schedule stage of one
//! pipeline rank for one optimizer step.
//!
//! The stage contract, and where each part of it lives:
//! - outputs alive until their backward: the chunk's [`ActivationStore`] keeps each
//!   micro-batch's activations from F to its I, and the deferred weight inputs from I
//!   to its W (B = I then W);
//! - aux losses injected on the stage that made them: [`ModelChunk::backward_input`]
//!   adds each block's router / gate loss gradients in that block's backward, whatever
//!   stage it is on; only the reported values ride along the carry;
//! - the last stage owns LM + MTP: the head chunk computes the loss of each
//!   micro-batch from its own targets (kept here as host values), its backward starts
//!   from that loss, and its forward sends nothing ([`Wire::Loss`]);
//! - shared parameters: [`Stage::shared_gradient`] hands the embedding (when the head
//!   is tied or MTP reads it) and, for DualPipe's mirrored copies, every other tensor
//!   of the model stage, so the executor sums them over the holders before the step.

use std::cell::RefCell;
use std::collections::BTreeMap;

use megamoe_model::chunk_params::EMBED_NAME;
use megamoe_model::{ActivationStore, ChunkParams, LossValues, ModelChunk, ModelStats};
use megamoe_pipeline::executor::BoxError;
use megamoe_pipeline::{SharedGroup, Stage};
use megamoe_tensor::{DType, Tensor};

use super::pipeline_stats::StageValues;
use super::wire::Wire;

/// One micro-batch's `[B, T]` ids and targets, and its rows (their data domains).
#[derive(Debug, Clone)]
pub(crate) struct MicroBatch {
    pub ids: Tensor,
    pub targets: Tensor,
    pub rows: crate::data::Batch,
}

/// A stage asked for something the schedule should not ask (a wrong message kind, a
/// micro-batch outside the step).
#[derive(Debug, thiserror::Error)]
#[error("schedule stage {stage}, micro-batch {micro_batch}: {rule}")]
pub struct StageContractError {
    /// The schedule stage.
    pub stage: usize,
    /// The micro-batch.
    pub micro_batch: usize,
    /// What went wrong.
    pub rule: String,
}

/// Schedule stage `stage` of one step: the chunk, handles to its parameters, its own
/// gradient buffers and activation store, and what its forwards reported.
pub(crate) struct ChunkStage<'a> {
    pub stage: usize,
    pub chunk: ModelChunk<'a>,
    pub params: ChunkParams,
    pub grads: ChunkParams,
    pub store: ActivationStore,
    pub micro: &'a [MicroBatch],
    /// 0-based optimizer step (GateSkip budgets).
    pub step: usize,
    /// 1 / micro-batches of the step.
    pub grad_scale: f32,
    /// The embedding is read by the head too (tied head or MTP): one group over every
    /// chain end; otherwise it belongs to the input stage only.
    pub shared_embedding: bool,
    /// Head stage: the loss values of each micro-batch.
    pub losses: BTreeMap<usize, LossValues>,
    /// Routed-expert picks per MoE layer (global index), summed over this stage's
    /// micro-batches.
    pub picks: BTreeMap<usize, Vec<f32>>,
    /// Per MoE layer (global index): (null-slot picks, tokens, kept assignments) summed
    /// over this stage's micro-batches, and the routing slots per token.
    pub routing: BTreeMap<usize, ([f32; 3], usize)>,
    /// GateSkip / FlexiDepth / shared-gate values of this stage's forwards.
    pub values: StageValues,
    /// Data domains of the run; with several, kept assignments are counted per domain.
    pub num_domains: usize,
    /// Per MoE layer (global index): kept assignments per (domain, expert), summed over
    /// this stage's micro-batches (with several data domains).
    pub by_domain: BTreeMap<usize, Vec<f32>>,
    /// First error of [`Stage::accumulate`] (which cannot return one).
    pub accumulate_error: RefCell<Option<megamoe_tensor::Error>>,
}

impl<'a> ChunkStage<'a> {
    /// A stage with zeroed gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: usize,
        chunk: ModelChunk<'a>,
        params: ChunkParams,
        micro: &'a [MicroBatch],
        step: usize,
        shared_embedding: bool,
    ) -> crate::Result<ChunkStage<'a>> {
        let mut grads = params.clone();
        let mut err = None;
        grads.visit_mut(&mut |_, t, _| {
            if err.is_none() {
                match Tensor::zeros(t.dims(), DType::F32, t.device()) {
                    Ok(z) => *t = z,
                    Err(e) => err = Some(e),
                }
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(ChunkStage {
            stage,
            chunk,
            params,
            grads,
            store: ActivationStore::new(),
            micro,
            step,
            grad_scale: 1.0 / micro.len().max(1) as f32,
            shared_embedding,
            losses: BTreeMap::new(),
            picks: BTreeMap::new(),
            routing: BTreeMap::new(),
            values: StageValues::default(),
            num_domains: 1,
            by_domain: BTreeMap::new(),
            accumulate_error: RefCell::new(None),
        })
    }

    /// The stage with the gradient of each parameter whose `rows(name)` names more dim-0
    /// rows than the parameter holds (`parallel.fsdp = 3`: the parameters are this rank's
    /// rows, their gradients full) zeroed in that shape.
    pub fn with_grad_rows(mut self, rows: &dyn Fn(&str) -> Option<usize>) -> crate::Result<Self> {
        let mut err = None;
        self.grads.visit_mut(&mut |n, t, _| match rows(n) {
            Some(full) if err.is_none() && t.dims().first() != Some(&full) => {
                let mut dims = t.dims().to_vec();
                dims[0] = full;
                match Tensor::zeros(dims, DType::F32, t.device()) {
                    Ok(z) => *t = z,
                    Err(e) => err = Some(e),
                }
            }
            _ => {}
        });
        match err {
            Some(e) => Err(e.into()),
            None => Ok(self),
        }
    }

    fn contract(&self, mb: usize, rule: String) -> BoxError {
        Box::new(StageContractError {
            stage: self.stage,
            micro_batch: mb,
            rule,
        })
    }

    /// Adds the routed-expert picks of the forward's MoE layers.
    fn count_picks(&mut self, stats: &ModelStats, rows: &crate::data::Batch) -> crate::Result<()> {
        // Each token's domain on the device (uploaded once per micro-batch).
        let mut domains: Option<megamoe_tensor::Tensor> = None;
        for layer in &stats.layers {
            let Some(moe) = &layer.block.moe else {
                continue;
            };
            if self.num_domains > 1 {
                let domains = match domains.take() {
                    Some(d) => domains.insert(d),
                    None => domains.insert(megamoe_tensor::Tensor::from_vec_i32(
                        crate::step_stats::token_domain_ids(rows, self.num_domains),
                        [rows.batch_size, rows.seq_len],
                        moe.stats.token_experts.device(),
                    )?),
                };
                // SYNC: one read per MoE layer per micro-batch, for the metrics line.
                let c = crate::step_stats::domain_counts(&moe.stats, domains, self.num_domains)?
                    .to_host_f32()?;
                let sum = self
                    .by_domain
                    .entry(layer.layer)
                    .or_insert_with(|| vec![0.0; c.len()]);
                sum.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
            }
            let e = moe.stats.num_routed_experts;
            // SYNC: one read per MoE layer per micro-batch, for the expert-bias update.
            let picks = moe.stats.picks_per_slot.to_host_f32()?;
            let sum = self
                .picks
                .entry(layer.layer)
                .or_insert_with(|| vec![0.0; e]);
            for (s, p) in sum.iter_mut().zip(&picks[..e.min(picks.len())]) {
                *s += p;
            }
            // SYNC: one read per MoE layer per micro-batch, for the metrics line.
            let kept: f32 = moe
                .stats
                .tokens_per_expert
                .to_dtype(megamoe_tensor::DType::F32)?
                .to_host_f32()?
                .iter()
                .sum();
            let null: f32 = picks[e.min(picks.len())..].iter().sum();
            let r = self
                .routing
                .entry(layer.layer)
                .or_insert(([0.0; 3], moe.stats.slots_per_token));
            r.0[0] += null;
            r.0[1] += moe.stats.tokens as f32;
            r.0[2] += kept;
        }
        Ok(())
    }

    /// The gradients `group` sums, in [`ChunkParams::visit`] order.
    fn group_filter(&self, group: SharedGroup) -> impl Fn(&str) -> bool {
        let shared_embedding = self.shared_embedding;
        move |name: &str| match group {
            SharedGroup::Embedding => name == EMBED_NAME,
            // The embedding of a mirrored copy is summed in the embedding group when
            // the head shares it, else here.
            SharedGroup::ModelStage(_) => !(shared_embedding && name == EMBED_NAME),
        }
    }
}

impl Stage for ChunkStage<'_> {
    type Tensor = Wire;

    fn forward(&mut self, mb: usize, input: Option<Wire>) -> Result<Wire, BoxError> {
        let carry = match input {
            None => None,
            Some(Wire::Carry(c)) => Some(c),
            Some(other) => return Err(self.contract(mb, format!("forward got a {}", other.name()))),
        };
        let micro = self.micro;
        let x = micro.get(mb).ok_or_else(|| {
            self.contract(mb, format!("the step has {} micro-batches", micro.len()))
        })?;
        let f = self.chunk.forward_micro_batch(
            &mut self.store,
            mb,
            &self.params,
            &x.ids,
            &x.targets,
            carry,
            self.step,
        )?;
        self.count_picks(&f.stats, &x.rows)?;
        self.values.record(mb, &f.stats)?;
        if let Some(l) = &f.losses {
            self.losses.insert(mb, l.to_host()?);
        }
        Ok(f.carry.map_or(Wire::Loss, Wire::Carry))
    }

    fn backward_input(
        &mut self,
        mb: usize,
        grad_output: Option<Wire>,
    ) -> Result<Option<Wire>, BoxError> {
        let d_out = match grad_output {
            None => None,
            Some(Wire::Grad(g)) => Some(g),
            Some(other) => {
                return Err(self.contract(mb, format!("backward got a {}", other.name())))
            }
        };
        let up = self.chunk.backward_input_micro_batch(
            &mut self.store,
            mb,
            &self.params,
            d_out,
            self.grad_scale,
        )?;
        Ok(up.map(Wire::Grad))
    }

    fn backward_weight(&mut self, mb: usize) -> Result<(), BoxError> {
        self.chunk
            .backward_weight_micro_batch(&mut self.store, mb, &mut self.grads)?;
        Ok(())
    }

    fn shared_gradient(&mut self, group: SharedGroup) -> Option<Wire> {
        if group == SharedGroup::Embedding && !self.shared_embedding {
            return None;
        }
        let keep = self.group_filter(group);
        let mut v = Vec::new();
        self.grads.visit(&mut |n, t, _| {
            if keep(n) {
                v.push(t.clone());
            }
        });
        (!v.is_empty()).then_some(Wire::Grads(v))
    }

    fn accumulate(&self, total: &mut Wire, part: &Wire) {
        let (Wire::Grads(total), Wire::Grads(part)) = (total, part) else {
            return;
        };
        for (t, p) in total.iter_mut().zip(part) {
            if let Err(e) = t.add_assign(p) {
                self.accumulate_error.borrow_mut().get_or_insert(e);
            }
        }
    }

    fn set_shared_gradient(&mut self, group: SharedGroup, total: Wire) {
        let Wire::Grads(total) = total else { return };
        let keep = self.group_filter(group);
        let mut it = total.into_iter();
        self.grads.visit_mut(&mut |n, t, _| {
            if keep(n) {
                if let Some(sum) = it.next() {
                    *t = sum;
                }
            }
        });
    }
}
