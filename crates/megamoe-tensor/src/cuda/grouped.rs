//! Grouped matmuls as strided-batched cuBLAS GEMMs.
//!
//! Over fixed-stride row groups (static-capacity expert buffers `[G·C, ·]`,
//! [`RowGroups::strided`]): one strided-batched GEMM over all `G` groups of `C` rows, with
//! no host read (graph-capturable). The op's contract holds for any input: rows past a
//! group's size are not multiplied — the forward zeroes them in its output, the
//! accumulating form scales them by `beta` (as the CPU backend), and the weight gradient
//! reads a copy of one operand with those rows zeroed (of each operand that needs a cast to
//! the GEMM type, the cast made in the same pass; else of the narrower one). In a MoE layer the pad rows
//! are already zero, so the masking changes no value; it only costs a pass over one operand.
//! Groups whose caller promises zero pad rows ([`RowGroups::with_zero_pad_rows`], the
//! static-capacity MoE layer) skip the forward's zeroing (zero rows give zero output rows)
//! and the weight gradient's mask copy when both operands are of the GEMM type already
//! (zero rows contribute nothing); an operand that needs a cast is still cast and masked
//! in one pass (the pass is needed anyway, and it skips reading the pad rows).
//! The forward writes the activation dtype (bf16 in bf16-activation mode: cuBLAS rounds the
//! f32 accumulator once); the accumulating form and the weight gradient accumulate in f32.
//!
//! Over packed row groups whose sizes are on the host (a dropless MoE layer reads its expert
//! counts once per layer), [`packed_plan`] picks per call: equal groups covering the rows run
//! as one strided-batched GEMM in place; groups averaging [`PER_GROUP_ROWS`] rows or more
//! run one GEMM per group (each fills the GPU; measured faster than padding at gpu_1b);
//! smaller groups, when padding every group to the largest one (rounded up to a bucket,
//! [`bucket`]) costs at most [`PAD_LIMIT`]× the real rows' FLOPs, are copied to a
//! `[G, C, ·]` buffer (pad rows zero), multiplied by one strided-batched GEMM and copied back
//! (the weight gradient pads both operands); else (one group, or a skew where padding costs
//! more) one GEMM per group (`matmul.rs`). Pad rows
//! contribute exact zeros, so every plan gives each real row the same products up to the
//! GEMM's own rounding.

use megamoe_cuda::tensor::Dev;
use megamoe_cuda::{Elem, Operand};

use super::matmul::{elem, operand};
use super::routing::ids;
use super::{dev, kdt, CudaBackend};
use crate::ops::matmul::{grouped_dims, wgrad_dims};
use crate::{DType, Result, RowGroups, Tensor};

/// Most padded rows per real row a padded plan may run: padding all groups to the largest
/// one is chosen while `G · C ≤ PAD_LIMIT · Σ sizes` (a FLOP estimate: the padded rows'
/// work against per-group GEMMs too small to fill the GPU).
pub(super) const PAD_LIMIT: usize = 2;

/// Groups averaging at least this many rows run one GEMM per group: each GEMM then fills
/// the GPU on its own, and padding would only add its copies (on an H200 at the gpu_1b
/// expert shape, ~2k rows per group, the padded plan was not faster: docs/perf.md).
pub(super) const PER_GROUP_ROWS: usize = 1024;

/// How a grouped GEMM over packed groups (host spans) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PackedPlan {
    /// One GEMM per non-empty group.
    PerGroup,
    /// Equal groups, back to back from row 0 and covering every row: one strided-batched
    /// GEMM with this stride, in place.
    Strided(usize),
    /// Copy to `[G, C, ·]` with this C (pad rows zero), one strided-batched GEMM, copy back.
    Padded(usize),
}

/// The padded group size for a largest group of `max` rows: `max` rounded up to a multiple
/// of `2^(⌊log2 max⌋ − 4)` (at least 8), so at most 1/16 above `max` and few distinct
/// shapes (e.g. 2000 → 2048 in steps of 64, 2100 → 2176 in steps of 128).
pub(super) use megamoe_cuda::gemm_bucket::bucket;

