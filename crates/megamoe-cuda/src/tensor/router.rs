//! The fused router forward (`route_tokens` in router.cu, compiled into the routing module):
//! pool logits → softmax statistics, scores, selection (+ expert bias, group-limited mask),
//! top-k, raw gates, null-slot mask, renormalisation and scale in one launch, one thread per
//! token. megamoe-tensor's `Tensor::route` calls it on CUDA; its semantics are that op's
//! composed definition (`route_composed`), each step with the formula of the kernel it
//! replaces.

use crate::device::{arg, Gpu};
use crate::error::{Error, Result};

use super::routing::{int, RouteKernels};

/// Most pool slots (`E + n_null`) [`RouteKernels::route_tokens`] takes (its per-thread array).
pub const ROUTE_MAX_POOL: usize = 256;
/// Most slots per token [`RouteKernels::route_tokens`] takes.
pub const ROUTE_MAX_K: usize = 64;
/// Threads per block of the fused router (small: one thread per token, few tokens per SM).
const ROUTE_BLOCK: u32 = 64;

/// How the fused router scores the pool logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteScoreFn {
    /// softmax over the pool, before top-k.
    Softmax,
    /// σ(z).
    Sigmoid,
    /// The logits themselves; the gates are the softmax of the k chosen logits.
    SoftmaxAfterTopk,
}

/// Shapes and options of one [`RouteKernels::route_tokens`] launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteShape {
    /// Tokens (rows of the logits).
    pub rows: usize,
    /// Pool slots `E + n_null` (columns of the logits).
    pub pool: usize,
    /// Routed experts `E` (slots `≥ E` are null copies: gate 0).
    pub n_real: usize,
    /// Slots per token.
    pub k: usize,
    /// Scores.
    pub score_fn: RouteScoreFn,
    /// `(n_groups, topk_groups)` of the group-limited mask.
    pub groups: Option<(usize, usize)>,
    /// ε of the renormalisation `g / (Σ g + ε)`.
    pub eps: f32,
    /// Gate multiplier.
    pub scale: f32,
}

/// Output addresses of [`RouteKernels::route_tokens`] (the saved inputs of its backward;
/// `gates` and `lse` are not read there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOut {
    /// `[rows, k]` i32 chosen pool slots, best first.
    pub slots: u64,
    /// `[rows, k]` f32 gates (masked, renormalised, scaled).
    pub gates: u64,
    /// `[rows, k]` f32 raw gates of the chosen slots.
    pub g_raw: u64,
    /// `[rows, k]` f32 masked raw gates; `Some` renormalises.
    pub g_masked: Option<u64>,
    /// `[rows, pool]` f32 softmax of the logits.
    pub probs: u64,
    /// `[rows]` f32 logsumexp of the logits.
    pub lse: u64,
}

/// The router losses' terms [`RouteKernels::route_tokens_bwd`] adds to the gate gradient.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RouteLossArgs {
    /// `[rows, pool]` f32 ∂aux/∂p: adds `softmax_backward(probs, coeff · aux_scale)`.
    pub aux_coeff: Option<u64>,
    /// Multiplier of `aux_coeff`.
    pub aux_scale: f32,
    /// `[rows]` f32 logsumexp of the logits: adds `probs · (lse · z_scale)` per row.
    pub lse: Option<u64>,
    /// Multiplier of `lse`.
    pub z_scale: f32,
}

impl RouteScoreFn {
    /// The kernels' `score_fn` code.
    fn code(self) -> i32 {
        match self {
            RouteScoreFn::Softmax => 0,
            RouteScoreFn::Sigmoid => 1,
            RouteScoreFn::SoftmaxAfterTopk => 2,
        }
    }
}

impl RouteShape {
    /// [`RouteShape::check`], then `(rows, pool, n_real, k)` as the kernels' i32 arguments.
    fn dims(&self) -> Result<(i32, i32, i32, i32)> {
        self.check()?;
        Ok((
            int("rows", self.rows)?,
            int("pool", self.pool)?,
            int("n_real", self.n_real)?,
            int("k", self.k)?,
        ))
    }

