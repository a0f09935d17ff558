//! What one forward returns besides the activation store: the unweighted loss parts with
//! their weighted total ([`LossParts`]) and the statistics ([`ModelStats`]), both as
//! tensors, each with a `to_host` that reads everything in one place (one sync per step).

use megamoe_moe::RoutingStats;
use megamoe_tensor::Tensor;

use crate::block::BlockOutputs;
use crate::error::Result;

/// Unweighted loss parts of one forward (rank-0 tensors) and their weighted total.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// Next-token CE (`lm_loss`).
    pub lm_loss: Tensor,
    /// `CE_k`, k = 1..K (`mtp_losses`).
    pub mtp_losses: Vec<Tensor>,
    /// Σ over MoE layers of the balancing loss.
    pub aux: Tensor,
    /// Σ over MoE layers of the z-loss.
    pub z: Tensor,
    /// GateSkip sparsity penalty: mean over gated modules of mean(g²) (or mean|g|).
    pub gate_skip: Tensor,
    /// FlexiDepth `L_skip`.
    pub flexi_depth: Tensor,
    /// `lm + λ_mtp Σ w_k CE_k + w_aux·aux + w_z·z + λ_s·gate_skip + α·flexi_depth`.
    pub total: Tensor,
}

/// [`LossParts`] read on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct LossValues {
    /// Next-token CE.
    pub lm_loss: f32,
    /// `CE_k`.
    pub mtp_losses: Vec<f32>,
    /// MoE aux (unweighted, summed over layers).
    pub aux: f32,
    /// MoE z (unweighted, summed over layers).
    pub z: f32,
    /// GateSkip penalty (unweighted).
    pub gate_skip: f32,
    /// FlexiDepth skip loss (unweighted).
    pub flexi_depth: f32,
    /// Weighted total.
    pub total: f32,
}

impl LossParts {
    /// Reads every part, in one batched host read.
    pub fn to_host(&self) -> Result<LossValues> {
        let mut all: Vec<&Tensor> = vec![
            &self.lm_loss,
            &self.aux,
            &self.z,
            &self.gate_skip,
            &self.flexi_depth,
            &self.total,
        ];
        all.extend(self.mtp_losses.iter());
        // SYNC: loss parts are read for logging and the NaN guard: one read for all parts.
        let host = Tensor::to_host_batch_f32(&all)?;
        let first = |i: usize| host[i].first().copied().unwrap_or(f32::NAN);
        Ok(LossValues {
            lm_loss: first(0),
            mtp_losses: (6..host.len()).map(first).collect(),
            aux: first(1),
            z: first(2),
            gate_skip: first(3),
            flexi_depth: first(4),
            total: first(5),
        })
    }
}

/// Per-layer statistics (tensors; see [`ModelStats::to_host`]).
#[derive(Debug, Clone)]
pub struct LayerStats {
    /// Layer index.
    pub layer: usize,
    /// The block's outputs (gate means, kept shares, router scores, MoE stats).
    pub block: BlockOutputs,
}

/// Statistics of one forward.
#[derive(Debug, Clone)]
pub struct ModelStats {
    /// One entry per layer.
    pub layers: Vec<LayerStats>,
    /// FlexiDepth: layers used per token `[N]` (non-adaptive layers + full-path picks).
    pub layers_used: Option<Tensor>,
}

/// [`ModelStats`] on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsValues {
    /// GateSkip: per layer `(attn kept share, mlp kept share)`.
    pub gate_skip_kept: Vec<(f64, f64)>,
    /// GateSkip: per layer `(attn mean gate, mlp mean gate)`.
    pub gate_skip_mean_gate: Vec<(f32, f32)>,
    /// FlexiDepth: mean layers used per token.
    pub layers_used_mean: Option<f64>,
    /// FlexiDepth: histogram of layers used, index = layer count 0..=L.
    pub layers_used_hist: Option<Vec<usize>>,
    /// MoE: per MoE layer `(layer, routing stats)` (tokens per expert, dropped, null share).
    pub moe: Vec<(usize, RoutingStats)>,
}

impl ModelStats {
    /// Reads the statistics (one sync).
    pub fn to_host(&self, n_layers: usize) -> Result<StatsValues> {
        let mut kept = Vec::new();
        let mut mean = Vec::new();
        let mut moe = Vec::new();
        for l in &self.layers {
            if let Some(m) = &l.block.moe {
                // SYNC: stats are read once per step.
                moe.push((l.layer, m.stats.to_host()?));
            }
            if let Some(k) = l.block.kept_fraction {
                kept.push(k);
            }
            if let Some((a, m)) = &l.block.mean_gate {
                // SYNC: stats are read once per step.
                mean.push((a.to_scalar_f32()?, m.to_scalar_f32()?));
            }
        }
        let (used_mean, hist) = match &self.layers_used {
            Some(u) => {
                // SYNC: stats are read once per step.
                let v = u.to_host_f32()?;
                let mut h = vec![0usize; n_layers + 1];
                for &c in &v {
                    h[(c.round() as usize).min(n_layers)] += 1;
                }
                let m = v.iter().map(|&c| c as f64).sum::<f64>() / v.len().max(1) as f64;
                (Some(m), Some(h))
            }
            None => (None, None),
        };
        Ok(StatsValues {
            gate_skip_kept: kept,
            gate_skip_mean_gate: mean,
            layers_used_mean: used_mean,
            layers_used_hist: hist,
            moe,
        })
    }
}