/// The plan for packed groups `spans` (`(offset, size)`, checked) over `rows` rows.
pub(super) fn packed_plan(spans: &[(usize, usize)], rows: usize) -> PackedPlan {
    let total: usize = spans.iter().map(|s| s.1).sum();
    let max = spans.iter().map(|s| s.1).max().unwrap_or(0);
    if spans.len() <= 1 || total == 0 {
        return PackedPlan::PerGroup;
    }
    let back_to_back = spans
        .iter()
        .enumerate()
        .all(|(g, &(o, s))| s == max && o == g * max);
    if back_to_back && total == rows {
        return PackedPlan::Strided(max);
    }
    let cap = bucket(max);
    if total >= PER_GROUP_ROWS * spans.len() {
        return PackedPlan::PerGroup;
    }
    if spans.len() * cap <= PAD_LIMIT * total {
        PackedPlan::Padded(cap)
    } else {
        PackedPlan::PerGroup
    }
}

/// The variable that overrides [`packed_plan`] for A/B timing: `auto` (the default),
/// `per-group` or `padded` (every call with rows, padded to the bucket of its largest group).
pub(super) const PACKED_GEMM_VAR: &str = "MEGAMOE_CUDA_PACKED_GEMM";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackedMode {
    Auto,
    PerGroup,
    Padded,
}

/// [`PACKED_GEMM_VAR`], read once per process (`Err`: the value it had).
fn packed_mode() -> std::result::Result<PackedMode, String> {
    static MODE: std::sync::OnceLock<std::result::Result<PackedMode, String>> =
        std::sync::OnceLock::new();
    MODE.get_or_init(|| match std::env::var(PACKED_GEMM_VAR) {
        Err(_) => Ok(PackedMode::Auto),
        Ok(v) => match v.as_str() {
            "" | "auto" => Ok(PackedMode::Auto),
            "per-group" => Ok(PackedMode::PerGroup),
            "padded" => Ok(PackedMode::Padded),
            _ => Err(v),
        },
    })
    .clone()
}

/// The variable setting how many streams a per-group plan spreads its GEMMs over
/// (`1` to `4`, lane `i mod n` for the `i`-th non-empty group; megamoe-cuda's GEMM lanes):
/// concurrent GEMMs fill the SMs one GEMM's ramp-up and tail leave idle. Every lane picks
/// the same algorithms, so the results do not depend on it.
pub(super) const GEMM_STREAMS_VAR: &str = "MEGAMOE_CUDA_GEMM_STREAMS";

/// Streams of a per-group plan when [`GEMM_STREAMS_VAR`] is unset.
pub(super) const GEMM_STREAMS: usize = 1;

/// The variable choosing how a per-group plan picks each GEMM's algorithm: `bucket`
/// (cuBLASLt, one algorithm per bucket of the group's row count, chosen once: no heuristic
/// query per new row count; megamoe-cuda `Gpu::gemm_bucketed`) or `exact` (the engine's
/// GEMM path, which chooses per exact shape). With `bucket` the GEMMs run on one stream.
pub(super) const GROUP_GEMM_VAR: &str = "MEGAMOE_CUDA_GROUP_GEMM";

/// Whether per-group GEMMs take bucketed algorithms when [`GROUP_GEMM_VAR`] is unset.
pub(super) const GROUP_GEMM_BUCKETED: bool = true;

