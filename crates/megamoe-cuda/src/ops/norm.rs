//! RMSNorm (forward, input and weight gradients), the residual stream's three-way sum and
//! rotate-half RoPE.

use super::{int, need, positive, stride_grid, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::pool::DeviceMem;

/// Rows summed per block in the first pass of the RMSNorm weight gradient.
const ROWS_PER_CHUNK: usize = 128;
/// Rows per block of the fused backward ([`Ops::rms_norm_backward_add`]): 512 blocks for
/// 16 k rows, each keeping its weight-gradient partial sums in shared memory.
const FUSED_ROWS_PER_BLOCK: usize = 32;
/// Elements per vector access of the vectorised kernels (`VEC` in kernels.cu).
const VEC: usize = 8;
/// Largest row the fused backward keeps in shared memory (`h` f32 accumulators, 48 KiB).
const FUSED_MAX_H: usize = 12 * 1024;

/// Whether every buffer starts on a 16-byte boundary (the vectorised kernels' loads).
fn aligned16(bufs: &[u64]) -> bool {
    bufs.iter().all(|p| p.is_multiple_of(16))
}

impl Ops {
    /// RMSNorm of `x [rows, h]` with weight `w [h]`: `y = x · rstd · w` (storage type),
    /// `rstd [rows]` (f32) `= 1/√(mean(x²) + eps)`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        gpu: &Gpu,
        x: &impl DeviceMem,
        w: &impl DeviceMem,
        y: &impl DeviceMem,
        rstd: &impl DeviceMem,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        positive("rms_norm rows", rows)?;
        positive("rms_norm h", h)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(
                "rms_norm eps",
                eps,
                "must be finite and >= 0",
            ));
        }
        let es = self.elem.size();
        need("rms_norm x", x, rows * h, es)?;
        need("rms_norm w", w, h, es)?;
        need("rms_norm y", y, rows * h, es)?;
        need("rms_norm rstd", rstd, rows, 4)?;
        let hi = int("rms_norm h", h)?;
        let vec = h.is_multiple_of(VEC) && aligned16(&[x.ptr(), w.ptr(), y.ptr()]);
        let f = if vec {
            self.k.rms_norm_fwd_vec
        } else {
            self.k.rms_norm_fwd
        };
        unsafe {
            gpu.launch(
                f,
                int("rms_norm rows", rows)? as u32,
                BLOCK,
                &mut [
                    arg(&x.ptr()),
                    arg(&w.ptr()),
                    arg(&y.ptr()),
                    arg(&rstd.ptr()),
                    arg(&hi),
                    arg(&eps),
                ],
            )
        }
    }

    /// `y = a + (b + c)` over `n` elements of the storage type (f32 math, rounded once): a
    /// residual plus two branch outputs in one pass. `Ok(false)`, nothing launched, unless
    /// `n` is a multiple of 8 and every buffer 16-byte aligned (the caller adds unfused).
    #[allow(clippy::too_many_arguments)]
    pub fn add_sum(
        &self,
        gpu: &Gpu,
        a: &impl DeviceMem,
        b: &impl DeviceMem,
        c: &impl DeviceMem,
        y: &impl DeviceMem,
        n: usize,
    ) -> Result<bool> {
        let es = self.elem.size();
        for (what, t) in [
            ("add_sum a", a as &dyn DeviceMem),
            ("add_sum b", b),
            ("add_sum c", c),
            ("add_sum y", y),
        ] {
            need(what, t, n, es)?;
        }
        if n == 0 || !n.is_multiple_of(VEC) || !aligned16(&[a.ptr(), b.ptr(), c.ptr(), y.ptr()]) {
            return Ok(false);
        }
        let n8 = n / VEC;
        unsafe {
            gpu.launch(
                self.k.add_sum_vec,
                stride_grid(n8),
                BLOCK,
                &mut [
                    arg(&a.ptr()),
                    arg(&b.ptr()),
                    arg(&c.ptr()),
                    arg(&y.ptr()),
                    arg(&n8),
                ],
            )?;
        }
        Ok(true)
    }

    /// Input gradient of RMSNorm: `dx = rstd·(g − x̂·mean(g⊙x̂))`, `g = dy⊙w`, `x̂ = x·rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_backward_input(
        &self,
        gpu: &Gpu,
        dy: &impl DeviceMem,
        x: &impl DeviceMem,
        w: &impl DeviceMem,
        rstd: &impl DeviceMem,
        dx: &impl DeviceMem,
        rows: usize,
        h: usize,
    ) -> Result<()> {
        positive("rms_norm rows", rows)?;
        positive("rms_norm h", h)?;
        let es = self.elem.size();
        need("rms_norm dy", dy, rows * h, es)?;
        need("rms_norm x", x, rows * h, es)?;
        need("rms_norm w", w, h, es)?;
        need("rms_norm rstd", rstd, rows, 4)?;
        need("rms_norm dx", dx, rows * h, es)?;
        let hi = int("rms_norm h", h)?;
        unsafe {
            gpu.launch(
                self.k.rms_norm_bwd_input,
                int("rms_norm rows", rows)? as u32,
                BLOCK,
                &mut [
                    arg(&dy.ptr()),
                    arg(&x.ptr()),
                    arg(&w.ptr()),
                    arg(&rstd.ptr()),
                    arg(&dx.ptr()),
                    arg(&hi),
                ],
            )
        }
    }

    /// Whether [`Ops::rms_norm_backward_add`] runs for rows of `h` at these addresses (the
    /// callers fall back to [`Ops::rms_norm_backward_input`] and
    /// [`Ops::rms_norm_backward_weight`] otherwise).
    pub fn rms_norm_backward_add_fits(h: usize, bufs: &[u64]) -> bool {
        h > 0 && h.is_multiple_of(VEC) && h <= FUSED_MAX_H && aligned16(bufs)
    }

    /// Fused RMSNorm backward into a residual gradient, one pass over the rows:
    /// `out = res + dx` (f32) with `dx = rstd·(g − x̂·mean(g⊙x̂))`, `g = dy⊙w`, `x̂ = x·rstd`;
    /// `act` (when given) the same values in the storage type; `dw [h] = Σ_n dy·x·rstd`
    /// written fresh (f32, per-block partial sums then their sum in block order:
    /// deterministic). `dy` is stored in the storage type, or f32 when `dy_f32`; `res` is
    /// f32. Needs [`Ops::rms_norm_backward_add_fits`].
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_backward_add(
        &self,
        gpu: &Gpu,
        (dy, dy_f32): (&impl DeviceMem, bool),
        x: &impl DeviceMem,
        w: &impl DeviceMem,
        rstd: &impl DeviceMem,
        res: &impl DeviceMem,
        out: &impl DeviceMem,
        act: Option<&dyn DeviceMem>,
        dw: &impl DeviceMem,
        rows: usize,
        h: usize,
    ) -> Result<()> {
        positive("rms_norm rows", rows)?;
        positive("rms_norm h", h)?;
        let es = self.elem.size();
        need("rms_norm dy", dy, rows * h, if dy_f32 { 4 } else { es })?;
        need("rms_norm x", x, rows * h, es)?;
        need("rms_norm w", w, h, es)?;
        need("rms_norm rstd", rstd, rows, 4)?;
        need("rms_norm residual", res, rows * h, 4)?;
        need("rms_norm out", out, rows * h, 4)?;
        if let Some(a) = act {
            need("rms_norm act", a, rows * h, es)?;
        }
        need("rms_norm dw", dw, h, 4)?;
        let mut ptrs = vec![dy.ptr(), x.ptr(), w.ptr(), res.ptr(), out.ptr()];
        ptrs.extend(act.map(|a| a.ptr()));
        if !Self::rms_norm_backward_add_fits(h, &ptrs) {
            return Err(Error::invalid(
                "rms_norm_backward_add h",
                h,
                "must be a multiple of 8 and at most 12288, with 16-byte aligned buffers",
            ));
        }
        let blocks = rows.div_ceil(FUSED_ROWS_PER_BLOCK);
        let partial = gpu.alloc(blocks * h * 4)?;
        let (ri, hi, per, bi) = (
            int("rms_norm rows", rows)?,
            int("rms_norm h", h)?,
            FUSED_ROWS_PER_BLOCK as i32,
            int("rms_norm blocks", blocks)?,
        );
        let act_ptr = act.map_or(0u64, |a| a.ptr());
        let f = if dy_f32 {
            self.k.rms_norm_bwd_add_f32dy
        } else {
            self.k.rms_norm_bwd_add
        };
        let beta = 0.0f32;
        unsafe {
            gpu.launch_2d(
                f,
                (bi as u32, 1),
                BLOCK,
                (h * 4) as u32,
                &mut [
                    arg(&dy.ptr()),
                    arg(&x.ptr()),
                    arg(&w.ptr()),
                    arg(&rstd.ptr()),
                    arg(&res.ptr()),
                    arg(&out.ptr()),
                    arg(&act_ptr),
                    arg(&partial.ptr()),
                    arg(&ri),
                    arg(&hi),
                    arg(&per),
                ],
            )?;
            gpu.launch(
                self.k.sum_partials,
                h.div_ceil(BLOCK as usize) as u32,
                BLOCK,
                &mut [
                    arg(&partial.ptr()),
                    arg(&dw.ptr()),
                    arg(&bi),
                    arg(&hi),
                    arg(&beta),
                ],
            )
        }
    }

    /// Weight gradient of RMSNorm into `dw [h]` (f32): `dw = Σ_n dy·x·rstd`, added to `dw`
    /// when `accumulate`, else written fresh. Two passes (chunk partials, then their sum in
    /// chunk order): deterministic.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_backward_weight(
        &self,
        gpu: &Gpu,
        dy: &impl DeviceMem,
        x: &impl DeviceMem,
        rstd: &impl DeviceMem,
        dw: &impl DeviceMem,
        rows: usize,
        h: usize,
        accumulate: bool,
    ) -> Result<()> {
        positive("rms_norm rows", rows)?;
        positive("rms_norm h", h)?;
        let es = self.elem.size();
        need("rms_norm dy", dy, rows * h, es)?;
        need("rms_norm x", x, rows * h, es)?;
        need("rms_norm rstd", rstd, rows, 4)?;
        need("rms_norm dw", dw, h, 4)?;
        let chunks = rows.div_ceil(ROWS_PER_CHUNK);
        let partial = gpu.alloc(chunks * h * 4)?;
        let tiles = h.div_ceil(BLOCK as usize);
        let (ri, hi, per, ci) = (
            int("rms_norm rows", rows)?,
            int("rms_norm h", h)?,
            ROWS_PER_CHUNK as i32,
            int("rms_norm chunks", chunks)?,
        );
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        unsafe {
            gpu.launch(
                self.k.rms_norm_bwd_weight_partial,
                int("rms_norm grid", tiles * chunks)? as u32,
                BLOCK,
                &mut [
                    arg(&dy.ptr()),
                    arg(&x.ptr()),
                    arg(&rstd.ptr()),
                    arg(&partial.ptr()),
                    arg(&ri),
                    arg(&hi),
                    arg(&per),
                ],
            )?;
            gpu.launch(
                self.k.sum_partials,
                tiles as u32,
                BLOCK,
                &mut [
                    arg(&partial.ptr()),
                    arg(&dw.ptr()),
                    arg(&ci),
                    arg(&hi),
                    arg(&beta),
                ],
            )
        }
    }

    /// Rotate-half RoPE on `x [b, t, heads, d]` into `y` (may be `x`): the pair
    /// `(x_i, x_{i+d/2})` at position `p` is rotated by `sign · p · θ^(−2i/d)` (angles in
    /// f64). `backward = true` rotates by the negative angle (the gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        gpu: &Gpu,
        x: &impl DeviceMem,
        y: &impl DeviceMem,
        (b, t, heads, d): (usize, usize, usize, usize),
        theta: f32,
        backward: bool,
    ) -> Result<()> {
        self.rope_leading(gpu, x, y, (b, t, heads, d), heads, theta, backward)
    }

    /// [`Ops::rope`] on the first `rotated` (1..=heads) heads of each position only: the
    /// other heads of `y` are not written (in place, `y` = `x`, they keep their values; a
    /// fused q|k|v projection rotates its q and k heads and leaves v).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_leading(
        &self,
        gpu: &Gpu,
        x: &impl DeviceMem,
        y: &impl DeviceMem,
        (b, t, heads, d): (usize, usize, usize, usize),
        rotated: usize,
        theta: f32,
        backward: bool,
    ) -> Result<()> {
        if rotated == 0 || rotated > heads {
            return Err(Error::invalid(
                "rope rotated heads",
                rotated,
                "must be in 1..=heads",
            ));
        }
        positive("rope batch", b)?;
        positive("rope seq", t)?;
        positive("rope heads", heads)?;
        if d == 0 || d % 2 != 0 {
            return Err(Error::invalid("rope head_dim", d, "must be even and >= 2"));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::invalid(
                "rope theta",
                theta,
                "must be finite and > 0",
            ));
        }
        let n = b * t * heads * d;
        need("rope x", x, n, self.elem.size())?;
        need("rope y", y, n, self.elem.size())?;
        let half = d / 2;
        let table = gpu.alloc(2 * t * half * 4)?;
        let sin_ptr = table.ptr() + (t * half * 4) as u64;
        let (ti, hi, di) = (
            int("rope seq", t)?,
            int("rope heads", heads)?,
            int("rope head_dim", d)?,
        );
        let theta64 = theta as f64;
        let pairs = b * t * rotated * half;
        let ri = int("rope rotated heads", rotated)?;
        let sign = if backward { -1.0f32 } else { 1.0 };
        // 8 pairs per thread when the half row is a multiple of 8 and the rows are aligned
        // (the table's sin half starts at t·half floats: aligned too).
        let items = pairs / VEC;
        let vec = half.is_multiple_of(VEC)
            && aligned16(&[x.ptr(), y.ptr()])
            && u32::try_from(items).is_ok_and(|i| i <= i32::MAX as u32);
        unsafe {
            gpu.launch(
                self.k.rope_table,
                int("rope table", (t * half).div_ceil(BLOCK as usize))? as u32,
                BLOCK,
                &mut [
                    arg(&table.ptr()),
                    arg(&sin_ptr),
                    arg(&ti),
                    arg(&di),
                    arg(&theta64),
                ],
            )?;
            if vec {
                let items = items as u32;
                return gpu.launch(
                    self.k.rope_apply_vec,
                    stride_grid(items as usize),
                    BLOCK,
                    &mut [
                        arg(&x.ptr()),
                        arg(&y.ptr()),
                        arg(&table.ptr()),
                        arg(&sin_ptr),
                        arg(&items),
                        arg(&ti),
                        arg(&hi),
                        arg(&di),
                        arg(&sign),
                        arg(&ri),
                    ],
                );
            }
            gpu.launch(
                self.k.rope_apply,
                stride_grid(pairs),
                BLOCK,
                &mut [
                    arg(&x.ptr()),
                    arg(&y.ptr()),
                    arg(&table.ptr()),
                    arg(&sin_ptr),
                    arg(&pairs),
                    arg(&ti),
                    arg(&hi),
                    arg(&di),
                    arg(&sign),
                    arg(&ri),
                ],
            )
        }
    }
}