    /// Checks the kernel's limits: `pool ≤ 256`, `1 ≤ k ≤ min(64, pool)`, `n_real ≤ pool`,
    /// groups `1 ≤ topk_groups ≤ n_groups ≤ 256` dividing the pool.
    pub fn check(&self) -> Result<()> {
        if self.pool == 0 || self.pool > ROUTE_MAX_POOL {
            return Err(Error::invalid(
                "pool",
                self.pool,
                "the fused router takes 1..=256 pool slots",
            ));
        }
        if self.k == 0 || self.k > ROUTE_MAX_K || self.k > self.pool {
            return Err(Error::invalid(
                "k",
                self.k,
                "the fused router takes 1..=64 slots per token, at most the pool",
            ));
        }
        if self.n_real > self.pool {
            return Err(Error::invalid("n_real", self.n_real, "must be <= the pool"));
        }
        if let Some((g, m)) = self.groups {
            if g == 0 || g > super::MAX_GROUPS || m == 0 || m > g || !self.pool.is_multiple_of(g) {
                return Err(Error::invalid(
                    "n_groups",
                    g,
                    "must be in 1..=256, divide the pool and be >= topk_groups >= 1",
                ));
            }
        }
        Ok(())
    }
}

impl RouteKernels {
    /// The fused router forward of `z [rows, pool]` f32 (`bias [n_real]` f32 optional) into
    /// `out` (see [`RouteOut`]).
    ///
    /// # Safety
    /// Each address must be a live device allocation of the GPU's context holding the
    /// elements [`RouteOut`] and this doc name; outputs do not overlap each other or inputs.
    pub unsafe fn route_tokens(
        &self,
        gpu: &Gpu,
        z: u64,
        bias: Option<u64>,
        shape: &RouteShape,
        out: &RouteOut,
    ) -> Result<()> {
        let (rows, ep, e, k) = shape.dims()?;
        if rows == 0 {
            return Ok(());
        }
        let score = shape.score_fn.code();
        let (g, m) = shape.groups.map_or((0, 0), |(g, m)| (g as i32, m as i32));
        let (eps, scale) = (shape.eps, shape.scale);
        let bp = bias.unwrap_or(0);
        let gm = out.g_masked.unwrap_or(0);
        let blocks = shape.rows.div_ceil(ROUTE_BLOCK as usize) as u32;
        self.go(
            gpu,
            self.k.route_tokens,
            blocks,
            ROUTE_BLOCK,
            &mut [
                arg(&z),
                arg(&bp),
                arg(&rows),
                arg(&ep),
                arg(&e),
                arg(&k),
                arg(&score),
                arg(&g),
                arg(&m),
                arg(&eps),
                arg(&scale),
                arg(&out.slots),
                arg(&out.gates),
                arg(&out.g_raw),
                arg(&gm),
                arg(&out.probs),
                arg(&out.lse),
            ],
        )
    }

    /// Backward of [`RouteKernels::route_tokens`] with the choice held fixed: `d_gates
    /// [rows, k]` f32 → `d_z [rows, pool]` f32 (written fresh), from the forward's `slots`,
    /// `g_raw`, `g_masked` (`Some` iff renormalised) and `probs`; then the router losses'
    /// terms of `losses` added, in this order.
    ///
    /// A slot outside `0..pool` is reported in `err` (code 13) and its token's row zeroed.
    ///
    /// # Safety
    /// As [`RouteKernels::route_tokens`]; `d_z` does not overlap the inputs; `err` is the
    /// caller's four-i32 error record.
    pub unsafe fn route_tokens_bwd(
        &self,
        gpu: &Gpu,
        d_gates: u64,
        saved: &RouteOut,
        shape: &RouteShape,
        losses: &RouteLossArgs,
        (d_z, err): (u64, u64),
    ) -> Result<()> {
        let (rows, ep, e, k) = shape.dims()?;
        if rows == 0 {
            return Ok(());
        }
        let score = shape.score_fn.code();
        let (eps, scale) = (shape.eps, shape.scale);
        let gm = saved.g_masked.unwrap_or(0);
        let (coeff, lse) = (losses.aux_coeff.unwrap_or(0), losses.lse.unwrap_or(0));
        let blocks = shape.rows.div_ceil(ROUTE_BLOCK as usize) as u32;
        self.go(
            gpu,
            self.k.route_tokens_bwd,
            blocks,
            ROUTE_BLOCK,
            &mut [
                arg(&d_gates),
                arg(&saved.slots),
                arg(&saved.g_raw),
                arg(&gm),
                arg(&saved.probs),
                arg(&rows),
                arg(&ep),
                arg(&e),
                arg(&k),
                arg(&score),
                arg(&eps),
                arg(&scale),
                arg(&coeff),
                arg(&losses.aux_scale),
                arg(&lse),
                arg(&losses.z_scale),
                arg(&d_z),
                arg(&err),
            ],
        )
    }
}
