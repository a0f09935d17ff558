//! A pipeline step's metrics from the stages that computed them: loss parts (head
//! stages), MoE routing counts, and the per-layer values one rank's step statistics
//! carry — GateSkip kept shares, FlexiDepth kept shares and layers used, shared-expert
//! gate means — each gathered over the world so every rank reports one rank's numbers.
//!
//! Per-micro-batch values travel in a `[dp·ep·M, columns]` table: each (micro-batch,
//! layer) entry is filled by the one rank that ran that micro-batch through that layer
//! (DualPipe's two copies of a layer see different micro-batches) and is zero
//! elsewhere, so the all-reduce is exact; the host then sums the rows in micro-batch
//! order in f64, as [`crate::step_stats`] does on one rank.

use std::collections::BTreeMap;

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_model::{LossValues, ModelStats};
use megamoe_tensor::{Device, Tensor};

use super::pipeline::PipelineRank;
use crate::error::{Error, Result};
use crate::metrics::{FlexiDepthStats, GateSkipStats, LossParts, MoeLayerStats};
use crate::step_stats::StepSums;

/// What one forward of a layer reported besides routing counts (host values).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct LayerValues {
    /// GateSkip (attention, MLP) kept shares.
    gate: Option<(f64, f64)>,
    /// FlexiDepth: the share of tokens on the full path.
    flexi_kept: Option<f32>,
    /// The mean shared-expert gate.
    shared_gate: Option<f32>,
}

/// The per-micro-batch values of one stage's forwards: (micro-batch, layer) → values,
/// and the head's layers used per token (FlexiDepth) per micro-batch.
#[derive(Debug, Default)]
pub(crate) struct StageValues {
    layers: BTreeMap<(usize, usize), LayerValues>,
    layers_used: BTreeMap<usize, f32>,
}

impl StageValues {
    /// Records micro-batch `mb`'s forward statistics.
    pub(crate) fn record(&mut self, mb: usize, stats: &ModelStats) -> Result<()> {
        for layer in &stats.layers {
            let block = &layer.block;
            let flexi_kept = match &block.full_path {
                // SYNC: one read per FlexiDepth layer per micro-batch, for the metrics line.
                Some(full) => Some(full.mean_all()?.to_scalar_f32()?),
                None => None,
            };
            let shared_gate = match block
                .moe
                .as_ref()
                .and_then(|m| m.stats.shared_gate_mean.as_ref())
            {
                // SYNC: one read per gated MoE layer per micro-batch, for the metrics line.
                Some(g) => Some(g.to_scalar_f32()?),
                None => None,
            };
            let v = LayerValues {
                gate: block.kept_fraction,
                flexi_kept,
                shared_gate,
            };
            if v != LayerValues::default() {
                self.layers.insert((mb, layer.layer), v);
            }
        }
        if let Some(used) = &stats.layers_used {
            // SYNC: one read per micro-batch on the head stage, for the metrics line.
            self.layers_used
                .insert(mb, used.mean_all()?.to_scalar_f32()?);
        }
        Ok(())
    }

    /// Adds another stage's values (a rank's stages run different layers).
    pub(crate) fn extend(&mut self, other: StageValues) {
        self.layers.extend(other.layers);
        self.layers_used.extend(other.layers_used);
    }
}

/// Columns of one layer in the values table: gate flag, attention and MLP shares as
/// (f32 high, f32 low) pairs (f64 through f32 messages), FlexiDepth flag and share,
/// shared-gate flag and mean.
const LAYER_COLUMNS: usize = 9;

/// Splits an f64 into two f32 whose f64 sum is it to ~2⁻⁴⁸ relative.
fn split(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - hi as f64) as f32]
}

/// The step's per-layer statistics, as one rank's step metrics report them.
pub(crate) struct LayerStats {
    pub gate_skip: Vec<GateSkipStats>,
    pub flexi_depth: Option<FlexiDepthStats>,
    /// layer → mean shared-expert gate.
    pub shared_gate: BTreeMap<usize, f64>,
}

