//! Routing statistics of one call: tokens per expert, dropped assignments, null share,
//! mean real experts per token, max/mean load, the kept expert of every (token, slot)
//! and the mean shared-expert gate.
//!
//! The layer returns [`MoeStats`] as device tensors (no sync in forward beyond the one
//! dispatch already makes); [`MoeStats::to_host`] reads them once into [`RoutingStats`].
//! [`MoeStats::token_experts`] stays on the device: callers that need it (expert load by
//! data domain) read it themselves.

use megamoe_tensor::Tensor;

use crate::error::Result;

/// Per-call routing counts, on the device.
#[derive(Debug, Clone)]
pub struct MoeStats {
    /// `[1, Ep]` f32: picks per pool slot before capacity (real experts, then null copies).
    pub picks_per_slot: Tensor,
    /// `[E]` i32: assignments kept per routed expert after capacity.
    pub tokens_per_expert: Tensor,
    /// E.
    pub num_routed_experts: usize,
    /// N tokens of the call.
    pub tokens: usize,
    /// K slots per token.
    pub slots_per_token: usize,
    /// `[N, K]` i32: the routed expert each (token, slot) assignment went to after
    /// capacity, `-1` for a null slot or a dropped assignment (see [`kept_expert_ids`]).
    /// Row `n` is token `n` of the call's input; the non-negative entries of expert `e`
    /// number `tokens_per_expert[e]`.
    pub token_experts: Tensor,
    /// Rank-0 f32 mean over the call's tokens of the shared-expert gate `σ(x · w_gᵀ)`;
    /// `Some` iff the layer has shared experts with `moe.shared_expert_gate = true`.
    pub shared_gate_mean: Option<Tensor>,
}

/// `[N, K]` i32 kept expert per assignment: `slots[n, k]` where `keep[n, k] = 1`, else
/// `-1` (`slots` `[N, K]` i32 pool indices, `keep` `[N, K]` f32 1/0 from capacity, which
/// is 0 on null slots), on the device ([`Tensor::kept_slots`]: one kernel).
pub fn kept_expert_ids(slots: &Tensor, keep: &Tensor) -> Result<Tensor> {
    Ok(slots.kept_slots(keep)?)
}

/// The same counts on the host, with the derived numbers the step log prints.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    /// Assignments kept per routed expert.
    pub tokens_per_expert: Vec<usize>,
    /// Real-expert assignments dropped by capacity.
    pub dropped: usize,
    /// Real-expert picks before capacity.
    pub real_picks: usize,
    /// Null-slot picks.
    pub null_picks: usize,
    /// null_picks / (N·K).
    pub null_share: f64,
    /// real_picks / N (before capacity: the router's choice).
    pub mean_real_experts_per_token: f64,
    /// max / mean of tokens_per_expert (1.0 = perfectly balanced; 0 when nothing is kept).
    pub max_over_mean_load: f64,
    /// Mean shared-expert gate value over the call's tokens (`None` without the gate).
    pub shared_gate_mean: Option<f64>,
}