/// [`set_group_gemms`]'s choice of bucketed algorithms (0: none set, 1: exact, 2: bucket).
static BUCKETED_SET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// [`set_group_gemms`]'s, else [`GROUP_GEMM_VAR`] (read once per process; a bad value is a
/// named error of `op`), else [`GROUP_GEMM_BUCKETED`].
pub(super) fn group_gemm_bucketed(op: &'static str) -> Result<bool> {
    match BUCKETED_SET.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {}
        b => return Ok(b == 2),
    }
    static MODE: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    MODE.get_or_init(|| match std::env::var(GROUP_GEMM_VAR) {
        Err(_) => Ok(GROUP_GEMM_BUCKETED),
        Ok(v) => match v.as_str() {
            "" => Ok(GROUP_GEMM_BUCKETED),
            "bucket" => Ok(true),
            "exact" => Ok(false),
            _ => Err(v),
        },
    })
    .clone()
    .map_err(|value| crate::Error::InvalidArgument {
        op,
        arg: GROUP_GEMM_VAR,
        value,
        rule: "must be bucket or exact",
    })
}

/// The streams set by [`set_group_gemms`] (0: none set).
static STREAMS_SET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets how every per-group grouped GEMM of this process runs from now on (overriding
/// [`GROUP_GEMM_VAR`] and [`GEMM_STREAMS_VAR`]), e.g. to compare them in one process:
/// bucketed cuBLASLt algorithms (`bucketed`, on one stream) or the engine's GEMM path over
/// `streams` streams (`1` to `4`).
pub fn set_group_gemms(bucketed: bool, streams: usize) -> Result<()> {
    if !(1..=megamoe_cuda::MAX_LANES).contains(&streams) {
        return Err(crate::Error::InvalidArgument {
            op: "set_group_gemms",
            arg: "streams",
            value: streams.to_string(),
            rule: "must be an integer from 1 to 4",
        });
    }
    let b = if bucketed { 2 } else { 1 };
    BUCKETED_SET.store(b, std::sync::atomic::Ordering::Relaxed);
    STREAMS_SET.store(streams, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The streams of a per-group plan: [`set_group_gemms`]'s, else
/// [`GEMM_STREAMS_VAR`] (read once per process; a bad value is a named error of `op`), else
/// [`GEMM_STREAMS`].
pub(super) fn gemm_lanes(op: &'static str) -> Result<usize> {
    static LANES: std::sync::OnceLock<std::result::Result<usize, String>> =
        std::sync::OnceLock::new();
    match STREAMS_SET.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {}
        n => return Ok(n),
    }
    LANES
        .get_or_init(|| match std::env::var(GEMM_STREAMS_VAR) {
            Err(_) => Ok(GEMM_STREAMS),
            Ok(v) => match v.parse::<usize>() {
                Ok(n) if (1..=megamoe_cuda::MAX_LANES).contains(&n) => Ok(n),
                _ => Err(v),
            },
        })
        .clone()
        .map_err(|value| crate::Error::InvalidArgument {
            op,
            arg: GEMM_STREAMS_VAR,
            value,
            rule: "must be an integer from 1 to 4",
        })
}

impl CudaBackend {
    /// The plan of a packed grouped GEMM of `op`: [`packed_plan`] unless
    /// [`PACKED_GEMM_VAR`] overrides it (a bad value is a named error).
    pub(super) fn packed_plan(
        &self,
        op: &'static str,
        spans: &[(usize, usize)],
        rows: usize,
    ) -> Result<PackedPlan> {
        let mode = packed_mode().map_err(|value| crate::Error::InvalidArgument {
            op,
            arg: PACKED_GEMM_VAR,
            value,
            rule: "must be auto, per-group or padded",
        })?;
        let max = spans.iter().map(|s| s.1).max().unwrap_or(0);
        Ok(match mode {
            PackedMode::Auto => packed_plan(spans, rows),
            PackedMode::PerGroup => PackedPlan::PerGroup,
            PackedMode::Padded if max == 0 => PackedPlan::PerGroup,
            PackedMode::Padded => PackedPlan::Padded(bucket(max)),
        })
    }
}

impl CudaBackend {
    /// `C[g] = op(A[g]) · op(B[g]) (+ beta · C[g])` for the `batch` entries of a
    /// strided-batched product into an f32 `C` (`c_stride` elements apart).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn batched(
        &self,
        op: &'static str,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: u64,
        c_stride: usize,
        batch: usize,
        beta: f32,
    ) -> Result<()> {
        let e = self.engine(op)?;
        self.gemm(&e, op, mnk, a, b, (c, Elem::F32), c_stride, batch, beta)
    }

    /// Checks `G·stride ≤ rows`; returns G.
    fn strided_groups(
        &self,
        op: &'static str,
        groups: &RowGroups,
        stride: usize,
        rows: usize,
    ) -> Result<usize> {
        let g = groups.len();
        if g * stride > rows {
            return Err(crate::Error::InvalidArgument {
                op,
                arg: "groups",
                value: format!("{g} groups of stride {stride} over {rows} rows"),
                rule: "strided groups must lie inside the operand's rows",
            });
        }
        Ok(g)
    }

    /// Forward over strided groups: `out [r, n]` of the activation dtype, group rows
    /// `x·op(w_g)`, every other row 0.
    pub(super) fn strided_matmul(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        w: &Tensor,
        trans_w: bool,
    ) -> Result<Tensor> {
        self.strided_product(x, groups, stride, w, trans_w, self.act())
    }

    /// [`CudaBackend::strided_matmul`] written as `dtype` (f32 or bf16).
    fn strided_product(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        w: &Tensor,
        trans_w: bool,
        dtype: DType,
    ) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        let (r, n, kx) = grouped_dims(OP, x, groups, w, trans_w)?;
        let (w1, w2) = if trans_w { (n, kx) } else { (kx, n) };
        let g = self.strided_groups(OP, groups, stride, r)?;
        let sizes = ids(OP, "groups.sizes", groups.sizes())?;
        let (x, w) = self.gemm_pair(x, w)?;
        let (xd, wd) = (dev(OP, &x)?, dev(OP, &w)?);
        let es = dtype.size_in_bytes();
        let (out, od) = {
            let e = self.engine(OP)?;
            self.empty(&e, [r, n].into(), dtype)?
        };
        let body = g * stride * n;
        if r * n > body {
            let e = self.engine(OP)?;
            let tail = Dev::new(od.ptr + (body * es) as u64, kdt(dtype));
            // SAFETY: the rows past the groups, inside the fresh [r, n] output.
            self.ck(OP, unsafe { e.tk.fill(&e.gpu, tail, r * n - body, 0.0) })?;
        }
        let oa = operand(&x, xd.ptr, false, kx, stride * kx);
        let ob = operand(&w, wd.ptr, trans_w, w2, w1 * w2);
        let e = self.engine(OP)?;
        let c = (od.ptr, elem(dtype));
        self.gemm(&e, OP, (stride, n, kx), oa, ob, c, stride * n, g, 0.0)?;
        if groups.zero_pad_rows() {
            // zero pad rows of x give zero output rows: nothing to clear
            return Ok(out);
        }
        // SAFETY: out holds g·stride rows of n elements first; sizes holds g i32.
        self.ck(OP, unsafe {
            e.gk.zero_past_sizes(&e.gpu, od.ptr, n * es, sizes, (g, stride), e.err.ptr())
        })?;
        Ok(out)
    }

    /// `out = beta · out + x·op(w_g)` on the group rows, `beta · out` on the others (the
    /// CPU backend's semantics; `beta = 0` overwrites).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn strided_matmul_acc(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul";
        // The fresh product is zero outside the groups.
        let product = self.strided_product(x, groups, stride, w, trans_w, DType::F32)?;
        let pd = dev(OP, &product)?;
        let len = out.numel();
        self.in_place(OP, out, |e, od| {
            // SAFETY: out and product have the same shape ([rows, n] f32).
            unsafe { e.rk.axpby(&e.gpu, od.ptr, pd.ptr, len, beta) }
        })
    }

    /// `out[g] = beta · out[g] + dy_gᵀ · x_g` over the rows inside each group.
    pub(super) fn strided_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad";
        let (r, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let g = self.strided_groups(OP, groups, stride, r)?;
        // Zero the rows outside the groups in a copy of one operand: of each operand that
        // needs a cast to the GEMM type (cast and mask in one pass: cheaper than a plain
        // cast, the pad rows are written, not read), else of the narrower. Promised zero
        // pad rows need no mask: two operands of the GEMM type go to it as they are.
        let dt = self.pair_dtype(dy, x);
        let masked = |t: &Tensor| self.pad_packed(OP, t, groups, (g, stride), dt);
        let (dy, x) = match (dy.dtype() != dt, x.dtype() != dt) {
            (true, true) => (masked(dy)?, masked(x)?),
            (true, false) => (masked(dy)?, x.clone()),
            (false, true) => (dy.clone(), masked(x)?),
            (false, false) if groups.zero_pad_rows() => (dy.clone(), x.clone()),
            (false, false) if n <= k => (masked(dy)?, x.clone()),
            (false, false) => (dy.clone(), masked(x)?),
        };
        let (dd, xd) = (dev(OP, &dy)?, dev(OP, &x)?);
        self.in_place(OP, out, |_, _| Ok(()))?;
        let od = dev(OP, out)?;
        let oa = operand(&dy, dd.ptr, true, n, stride * n);
        let ob = operand(&x, xd.ptr, false, k, stride * k);
        self.batched(OP, (n, k, stride), oa, ob, od.ptr, n * k, g, beta)
    }
}

