//! The static expert-buffer half of [`RouteKernels`]: the permute gather, the weighted
//! combine and its backward, pad / unpad of row groups, and the masking helpers of grouped
//! GEMMs over fixed-stride row groups (kernels in `routing.cu`).

use super::routing::{grid, int, RouteKernels, BLOCK, MAX_SLOTS};
use super::Dev;
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};

impl RouteKernels {
    /// `out [r_count, d]` f32 = rows of `x [n, d]` (f32 or bf16), zero where the id is −1;
    /// ids outside `-1..n` are reported (code 3).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows_or_zero(
        &self,
        gpu: &Gpu,
        x: Dev,
        (n, d): (usize, usize),
        rows: u64,
        r_count: usize,
        out: u64,
        err: u64,
    ) -> Result<()> {
        let (dt, ni, di, ri) = (
            x.dtype.code(),
            int("n", n)?,
            int("d", d)?,
            int("rows", r_count)?,
        );
        self.go(
            gpu,
            self.k.gather_rows_or_zero,
            grid(r_count * d),
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&dt),
                arg(&ni),
                arg(&di),
                arg(&rows),
                arg(&ri),
                arg(&out),
                arg(&err),
            ],
        )
    }

    /// `y [t, d]` f32 = per token, in increasing buffer row, Σ `w` · `rows[slot_row]` over
    /// its `k ≤ MAX_SLOTS` slots (`rows [b, d]`; `w [t, k]` optional, weight 1 without).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn combine_slots(
        &self,
        gpu: &Gpu,
        rows: Dev,
        (b, d): (usize, usize),
        slot_row: u64,
        w: Option<Dev>,
        (t, k): (usize, usize),
        y: u64,
        err: u64,
    ) -> Result<()> {
        if k > MAX_SLOTS {
            return Err(Error::invalid(
                "k",
                k,
                "the CUDA combine takes at most 64 slots",
            ));
        }
        if t == 0 {
            return Ok(());
        }
        let (dt, bi, di, ki) = (rows.dtype.code(), int("b", b)?, int("d", d)?, int("k", k)?);
        let (wp, wdt) = w.map_or((0u64, 0), |w| (w.ptr, w.dtype.code()));
        self.go(
            gpu,
            self.k.combine_slots,
            int("tokens", t)? as u32,
            BLOCK,
            &mut [
                arg(&rows.ptr),
                arg(&dt),
                arg(&bi),
                arg(&di),
                arg(&slot_row),
                arg(&wp),
                arg(&wdt),
                arg(&ki),
                arg(&y),
                arg(&err),
            ],
        )
    }

    /// Backward of the weighted combine: `d_rows [b, d]` (zeroed here, then `w · d_y[t]` in
    /// each kept row) and `d_w [t, k]`.
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn combine_slots_bwd(
        &self,
        gpu: &Gpu,
        rows: Dev,
        (b, d): (usize, usize),
        d_y: Dev,
        slot_row: u64,
        w: Dev,
        (t, k): (usize, usize),
        (d_rows, d_w): (u64, u64),
        err: u64,
    ) -> Result<()> {
        self.fill_i32(gpu, d_rows, b * d, 0)?;
        if t * k == 0 {
            return Ok(());
        }
        let (dt, ydt, wdt) = (rows.dtype.code(), d_y.dtype.code(), w.dtype.code());
        let (bi, di, ki) = (int("b", b)?, int("d", d)?, int("k", k)?);
        self.go(
            gpu,
            self.k.combine_slots_bwd,
            int("assignments", t * k)? as u32,
            BLOCK,
            &mut [
                arg(&rows.ptr),
                arg(&dt),
                arg(&bi),
                arg(&di),
                arg(&d_y.ptr),
                arg(&ydt),
                arg(&slot_row),
                arg(&w.ptr),
                arg(&wdt),
                arg(&ki),
                arg(&d_rows),
                arg(&d_w),
                arg(&err),
            ],
        )
    }

    /// Pads (`x [Σ counts, d]` → `out [g·cap, d]`) or, with `unpad = Some(rows)`, unpads
    /// (`x [g·cap, d]` → `out [rows, d]`) row groups; checks the counts (code 5).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pad_groups(
        &self,
        gpu: &Gpu,
        x: Dev,
        (x_rows, d): (usize, usize),
        counts: u64,
        (g, cap): (usize, usize),
        unpad: Option<usize>,
        out: u64,
        err: u64,
    ) -> Result<()> {
        if g == 0 {
            return Ok(());
        }
        let off = gpu.alloc(g * 4)?;
        let op = off.ptr();
        self.offsets(gpu, counts, g, op)?;
        let total = int("rows", unpad.unwrap_or(x_rows))?;
        let (gi, ci, di, dt) = (
            int("groups", g)?,
            int("capacity", cap)?,
            int("d", d)?,
            x.dtype.code(),
        );
        self.go(
            gpu,
            self.k.check_counts,
            1,
            1,
            &mut [
                arg(&counts),
                arg(&op),
                arg(&gi),
                arg(&ci),
                arg(&total),
                arg(&err),
            ],
        )?;
        match unpad {
            None => {
                let xr = int("rows", x_rows)?;
                self.go(
                    gpu,
                    self.k.pad_groups,
                    grid(g * cap * d),
                    BLOCK,
                    &mut [
                        arg(&x.ptr),
                        arg(&dt),
                        arg(&xr),
                        arg(&di),
                        arg(&counts),
                        arg(&op),
                        arg(&gi),
                        arg(&ci),
                        arg(&out),
                    ],
                )
            }
            Some(rows) => self.go(
                gpu,
                self.k.unpad_groups,
                grid(rows * d),
                BLOCK,
                &mut [
                    arg(&x.ptr),
                    arg(&dt),
                    arg(&di),
                    arg(&counts),
                    arg(&op),
                    arg(&gi),
                    arg(&ci),
                    arg(&total),
                    arg(&out),
                ],
            ),
        }
    }

    /// Rows past each group's size in `out [g·stride, n]` f32 become 0 (sizes checked,
    /// code 6).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn zero_pad_rows(
        &self,
        gpu: &Gpu,
        out: u64,
        sizes: u64,
        (g, stride, n): (usize, usize, usize),
        err: u64,
    ) -> Result<()> {
        let (gi, si, ni) = (int("groups", g)?, int("stride", stride)?, int("n", n)?);
        self.go(
            gpu,
            self.k.zero_pad_rows,
            grid(g * stride * n),
            BLOCK,
            &mut [
                arg(&out),
                arg(&sizes),
                arg(&gi),
                arg(&si),
                arg(&ni),
                arg(&err),
            ],
        )
    }

    /// `out = beta · out + tmp` over `n` f32 (`beta = 0`: `out = tmp`).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn axpby(&self, gpu: &Gpu, out: u64, tmp: u64, n: usize, beta: f32) -> Result<()> {
        self.go(
            gpu,
            self.k.axpby,
            grid(n),
            BLOCK,
            &mut [arg(&out), arg(&tmp), arg(&n), arg(&beta)],
        )
    }

    /// `dst = src` on the rows inside the groups of `[g·stride, n]`, 0 elsewhere (same
    /// element type).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn mask_rows(
        &self,
        gpu: &Gpu,
        src: Dev,
        dst: u64,
        sizes: u64,
        (g, stride, n): (usize, usize, usize),
    ) -> Result<()> {
        let es = src.dtype.size() as i32;
        let (gi, si, ni) = (int("groups", g)?, int("stride", stride)?, int("n", n)?);
        self.go(
            gpu,
            self.k.mask_rows,
            grid(g * stride * n),
            BLOCK,
            &mut [
                arg(&src.ptr),
                arg(&dst),
                arg(&es),
                arg(&sizes),
                arg(&gi),
                arg(&si),
                arg(&ni),
            ],
        )
    }
}