impl MoeStats {
    /// Reads the counts to the host and derives the stats.
    pub fn to_host(&self) -> Result<RoutingStats> {
        let e = self.num_routed_experts;
        // SYNC: stats are read once per call, after the step's compute is queued.
        let picks = self.picks_per_slot.to_host_f32()?;
        let kept: Vec<usize> = self
            .tokens_per_expert
            .to_host_i32()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let real_picks = picks[..e].iter().map(|&c| c as usize).sum::<usize>();
        let null_picks = picks[e..].iter().map(|&c| c as usize).sum::<usize>();
        let kept_total: usize = kept.iter().sum();
        let mean = kept_total as f64 / e as f64;
        let max = kept.iter().copied().max().unwrap_or(0) as f64;
        let slots = (self.tokens * self.slots_per_token).max(1) as f64;
        Ok(RoutingStats {
            dropped: real_picks - kept_total,
            real_picks,
            null_picks,
            null_share: null_picks as f64 / slots,
            mean_real_experts_per_token: real_picks as f64 / self.tokens.max(1) as f64,
            max_over_mean_load: if mean > 0.0 { max / mean } else { 0.0 },
            tokens_per_expert: kept,
            shared_gate_mean: match &self.shared_gate_mean {
                // SYNC: one scalar, read with the counts above.
                Some(g) => Some(g.to_scalar_f32()? as f64),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MoeConfig, MoeLayer, MoeParams};
    use megamoe_tensor::Device;

    /// A config from a `[moe]` body on a tiny model (d_model 6, seq_len 4).
    fn config(moe: &str) -> MoeConfig {
        let text = format!(
            "[model]\nvocab_size = 16\nd_model = 6\nn_layers = 1\nn_heads = 1\n\
             ffn_hidden = 8\nseq_len = 4\n[moe]\n{moe}\n"
        );
        MoeConfig::from_toml_str(&text).unwrap()
    }

    /// `[rows.len(), 6]` with row n = Σ (dim, value) of `rows[n]`.
    fn rows(rows: &[&[(usize, f32)]]) -> Tensor {
        let mut v = vec![0.0; rows.len() * 6];
        for (n, r) in rows.iter().enumerate() {
            for &(d, x) in *r {
                v[n * 6 + d] = x;
            }
        }
        Tensor::from_vec_f32(v, [rows.len(), 6], Device::Cpu).unwrap()
    }

    /// Router weight `[4, 6]` with `W[e, e] = 1`: expert e's logit is `x[e]`.
    fn identity_router() -> Tensor {
        rows(&[&[(0, 1.0)], &[(1, 1.0)], &[(2, 1.0)], &[(3, 1.0)]])
    }

    fn sigmoid(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }

    #[test]
    fn token_experts_mark_dropped_assignments_and_gate_mean_matches_hand_values() {
        // E = 4, k = 1, C = ceil(4·1/4·1.0) = 1, position policy. Tokens pick experts
        // 2, 2, 0, 3 (logit 10 vs 0): token 1 is the second pick of expert 2 → dropped.
        let cfg = config(
            "routed_experts = 4\ntop_k = 1\nexpert_hidden = 5\ncapacity_factor = 1.0\n\
             drop_policy = \"position\"\nshared_experts = 1\nshared_expert_hidden = 3\n\
             shared_expert_gate = true",
        );
        let layer = MoeLayer::new(cfg.clone()).unwrap();
        let mut p = MoeParams::init(&cfg, 7, "").unwrap();
        p.router.weight = identity_router();
        let wg = [0.1f32, -0.2, 0.05, 0.3, 0.0, 0.0];
        p.shared_experts.as_mut().unwrap().gate =
            Some(Tensor::from_vec_f32(wg.to_vec(), [1, 6], Device::Cpu).unwrap());
        let x = rows(&[&[(2, 10.0)], &[(2, 10.0)], &[(0, 10.0)], &[(3, 10.0)]]);
        let (out, _) = layer.forward(&p, &x).unwrap();
        let st = &out.stats;
        assert_eq!(st.token_experts.dims(), [4, 1]);
        assert_eq!(st.token_experts.to_host_i32().unwrap(), vec![2, -1, 0, 3]);
        let host = st.to_host().unwrap();
        assert_eq!(host.tokens_per_expert, vec![1, 0, 1, 1]);
        assert_eq!(host.dropped, 1);
        // Gate logits x·w_g per token: 10·w_g[2], 10·w_g[2], 10·w_g[0],
        // 10·w_g[3] = 0.5, 0.5, 1.0, 3.0.
        let want = (2.0 * sigmoid(0.5) + sigmoid(1.0) + sigmoid(3.0)) / 4.0;
        let got = host.shared_gate_mean.unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn token_experts_are_minus_one_on_null_slots() {
        // E = 4, k = 1, null_rho = 0.5: K = k_max slots, null copies share the logit
        // x · w_null with w_null = e_4. Tokens: expert 1 then null; only null; expert 3
        // then null; expert 0 then null. Dropless.
        let cfg = config(
            "routed_experts = 4\ntop_k = 1\nexpert_hidden = 5\nnull_rho = 0.5\n\
             score_fn = \"sigmoid\"",
        );
        let k = cfg.router.slots_per_token();
        assert!(
            k >= 2 && cfg.router.num_null_slots() >= k,
            "test assumes K null copies"
        );
        let layer = MoeLayer::new(cfg.clone()).unwrap();
        let mut p = MoeParams::init(&cfg, 7, "").unwrap();
        p.router.weight = identity_router();
        p.router.null_weight = Some(rows(&[&[(4, 1.0)]]));
        let x = rows(&[
            &[(1, 10.0), (4, 5.0)],
            &[(4, 10.0)],
            &[(3, 10.0), (4, 5.0)],
            &[(0, 10.0), (4, 5.0)],
        ]);
        let (out, _) = layer.forward(&p, &x).unwrap();
        let mut want = vec![-1; 4 * k];
        want[0] = 1;
        want[2 * k] = 3;
        want[3 * k] = 0;
        assert_eq!(out.stats.token_experts.to_host_i32().unwrap(), want);
        assert!(out.stats.shared_gate_mean.is_none());
        assert_eq!(
            out.stats.to_host().unwrap().tokens_per_expert,
            vec![1, 1, 0, 1]
        );
    }

    #[test]
    fn token_experts_count_to_tokens_per_expert_on_random_routing() {
        // Independent tally: the non-negative ids of each expert number exactly the
        // kept assignments the dispatch layout counted.
        let cfg =
            config("routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 0.75");
        let layer = MoeLayer::new(cfg.clone()).unwrap();
        let p = MoeParams::init(&cfg, 3, "").unwrap();
        let x = Tensor::randn_named(5, "x", [12, 6], 1.0, Device::Cpu).unwrap();
        let (out, _) = layer.forward(&p, &x).unwrap();
        let ids = out.stats.token_experts.to_host_i32().unwrap();
        let mut tally = vec![0usize; 4];
        for &e in ids.iter().filter(|&&e| e >= 0) {
            tally[e as usize] += 1;
        }
        let host = out.stats.to_host().unwrap();
        assert_eq!(tally, host.tokens_per_expert);
        // C = ceil(12·2/4·0.75) = 5 per expert, so something is dropped or all fit.
        assert_eq!(tally.iter().sum::<usize>() + host.dropped, 24);
    }
}
