//! A step's loss parts and statistics, gathered on the device over micro-batches and
//! layers and read on the host in ONE batched read per step.
//!
//! Per micro-batch, [`StepStatsAccumulator::add`] turns the forward's tensors into two
//! flat f32 device vectors without reading anything:
//! - the routing **counts** of every MoE layer (picks per pool slot, kept assignments per
//!   expert, and with several data domains the kept assignments per (domain, expert)),
//!   summed over micro-batches on the device — integers below 2^24 held in f32, so the
//!   sums are exact;
//! - the micro-batch's **values** (loss parts, FlexiDepth kept shares, shared-expert gate
//!   means, layers used), kept per micro-batch (a few floats each) so the host sums them in
//!   f64 exactly as a per-micro-batch read would.
//!
//! [`StepStatsAccumulator::finish`] reads the count sum and every micro-batch's values in
//! one [`Tensor::to_host_batch_f32`] and decodes them into [`StepSums`]. With the clipping
//! norm that is the step's second and last host read in static-capacity mode.

use std::collections::BTreeMap;

use megamoe_model::{LossParts as LossTensors, LossValues, ModelStats};
use megamoe_moe::MoeStats;
use megamoe_plan::Plan;
use megamoe_tensor::{DType, Tensor};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::metrics::{FlexiDepthStats, GateSkipStats, LossParts, MoeLayerStats};

/// Where a micro-batch's total loss sits in its values vector.
const TOTAL: usize = 5;

/// Per-step sums over micro-batches, turned into step metrics at the end.
#[derive(Debug, Default)]
pub(crate) struct StepSums {
    pub(crate) micro_batches: usize,
    pub(crate) loss: LossParts,
    pub(crate) mtp_losses: Vec<f64>,
    /// layer → (attn kept, mlp kept) summed over micro-batches.
    pub(crate) gate_skip: BTreeMap<usize, (f64, f64)>,
    /// adaptive layer → processed fraction summed over micro-batches.
    pub(crate) flexi_kept: BTreeMap<usize, f64>,
    pub(crate) layers_used: f64,
    /// MoE layer → counts summed over micro-batches.
    pub(crate) moe: BTreeMap<usize, MoeLayerSums>,
    /// The pre-clip gradient norm, when the step clipped inside a captured graph.
    pub(crate) grad_norm: Option<f64>,
}

/// Routing counts of one MoE layer over a step.
#[derive(Debug, Default, Clone)]
pub(crate) struct MoeLayerSums {
    /// (E,) real picks per routed expert, before capacity.
    pub(crate) picks: Vec<u64>,
    /// (E,) assignments kept after capacity.
    pub(crate) kept: Vec<u64>,
    pub(crate) null_picks: u64,
    pub(crate) tokens: u64,
    pub(crate) top_k: usize,
    /// (domains, E) kept assignments per expert by the data domain of the token; empty
    /// when the data has a single domain.
    pub(crate) by_domain: Vec<Vec<u64>>,
    /// Σ over micro-batches of the mean shared-expert gate, and how many were summed.
    pub(crate) shared_gate: Option<(f64, usize)>,
}

/// Where one layer's entries sit in the flat vectors (fixed by the model, so equal for
/// every micro-batch of a step).
#[derive(Debug, Clone, PartialEq)]
struct LayerSlots {
    layer: usize,
    /// FlexiDepth: one value, the mean of the full-path mask.
    flexi: bool,
    moe: Option<MoeSlots>,
}

#[derive(Debug, Clone, PartialEq)]
struct MoeSlots {
    /// E routed experts.
    experts: usize,
    /// Ep pool slots (E real, then null copies): the picks entries.
    pool: usize,
    /// N tokens of one micro-batch.
    tokens: usize,
    top_k: usize,
    /// One value: the mean shared-expert gate.
    shared_gate: bool,
}