impl PipelineRank {
    /// The step's GateSkip / FlexiDepth statistics and shared-gate means from every
    /// rank's `values` (local micro-batch `mb` is row `first + mb`). Collective over
    /// `world`.
    pub(super) fn gather_layer_values(
        &self,
        world: &dyn Communicator,
        first: usize,
        values: &StageValues,
    ) -> Result<LayerStats> {
        let layers = self.plan.model.n_layers;
        let m = self.plan.batch.microbatches * self.data_replicas;
        let k = layers * LAYER_COLUMNS + 2;
        let mut rows = vec![0.0f32; m * k];
        let row_of = |local: usize| {
            let mb = first + local;
            (mb < m).then_some(mb).ok_or_else(|| outside(mb, m))
        };
        for (&(local, l), v) in &values.layers {
            let mb = row_of(local)?;
            if l >= layers {
                continue;
            }
            let c = &mut rows[mb * k + l * LAYER_COLUMNS..mb * k + (l + 1) * LAYER_COLUMNS];
            if let Some((a, p)) = v.gate {
                let (a, p) = (split(a), split(p));
                c[..5].copy_from_slice(&[1.0, a[0], a[1], p[0], p[1]]);
            }
            if let Some(f) = v.flexi_kept {
                c[5..7].copy_from_slice(&[1.0, f]);
            }
            if let Some(g) = v.shared_gate {
                c[7..9].copy_from_slice(&[1.0, g]);
            }
        }
        for (&local, &used) in &values.layers_used {
            let mb = row_of(local)?;
            rows[mb * k + k - 2..(mb + 1) * k].copy_from_slice(&[1.0, used]);
        }
        let table = Tensor::from_vec_f32(rows, [m, k], Device::Cpu)?;
        let all = world.all_reduce(&table, ReduceOp::Sum)?.to_host_f32()?;
        let mut sums = StepSums {
            micro_batches: m,
            ..StepSums::default()
        };
        let mut shared: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for mb in 0..m {
            let row = &all[mb * k..(mb + 1) * k];
            for l in 0..layers {
                let c = &row[l * LAYER_COLUMNS..(l + 1) * LAYER_COLUMNS];
                if c[0] == 1.0 {
                    let e = sums.gate_skip.entry(l).or_default();
                    e.0 += c[1] as f64 + c[2] as f64;
                    e.1 += c[3] as f64 + c[4] as f64;
                }
                if c[5] == 1.0 {
                    *sums.flexi_kept.entry(l).or_default() += c[6] as f64;
                }
                if c[7] == 1.0 {
                    let g = shared.entry(l).or_insert((0.0, 0));
                    g.0 += c[8] as f64;
                    g.1 += 1;
                }
            }
            if row[k - 2] == 1.0 {
                sums.layers_used += row[k - 1] as f64;
            }
        }
        Ok(LayerStats {
            gate_skip: sums.gate_skip_stats(),
            flexi_depth: sums.flexi_depth_stats(layers),
            shared_gate: shared
                .into_iter()
                .map(|(l, (s, n))| (l, s / n.max(1) as f64))
                .collect(),
        })
    }

    /// Every MoE layer's routing statistics over the step: a `[layers, E + 5 + D·E]`
    /// table (picks per expert, null picks, tokens, kept assignments, slots per token, 1,
    /// and with D > 1 data domains the kept assignments per (domain, expert)), each
    /// layer's row summed over the micro-batches of the ranks holding it, all-reduced
    /// over the world (integer counts in f32: exact).
    pub(super) fn gather_routing(
        &self,
        world: &dyn Communicator,
        picks: &BTreeMap<usize, Vec<f32>>,
        routing: &BTreeMap<usize, ([f32; 3], usize)>,
        by_domain: &BTreeMap<usize, Vec<f32>>,
    ) -> Result<Vec<MoeLayerStats>> {
        let Some(moe) = &self.plan.moe else {
            return Ok(Vec::new());
        };
        let (layers, e) = (self.plan.model.n_layers, moe.routed_experts);
        let d = if self.num_domains > 1 {
            self.num_domains
        } else {
            0
        };
        let k = e + 5 + d * e;
        let mut table = vec![0.0f32; layers * k];
        for (&l, p) in picks {
            if let (true, Some((v, slots))) = (l < layers && p.len() == e, routing.get(&l)) {
                let row = &mut table[l * k..(l + 1) * k];
                row[..e].copy_from_slice(p);
                row[e..e + 3].copy_from_slice(v);
                row[e + 3] = *slots as f32;
                row[e + 4] = 1.0;
                if let Some(c) = by_domain.get(&l).filter(|c| c.len() == d * e) {
                    row[e + 5..].copy_from_slice(c);
                }
            }
        }
        let t = Tensor::from_vec_f32(table, [layers, k], Device::Cpu)?;
        let all = world.all_reduce(&t, ReduceOp::Sum)?.to_host_f32()?;
        let mut out = Vec::new();
        for l in 0..layers {
            let row = &all[l * k..(l + 1) * k];
            if row[e + 4] == 0.0 {
                continue; // a dense layer
            }
            // Every rank holding the layer wrote the same slots per token.
            let slots = (row[e + 3] / row[e + 4]).round() as usize;
            let counts: Vec<u64> = row[..e].iter().map(|&x| x as u64).collect();
            let total: u64 = counts.iter().sum();
            let kept = row[e + 2] as u64;
            let mut stats = MoeLayerStats::from_counts(
                l,
                counts,
                total.saturating_sub(kept),
                row[e] as u64,
                row[e + 1] as u64,
                slots,
            );
            stats.tokens_per_expert_by_domain = row[e + 5..]
                .chunks(e.max(1))
                .map(|c| c.iter().map(|&x| x.max(0.0) as u64).collect())
                .collect();
            out.push(stats);
        }
        Ok(out)
    }

