//! The static expert-buffer half of [`RouteKernels`]: the permute gather, the weighted
//! combine and its backward (row kernels writing f32 or bf16, 16-byte accesses), pad / unpad of row groups, and the masking helpers of grouped
//! GEMMs over fixed-stride row groups (kernels in `routing.cu`).

use super::routing::{grid, int, RouteKernels, BLOCK, MAX_SLOTS};
use super::{vec8, Dev};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};

impl RouteKernels {
    /// `out [r_count, d]` (f32 or bf16, `out`'s type) = rows of `x [n, d]` (f32 or bf16),
    /// zero where the id is −1; ids outside `-1..n` are reported (code 3). Same types: an
    /// exact copy (16-byte words); bf16 → f32 widens; f32 → bf16 rounds to nearest even.
    /// One block per row.
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
        out: Dev,
        err: u64,
    ) -> Result<()> {
        if r_count == 0 || d == 0 {
            return Ok(());
        }
        let (dt, ot, ni, di, ri) = (
            x.dtype.code(),
            out.dtype.code(),
            int("n", n)?,
            int("d", d)?,
            int("rows", r_count)?,
        );
        let vec = vec8(d, &[x.ptr, out.ptr]);
        self.go(
            gpu,
            self.k.gather_rows_or_zero,
            ri as u32,
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&dt),
                arg(&ni),
                arg(&di),
                arg(&rows),
                arg(&ri),
                arg(&out.ptr),
                arg(&ot),
                arg(&vec),
                arg(&err),
            ],
        )
    }

    /// `y [t, d]` (f32 or bf16, `y`'s type) = per token, in increasing buffer row,
    /// Σ `w` · `rows[slot_row]` over its `k ≤ MAX_SLOTS` slots in f32 (`rows [b, d]`;
    /// `w [t, k]` optional, weight 1 without), rounded once to bf16 for a bf16 `y`.
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
        y: Dev,
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
        let (dt, yt, bi, di, ki) = (
            rows.dtype.code(),
            y.dtype.code(),
            int("b", b)?,
            int("d", d)?,
            int("k", k)?,
        );
        let (wp, wdt) = w.map_or((0u64, 0), |w| (w.ptr, w.dtype.code()));
        let vec = vec8(d, &[rows.ptr, y.ptr]);
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
                arg(&y.ptr),
                arg(&yt),
                arg(&vec),
                arg(&err),
            ],
        )
    }

    /// Backward of the weighted combine: `d_rows [b, d]` (f32 or bf16, its type: `w · d_y[t]`
    /// in the row of each kept assignment, 0 in the other rows) and `d_w [t, k]` f32
    /// (`⟨d_y[t], rows[row]⟩`, f32 products summed in f64; 0 where not kept). Each row is
    /// written once: a pass over the assignments finds the assignment of each row (a row
    /// named twice is reported, code 12), then one block per row.
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
        (d_rows, d_w): (Dev, u64),
        err: u64,
    ) -> Result<()> {
        if b == 0 && t * k == 0 {
            return Ok(());
        }
        let row_a = gpu.alloc(b.max(1) * 4)?;
        let rp = row_a.ptr();
        self.fill_i32(gpu, rp, b, -1)?;
        let (n, bi) = (int("assignments", t * k)?, int("b", b)?);
        if n > 0 {
            self.go(
                gpu,
                self.k.combine_rows_of,
                grid(t * k),
                BLOCK,
                &mut [
                    arg(&slot_row),
                    arg(&n),
                    arg(&bi),
                    arg(&rp),
                    arg(&d_w),
                    arg(&err),
                ],
            )?;
        }
        if b == 0 || d == 0 {
            return Ok(());
        }
        let (dt, ydt, wdt, ot) = (
            rows.dtype.code(),
            d_y.dtype.code(),
            w.dtype.code(),
            d_rows.dtype.code(),
        );
        let (di, ki) = (int("d", d)?, int("k", k.max(1))?);
        let vec = vec8(d, &[rows.ptr, d_y.ptr, d_rows.ptr]);
        self.go(
            gpu,
            self.k.combine_slots_bwd,
            bi as u32,
            BLOCK,
            &mut [
                arg(&rows.ptr),
                arg(&dt),
                arg(&bi),
                arg(&di),
                arg(&d_y.ptr),
                arg(&ydt),
                arg(&rp),
                arg(&w.ptr),
                arg(&wdt),
                arg(&ki),
                arg(&d_rows.ptr),
                arg(&ot),
                arg(&d_w),
                arg(&vec),
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