/// The loss parts and statistics of a step's micro-batches, on the device until
/// [`StepStatsAccumulator::finish`].
#[derive(Debug, Clone)]
pub(crate) struct StepStatsAccumulator {
    num_domains: usize,
    /// Layout of the first micro-batch; later ones must match.
    layers: Vec<LayerSlots>,
    mtp_losses: usize,
    layers_used: bool,
    /// `[S]` f32: Σ over micro-batches of every MoE layer's counts; `None` without MoE.
    counts: Option<Tensor>,
    /// Per micro-batch `[V]` f32: loss parts, then per-layer values, then layers used.
    values: Vec<Tensor>,
    /// GateSkip kept shares are host numbers already (from the config); summed here.
    gate_skip: BTreeMap<usize, (f64, f64)>,
    /// Rank-0 f32 pre-clip gradient norm when the step clipped on the device inside a
    /// captured graph ([`StepStatsAccumulator::set_grad_norm`]); read with the rest.
    grad_norm: Option<Tensor>,
}

impl StepStatsAccumulator {
    /// An empty accumulator; `num_domains > 1` adds per-domain expert counts.
    pub(crate) fn new(num_domains: usize) -> Self {
        Self {
            num_domains,
            layers: Vec::new(),
            mtp_losses: 0,
            layers_used: false,
            counts: None,
            values: Vec::new(),
            gate_skip: BTreeMap::new(),
            grad_norm: None,
        }
    }

    /// Adds the step's pre-clip gradient norm (a device tensor) to the one batched read.
    #[cfg(feature = "cuda")]
    pub(crate) fn set_grad_norm(&mut self, norm: Tensor) {
        self.grad_norm = Some(norm);
    }

    /// Each micro-batch's total loss as a `[1]` f32 device tensor (no read).
    #[cfg(feature = "cuda")]
    pub(crate) fn totals(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .values
            .iter()
            .map(|v| v.narrow(0, TOTAL, 1))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// `(layer, [E] f32 real picks per routed expert summed over the step's micro-batches)`
    /// of every MoE layer, on the device (no read): the counts the expert-bias update uses.
    #[cfg(feature = "cuda")]
    pub(crate) fn layer_picks(&self) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        let Some(counts) = &self.counts else {
            return Ok(out);
        };
        let mut at = 0;
        for l in &self.layers {
            let Some(m) = &l.moe else { continue };
            out.push((l.layer, counts.narrow(0, at, m.experts.min(m.pool))?));
            at += m.pool + m.experts;
            if self.num_domains > 1 {
                at += self.num_domains * m.experts;
            }
        }
        Ok(out)
    }

    /// Adds one micro-batch's loss parts and statistics (device work only; no host read
    /// and no upload). `token_domains` is the micro-batch's `[B, T]` i32 device tensor of
    /// [`token_domain_ids`]; needed when the data has several domains.
    pub(crate) fn add(
        &mut self,
        losses: &LossTensors,
        stats: &ModelStats,
        token_domains: Option<&Tensor>,
    ) -> Result<()> {
        let mut layers = Vec::with_capacity(stats.layers.len());
        let mut values: Vec<Tensor> = [
            &losses.lm_loss,
            &losses.aux,
            &losses.z,
            &losses.gate_skip,
            &losses.flexi_depth,
            &losses.total,
        ]
        .into_iter()
        .chain(&losses.mtp_losses)
        .map(|t| t.reshape([1]))
        .collect::<std::result::Result<_, _>>()?;
        let mut counts: Vec<Tensor> = Vec::new();
        for layer in &stats.layers {
            let block = &layer.block;
            if let Some((a, m)) = block.kept_fraction {
                let e = self.gate_skip.entry(layer.layer).or_default();
                e.0 += a;
                e.1 += m;
            }
            if let Some(full) = &block.full_path {
                values.push(full.mean_all()?.reshape([1])?);
            }
            let moe = match &block.moe {
                Some(out) => {
                    let st = &out.stats;
                    counts.push(st.picks_per_slot.reshape([st.picks_per_slot.numel()])?);
                    counts.push(st.tokens_per_expert.to_dtype(DType::F32)?);
                    if self.num_domains > 1 {
                        let domains = token_domains.ok_or_else(|| Error::DataConfig {
                            field: "domains",
                            value: self.num_domains.to_string(),
                            rule: "several data domains need each token's domain on the device",
                        })?;
                        counts.push(domain_counts(st, domains, self.num_domains)?);
                    }
                    if let Some(g) = &st.shared_gate_mean {
                        values.push(g.reshape([1])?);
                    }
                    Some(MoeSlots {
                        experts: st.num_routed_experts,
                        pool: st.picks_per_slot.numel(),
                        tokens: st.tokens,
                        top_k: st.slots_per_token,
                        shared_gate: st.shared_gate_mean.is_some(),
                    })
                }
                None => None,
            };
            layers.push(LayerSlots {
                layer: layer.layer,
                flexi: block.full_path.is_some(),
                moe,
            });
        }
        if let Some(used) = &stats.layers_used {
            values.push(used.mean_all()?.reshape([1])?);
        }
        if self.values.is_empty() {
            self.layers = layers;
            self.mtp_losses = losses.mtp_losses.len();
            self.layers_used = stats.layers_used.is_some();
        } else {
            debug_assert_eq!(self.layers, layers, "same model for every micro-batch");
        }
        self.values.push(cat(&values)?);
        if !counts.is_empty() {
            let counts = cat(&counts)?;
            match &mut self.counts {
                Some(acc) => acc.add_assign(&counts)?,
                None => self.counts = Some(counts.deep_copy()?),
            }
        }
        Ok(())
    }

