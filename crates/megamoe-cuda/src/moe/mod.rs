//! The MoE layer on the GPU in static-capacity mode: router (one kernel), deterministic
//! capacity assignment, permute into `[E, C, H]`, SwiGLU experts as strided-batched cuBLAS
//! GEMMs, deterministic weighted combine, and the backward of all of it.
//!
//! Semantics are those of megamoe-moe's CPU layer with `drop_policy = "position"` (the
//! earliest assignments in (token, slot) order are kept), no null slots and no shared
//! experts: `y = Σ_kept g · W_down · (silu(W_gate x) ⊙ W_up x)`. The router-loss terms
//! (aux, z) are not part of this layer: their gradients are zero here.

mod layer;

pub use layer::{CudaMoe, Mark, MoeGrads, MoeHostWeights};

use crate::error::{Error, Result};

/// Router score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// softmax over the experts (before top-k, or over the k chosen logits).
    Softmax,
    /// σ(z) per expert.
    Sigmoid,
}

/// How tokens are routed (mirrors megamoe-moe's `RouterConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSpec {
    /// Score function.
    pub score: Score,
    /// softmax over all experts before top-k (true) or over the chosen logits (false).
    pub pre_softmax: bool,
    /// Expert groups (1 = no group limit) and how many groups a token may use.
    pub n_groups: usize,
    /// Groups kept per token.
    pub topk_groups: usize,
    /// Renormalise the chosen gates to sum to 1.
    pub normalize: bool,
    /// Gate multiplier.
    pub route_scale: f32,
    /// Selection adds the expert-bias buffer.
    pub expert_bias: bool,
}

impl Default for RouterSpec {
    fn default() -> RouterSpec {
        RouterSpec {
            score: Score::Softmax,
            pre_softmax: true,
            n_groups: 1,
            topk_groups: 1,
            normalize: true,
            route_scale: 1.0,
            expert_bias: false,
        }
    }
}

/// Sizes of one layer call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// T: tokens.
    pub tokens: usize,
    /// H: model width.
    pub d_model: usize,
    /// F: expert hidden width.
    pub hidden: usize,
    /// E: routed experts.
    pub experts: usize,
    /// k: experts per token.
    pub top_k: usize,
    /// C: rows per expert buffer.
    pub capacity: usize,
}

/// Largest E the router kernel holds in registers (8 values per lane of a warp).
pub const MAX_EXPERTS: usize = 256;
/// Largest k the router kernel supports.
pub const MAX_TOP_K: usize = 16;

impl MoeShape {
    /// Checks what the kernels support; named errors otherwise.
    pub fn validate(&self, spec: &RouterSpec) -> Result<()> {
        let s = self;
        let pos = |field, v: usize| {
            if v == 0 {
                Err(Error::invalid(field, v, "must be >= 1"))
            } else {
                Ok(())
            }
        };
        pos("tokens", s.tokens)?;
        pos("d_model", s.d_model)?;
        pos("hidden", s.hidden)?;
        pos("experts", s.experts)?;
        pos("capacity", s.capacity)?;
        if s.experts > MAX_EXPERTS {
            return Err(Error::invalid(
                "experts",
                s.experts,
                "the CUDA router supports at most 256 experts",
            ));
        }
        if s.top_k == 0 || s.top_k > s.experts.min(MAX_TOP_K) {
            return Err(Error::invalid(
                "top_k",
                s.top_k,
                "must be in 1..=min(experts, 16)",
            ));
        }
        if !s.d_model.is_multiple_of(8) {
            return Err(Error::invalid(
                "d_model",
                s.d_model,
                "must be a multiple of 8 (16-byte rows)",
            ));
        }
        if !s.hidden.is_multiple_of(8) {
            return Err(Error::invalid(
                "hidden",
                s.hidden,
                "must be a multiple of 8 (16-byte rows)",
            ));
        }
        let g = spec.n_groups;
        if g == 0 || g > 32 || !s.experts.is_multiple_of(g) {
            return Err(Error::invalid(
                "n_groups",
                g,
                "must be in 1..=32 and divide experts",
            ));
        }
        if spec.topk_groups == 0 || spec.topk_groups > g {
            return Err(Error::invalid(
                "topk_groups",
                spec.topk_groups,
                "must be in 1..=n_groups",
            ));
        }
        if s.top_k > spec.topk_groups * (s.experts / g) {
            return Err(Error::invalid(
                "top_k",
                s.top_k,
                "must be <= topk_groups * experts / n_groups (experts left after the group mask)",
            ));
        }
        let rows = s.experts.checked_mul(s.capacity);
        let fits = |v: Option<usize>| v.is_some_and(|v| v < i32::MAX as usize);
        if !fits(rows) || !fits(s.tokens.checked_mul(s.top_k)) {
            return Err(Error::invalid(
                "experts * capacity",
                format!("{}*{}", s.experts, s.capacity),
                "row indices must fit in i32",
            ));
        }
        if !(spec.route_scale.is_finite() && spec.route_scale > 0.0) {
            return Err(Error::invalid(
                "route_scale",
                spec.route_scale,
                "must be > 0",
            ));
        }
        Ok(())
    }

    /// Useful FLOPs of one forward (6·T·k·d·h: three GEMMs of 2·T·k·d·h).
    pub fn forward_flops(&self) -> f64 {
        6.0 * self.tokens as f64 * self.top_k as f64 * self.d_model as f64 * self.hidden as f64
    }
}
