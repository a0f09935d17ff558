//! RMSNorm (forward, input and weight gradients) and rotate-half RoPE.

use super::{int, need, positive, stride_grid, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::pool::DeviceMem;

/// Rows summed per block in the first pass of the RMSNorm weight gradient.
const ROWS_PER_CHUNK: usize = 128;

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
        unsafe {
            gpu.launch(
                self.k.rms_norm_fwd,
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
        let pairs = n / 2;
        let sign = if backward { -1.0f32 } else { 1.0 };
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
                ],
            )
        }
    }
}