    /// Reads everything in one batched host read and sums it into [`StepSums`] (loss
    /// parts weighted as `plan` says).
    ///
    /// SYNC: the step's one read of its loss parts and statistics.
    pub(crate) fn finish(self, plan: &Plan) -> Result<StepSums> {
        let mut all: Vec<&Tensor> = Vec::with_capacity(self.values.len() + 2);
        all.extend(&self.counts);
        all.extend(&self.values);
        all.extend(&self.grad_norm);
        let host = Tensor::to_host_batch_f32(&all)?;
        let first = usize::from(self.counts.is_some());
        let last = host.len() - usize::from(self.grad_norm.is_some());
        let counts = match self.counts {
            Some(_) => host[0].as_slice(),
            None => &[][..],
        };
        let values = &host[first..last];
        let mut sums = StepSums {
            gate_skip: self.gate_skip,
            grad_norm: self
                .grad_norm
                .as_ref()
                .map(|_| host[last].first().copied().unwrap_or(f32::NAN) as f64),
            ..StepSums::default()
        };
        let k = self.mtp_losses;
        for v in values {
            let at = |i: usize| v.get(i).copied().unwrap_or(f32::NAN);
            let loss = LossValues {
                lm_loss: at(0),
                aux: at(1),
                z: at(2),
                gate_skip: at(3),
                flexi_depth: at(4),
                total: at(TOTAL),
                mtp_losses: (6..6 + k).map(at).collect(),
            };
            add_losses(&mut sums, &loss, plan);
            let mut next = 6 + k;
            for l in &self.layers {
                if l.flexi {
                    *sums.flexi_kept.entry(l.layer).or_default() += at(next) as f64;
                    next += 1;
                }
                if let Some(m) = &l.moe {
                    let e = sums.moe.entry(l.layer).or_default();
                    e.tokens += m.tokens as u64;
                    e.top_k = m.top_k;
                    if m.shared_gate {
                        let g = e.shared_gate.get_or_insert((0.0, 0));
                        g.0 += at(next) as f64;
                        g.1 += 1;
                        next += 1;
                    }
                }
            }
            if self.layers_used {
                sums.layers_used += at(next) as f64;
            }
        }
        // Counts are integers below 2^24 summed in f32, so the casts are exact.
        let mut at = 0;
        let mut take = |n: usize| {
            let s: Vec<u64> = (at..at + n)
                .map(|i| counts.get(i).map_or(0, |&c| c.max(0.0) as u64))
                .collect();
            at += n;
            s
        };
        for l in &self.layers {
            let Some(m) = &l.moe else { continue };
            let e = sums.moe.entry(l.layer).or_default();
            let picks = take(m.pool);
            e.picks = picks[..m.experts.min(m.pool)].to_vec();
            e.null_picks = picks[m.experts.min(m.pool)..].iter().sum();
            e.kept = take(m.experts);
            if self.num_domains > 1 {
                let d = take(self.num_domains * m.experts);
                e.by_domain = d.chunks(m.experts.max(1)).map(<[u64]>::to_vec).collect();
            }
        }
        Ok(sums)
    }
}