    /// The step's mean loss parts from the head stages' per-micro-batch values: a
    /// `[dp·ep·M, 7 + mtp depth]` table, each row filled on the rank that owns it (local
    /// micro-batch `mb` is row `first + mb`) and zero elsewhere, summed over the world
    /// (exact), then averaged in micro-batch order.
    pub(super) fn gather_losses(
        &self,
        comm: &dyn Communicator,
        first: usize,
        losses: &BTreeMap<usize, LossValues>,
    ) -> Result<(LossParts, Vec<f64>)> {
        let p = &self.plan;
        let m = p.batch.microbatches * self.data_replicas;
        let depth = p.mtp.as_ref().map_or(0, |t| t.depth);
        let k = 7 + depth;
        let mut rows = vec![0.0f32; m * k];
        for (&local, v) in losses {
            let mb = first + local;
            if mb >= m {
                return Err(outside(mb, m));
            }
            let r = &mut rows[mb * k..(mb + 1) * k];
            r[..7].copy_from_slice(&[
                1.0,
                v.lm_loss,
                v.aux,
                v.z,
                v.gate_skip,
                v.flexi_depth,
                v.total,
            ]);
            for (j, x) in v.mtp_losses.iter().take(depth).enumerate() {
                r[7 + j] = *x;
            }
        }
        let table = Tensor::from_vec_f32(rows, [m, k], Device::Cpu)?;
        let all = comm.all_reduce(&table, ReduceOp::Sum)?.to_host_f32()?;
        let mut sum = LossParts::default();
        let mut mtp = vec![0.0f64; depth];
        for mb in 0..m {
            let r = &all[mb * k..(mb + 1) * k];
            if r[0] != 1.0 {
                return Err(Error::TrainConfig {
                    field: "parallel.schedule",
                    value: format!("{}", p.parallel.schedule),
                    rule: format!("micro-batch {mb} got {} losses instead of 1", r[0]),
                });
            }
            sum.total += r[6] as f64;
            sum.lm += r[1] as f64;
            if let Some(t) = &p.mtp {
                for (j, w) in t.step_weights.iter().enumerate().take(depth) {
                    sum.mtp += t.loss_weight * w * r[7 + j] as f64;
                    mtp[j] += r[7 + j] as f64;
                }
            }
            if let Some(moe) = &p.moe {
                sum.aux += moe.aux_loss_weight * r[2] as f64;
                sum.z += moe.z_loss_weight * r[3] as f64;
            }
            if let Some(g) = &p.gate_skip {
                sum.skip += g.sparsity_weight * r[4] as f64;
            }
            if let Some(f) = &p.flexi_depth {
                sum.skip += f.skip_loss_weight * r[5] as f64;
            }
        }
        let n = m.max(1) as f64;
        let loss = LossParts {
            total: sum.total / n,
            lm: sum.lm / n,
            mtp: sum.mtp / n,
            aux: sum.aux / n,
            z: sum.z / n,
            skip: sum.skip / n,
        };
        Ok((loss, mtp.into_iter().map(|x| x / n).collect()))
    }
}

fn outside(mb: usize, m: usize) -> Error {
    Error::TrainConfig {
        field: "parallel.microbatches",
        value: m.to_string(),
        rule: format!("micro-batch {mb} lies outside the step's {m}"),
    }
}