impl CudaBackend {
    /// `t`'s packed groups copied into a fresh `[g·cap, cols]` buffer of `dtype` (a cast
    /// on the way when `t` is of the other float type), pad rows zero.
    fn pad_packed(
        &self,
        op: &'static str,
        t: &Tensor,
        groups: &RowGroups,
        (g, cap): (usize, usize),
        dtype: DType,
    ) -> Result<Tensor> {
        let cols = t.dims2()?.1;
        let src = dev(op, t)?;
        let ids = (
            ids(op, "groups.sizes", groups.sizes())?,
            ids(op, "groups.offsets", groups.offsets())?,
        );
        let e = self.engine(op)?;
        let (p, pd) = self.empty(&e, [g * cap, cols].into(), dtype)?;
        // SAFETY: the spans were checked inside t's rows and every size is ≤ cap; p holds
        // g·cap rows.
        self.ck(op, unsafe {
            e.gk.pad_packed(&e.gpu, src, pd, cols, ids, (g, cap), e.err.ptr())
        })?;
        Ok(p)
    }

    /// The GEMM input type of `a` and `b` ([`CudaBackend::gemm_pair`]'s rule: bf16 in
    /// bf16-matmul mode or when both are bf16, else f32).
    fn pair_dtype(&self, a: &Tensor, b: &Tensor) -> DType {
        if self.bf16_matmul() || (a.dtype() == DType::BF16 && b.dtype() == DType::BF16) {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// `w` as a GEMM operand of `dtype` (a registered weight's bf16 copy, `weights.rs`).
    fn operand_as(&self, w: &Tensor, dtype: DType) -> Result<Tensor> {
        match (w.dtype(), dtype) {
            (a, b) if a == b => Ok(w.clone()),
            (_, DType::BF16) => self.bf16_operand(w),
            _ => self.as_f32(w),
        }
    }

    /// [`PackedPlan::Padded`] forward: `out = beta · out + x_g·op(w_g)` on the group rows of
    /// `out [r, n]` (a unique buffer at `c`), other rows untouched.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn padded_matmul_acc(
        &self,
        c: (u64, Elem),
        x: &Tensor,
        groups: &RowGroups,
        cap: usize,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul";
        let (_, n, kx) = grouped_dims(OP, x, groups, w, trans_w)?;
        let (w1, w2) = if trans_w { (n, kx) } else { (kx, n) };
        let g = groups.len();
        // x is cast (if at all) on its way into the padded buffer: one pass, not two.
        let dt = self.pair_dtype(x, w);
        let w = self.operand_as(w, dt)?;
        let xp = self.pad_packed(OP, x, groups, (g, cap), dt)?;
        let (xd, wd) = (dev(OP, &xp)?, dev(OP, &w)?);
        // Overwriting: the product is written in out's type and copied; accumulating: f32.
        let pdt = match (beta == 0.0, c.1) {
            (true, Elem::Bf16) => DType::BF16,
            _ => DType::F32,
        };
        let ids = (
            ids(OP, "groups.sizes", groups.sizes())?,
            ids(OP, "groups.offsets", groups.offsets())?,
        );
        let e = self.engine(OP)?;
        let (_p, pd) = self.empty(&e, [g * cap, n].into(), pdt)?;
        let oa = operand(&xp, xd.ptr, false, kx, cap * kx);
        let ob = operand(&w, wd.ptr, trans_w, w2, w1 * w2);
        self.gemm(
            &e,
            OP,
            (cap, n, kx),
            oa,
            ob,
            (pd.ptr, elem(pdt)),
            cap * n,
            g,
            0.0,
        )?;
        let out = Dev::new(
            c.0,
            kdt(if c.1 == Elem::Bf16 {
                DType::BF16
            } else {
                DType::F32
            }),
        );
        // SAFETY: the product holds g·cap rows of n; out holds the packed rows (checked
        // spans) of n.
        self.ck(OP, unsafe {
            e.gk.unpad_packed(&e.gpu, pd, out, n, ids, (g, cap), beta)
        })
    }

    /// [`PackedPlan::Padded`] weight gradient: `out[g] = beta · out[g] + dy_gᵀ · x_g` with
    /// both operands padded to `[G, cap, ·]` (pad rows zero contribute exact zeros).
    pub(super) fn padded_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        cap: usize,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad";
        let (_, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let g = groups.len();
        let dt = self.pair_dtype(dy, x);
        let dyp = self.pad_packed(OP, dy, groups, (g, cap), dt)?;
        let xp = self.pad_packed(OP, x, groups, (g, cap), dt)?;
        let (dd, xd) = (dev(OP, &dyp)?, dev(OP, &xp)?);
        self.in_place(OP, out, |_, _| Ok(()))?;
        let od = dev(OP, out)?;
        let oa = operand(&dyp, dd.ptr, true, n, cap * n);
        let ob = operand(&xp, xd.ptr, false, k, cap * k);
        self.batched(OP, (n, k, cap), oa, ob, od.ptr, n * k, g, beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(sizes: &[usize]) -> Vec<(usize, usize)> {
        let mut o = 0;
        sizes
            .iter()
            .map(|&s| {
                o += s;
                (o - s, s)
            })
            .collect()
    }

    #[test]
    fn packed_plan_pads_small_balanced_groups_loops_over_large_or_skewed_ones() {
        // balanced small groups: pad to the bucket of the largest group
        let bal = spans(&[200, 210, 190, 0, 205]);
        assert_eq!(packed_plan(&bal, 805), PackedPlan::Padded(216));
        // large groups (the gpu_1b dropless layer): one GEMM per group
        let big = spans(&[2000, 2100, 1900, 0, 2050]);
        assert_eq!(packed_plan(&big, 8050), PackedPlan::PerGroup);
        // one group far larger than the rest: padding would cost > PAD_LIMIT×
        let skew = spans(&[3, 0, 130, 1, 0]);
        assert_eq!(packed_plan(&skew, 134), PackedPlan::PerGroup);
        // equal groups covering the rows: strided in place; not covering: padded
        assert_eq!(packed_plan(&spans(&[64; 4]), 256), PackedPlan::Strided(64));
        assert_eq!(packed_plan(&spans(&[64; 4]), 300), PackedPlan::Padded(64));
        // one group or no rows: the plain GEMM loop
        assert_eq!(packed_plan(&spans(&[500]), 500), PackedPlan::PerGroup);
        assert_eq!(packed_plan(&spans(&[0, 0]), 0), PackedPlan::PerGroup);
        assert_eq!(packed_plan(&[], 0), PackedPlan::PerGroup);
    }
}