impl StepSums {
    /// Loss parts averaged over micro-batches (each is already a token mean).
    pub(crate) fn mean_loss(&self) -> LossParts {
        let k = self.micro_batches.max(1) as f64;
        let l = &self.loss;
        LossParts {
            total: l.total / k,
            lm: l.lm / k,
            mtp: l.mtp / k,
            aux: l.aux / k,
            z: l.z / k,
            skip: l.skip / k,
        }
    }

    pub(crate) fn mean_mtp(&self) -> Vec<f64> {
        let k = self.micro_batches.max(1) as f64;
        self.mtp_losses.iter().map(|x| x / k).collect()
    }

    pub(crate) fn gate_skip_stats(&self) -> Vec<GateSkipStats> {
        let k = self.micro_batches.max(1) as f64;
        self.gate_skip
            .iter()
            .map(|(&layer, &(a, m))| GateSkipStats {
                layer,
                attn_kept: a / k,
                mlp_kept: m / k,
            })
            .collect()
    }

    pub(crate) fn flexi_depth_stats(&self, num_layers: usize) -> Option<FlexiDepthStats> {
        if self.flexi_kept.is_empty() {
            return None;
        }
        let k = self.micro_batches.max(1) as f64;
        Some(FlexiDepthStats {
            mean_layers_used: self.layers_used / k,
            num_layers,
            kept: self.flexi_kept.iter().map(|(&l, &f)| (l, f / k)).collect(),
        })
    }

    pub(crate) fn moe_stats(&self) -> Vec<MoeLayerStats> {
        self.moe
            .iter()
            .map(|(&layer, s)| {
                let picks: u64 = s.picks.iter().sum();
                let kept: u64 = s.kept.iter().sum();
                let mut m = MoeLayerStats::from_counts(
                    layer,
                    s.picks.clone(),
                    picks.saturating_sub(kept),
                    s.null_picks,
                    s.tokens,
                    s.top_k,
                );
                m.tokens_per_expert_by_domain = s.by_domain.clone();
                m.shared_gate_mean = s.shared_gate.map(|(sum, n)| sum / n.max(1) as f64);
                m
            })
            .collect()
    }
}

/// Adds one micro-batch's host loss values to the step sums.
fn add_losses(sums: &mut StepSums, values: &LossValues, plan: &Plan) {
    sums.micro_batches += 1;
    let l = &mut sums.loss;
    l.total += values.total as f64;
    l.lm += values.lm_loss as f64;
    if let Some(mtp) = &plan.mtp {
        for (k, (ce, w)) in values.mtp_losses.iter().zip(&mtp.step_weights).enumerate() {
            l.mtp += mtp.loss_weight * w * *ce as f64;
            if sums.mtp_losses.len() <= k {
                sums.mtp_losses.push(0.0);
            }
            sums.mtp_losses[k] += *ce as f64;
        }
    }
    if let Some(moe) = &plan.moe {
        l.aux += moe.aux_loss_weight * values.aux as f64;
        l.z += moe.z_loss_weight * values.z as f64;
    }
    if let Some(g) = &plan.gate_skip {
        l.skip += g.sparsity_weight * values.gate_skip as f64;
    }
    if let Some(f) = &plan.flexi_depth {
        l.skip += f.skip_loss_weight * values.flexi_depth as f64;
    }
}

/// `Tensor::cat` of rank-1 tensors along dim 0.
fn cat(parts: &[Tensor]) -> Result<Tensor> {
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(Tensor::cat(&refs, 0)?)
}

/// Each token's data domain as the i32 the device counts with: the domain index, or -1
/// when it is not below `num_domains` (such tokens are not counted). Uploaded into the
/// micro-batch's fixed domain buffer (a captured step reads it there).
pub(crate) fn token_domain_ids(micro: &Batch, num_domains: usize) -> Vec<i32> {
    micro
        .token_domains()
        .iter()
        .map(|d| match d.0 as usize {
            d if d < num_domains => d as i32,
            _ => -1,
        })
        .collect()
}

/// `[D·E]` f32 on the device: kept assignments per (domain, expert) of the micro-batch
/// whose `[B, T]` i32 [`token_domain_ids`] are `token_domains` (the MoE layer's rows are
/// the micro-batch's `B·T` tokens in row-major order). Each kept `(token, slot)` adds one
/// at `domain·E + expert` (a slot count with a spare last slot for dropped and null slots
/// and for tokens without a domain); device work only: no upload, no host read, so a
/// captured step counts the domains of whatever batch its fixed buffer holds.
pub(crate) fn domain_counts(
    st: &MoeStats,
    token_domains: &Tensor,
    num_domains: usize,
) -> Result<Tensor> {
    let (e, k) = (st.num_routed_experts, st.slots_per_token);
    let device = st.token_experts.device();
    debug_assert_eq!(
        token_domains.numel(),
        st.tokens,
        "MoE rows = micro-batch tokens"
    );
    // Each slot's row offset `domain·E` (negative for a token without a domain).
    let offset = token_domains
        .reshape([st.tokens])?
        .to_dtype(DType::F32)?
        .scale(e as f32)?;
    let shape = [st.tokens, k];
    let base = Tensor::ones(shape, DType::F32, device)?.mul_col(&offset)?;
    let experts = st.token_experts.to_dtype(DType::F32)?;
    // Counted: a kept expert (id ≥ 0) of a token with a domain (offset ≥ 0).
    let counted = experts.gt_scalar(-0.5)?.mul(&base.gt_scalar(-0.5)?)?;
    let spare = Tensor::full(shape, (num_domains * e) as f32, DType::F32, device)?;
    let row = counted.where_cond(&base.add(&experts)?, &spare)?;
    if st.tokens == 0 {
        return Ok(Tensor::zeros([num_domains * e], DType::F32, device)?);
    }
    // An integer count per (domain, expert) slot (exact, order-free): one segment of all
    // the tokens.
    let idx = row.to_dtype(DType::I32)?.reshape(shape)?;
    let counts = idx.slot_counts(None, num_domains * e + 1, st.tokens)?;
    Ok(counts
        .narrow(1, 0, num_domains * e)?
        .reshape([num_domains * e])?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::DomainId;
    use megamoe_tensor::Device;

    #[test]
    fn token_domain_ids_repeat_each_sequence_domain_and_mark_unknown_ones() {
        let micro = Batch {
            batch_size: 3,
            seq_len: 2,
            inputs: vec![0; 6],
            targets: vec![0; 6],
            domains: vec![DomainId(1), DomainId(0), DomainId(5)],
        };
        assert_eq!(token_domain_ids(&micro, 2), [1, 1, 0, 0, -1, -1]);
    }

    #[test]
    fn domain_counts_count_kept_assignments_per_domain_and_expert() {
        let cpu = Device::Cpu;
        // 4 tokens, 2 slots, 3 experts; -1 = dropped or null slot.
        let token_experts =
            Tensor::from_vec_i32(vec![0, 2, 1, -1, 2, 0, -1, 1], [4, 2], cpu).unwrap();
        let st = MoeStats {
            picks_per_slot: Tensor::zeros([1, 3], DType::F32, cpu).unwrap(),
            tokens_per_expert: Tensor::zeros([3], DType::I32, cpu).unwrap(),
            num_routed_experts: 3,
            tokens: 4,
            slots_per_token: 2,
            token_experts,
            shared_gate_mean: None,
        };
        // Token 2 has no domain (not counted).
        let domains = Tensor::from_vec_i32(vec![0, 1, -1, 1], [2, 2], cpu).unwrap();
        let counts = domain_counts(&st, &domains, 2)
            .unwrap()
            .to_host_f32()
            .unwrap();
        // Domain 0: token 0 → experts 0, 2. Domain 1: token 1 → 1, token 3 → 1.
        assert_eq!(counts, [1.0, 0.0, 1.0, 0.0, 2.0, 0.0]);
    }
}
