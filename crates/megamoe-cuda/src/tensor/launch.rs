//! [`TensorKernels`]: the compiled module and one launching method per kernel.

use cudarc::driver::sys as dsys;

use super::routing::int;
use super::{vec8, AllReduce, Binary, Broadcast, Dev, Dtype, RowReduce, Unary};
use crate::device::{arg, Gpu};
use crate::error::{DriverCtx, Error, Result};

const SRC: &str = include_str!("kernels.cu");
const BLOCK: u32 = 256;
/// Rows summed per block in the first pass of a column sum.
const ROWS_PER_CHUNK: usize = 128;
/// Ids per block of the index radix sort (`SORT_CHUNK` in kernels.cu; its block size).
const SORT_CHUNK: usize = 1024;

fn grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 132 * 16) as u32
}

fn float_only(field: &'static str, d: Dev) -> Result<()> {
    if d.dtype == Dtype::I32 {
        return Err(Error::invalid(field, "i32", "must be f32 or bf16"));
    }
    Ok(())
}

struct Kernels {
    cast: dsys::CUfunction,
    fill: dsys::CUfunction,
    unary: dsys::CUfunction,
    binary: dsys::CUfunction,
    compare_scalar: dsys::CUfunction,
    where_cond: dsys::CUfunction,
    add_i32: dsys::CUfunction,
    exclusive_cumsum_i32: dsys::CUfunction,
    reduce_rows: dsys::CUfunction,
    col_sum_partial: dsys::CUfunction,
    col_sum_finish: dsys::CUfunction,
    softmax_rows: dsys::CUfunction,
    softmax_rows_bwd: dsys::CUfunction,
    topk_rows: dsys::CUfunction,
    gather_rows: dsys::CUfunction,
    gather_rows_u16: dsys::CUfunction,
    gather_cols: dsys::CUfunction,
    scatter_cols: dsys::CUfunction,
    permute_copy: dsys::CUfunction,
    index_keys: dsys::CUfunction,
    sort_digits: dsys::CUfunction,
    scan_excl: dsys::CUfunction,
    sort_scatter: dsys::CUfunction,
    segment_bounds: dsys::CUfunction,
    index_add_apply: dsys::CUfunction,
    swiglu_bwd: dsys::CUfunction,
    swiglu_gate_up: dsys::CUfunction,
    swiglu_gate_up_bwd: dsys::CUfunction,
    sum_all_partial: dsys::CUfunction,
    reduce_partials: dsys::CUfunction,
}

/// The tensor kernels, compiled once per process and loaded.
pub struct TensorKernels {
    k: Kernels,
}

// SAFETY: the functions are handles into a module loaded in the GPU's context, valid from
// any thread where that context is current (`Gpu::bind`); launching goes through a `&Gpu`.
unsafe impl Send for TensorKernels {}
unsafe impl Sync for TensorKernels {}

/// Layout of `PermuteArgs` in kernels.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct PermuteArgs {
    rank: i32,
    out_dims: [i64; 6],
    in_strides: [i64; 6],
}

impl TensorKernels {
    /// Compiles and loads the module (cached per process).
    pub fn new(gpu: &mut Gpu) -> Result<TensorKernels> {
        let mut get = |name: &str| gpu.kernels.function("tensor", SRC, &[], name);
        Ok(TensorKernels {
            k: Kernels {
                cast: get("cast")?,
                fill: get("fill")?,
                unary: get("unary")?,
                binary: get("binary")?,
                compare_scalar: get("compare_scalar")?,
                where_cond: get("where_cond")?,
                add_i32: get("add_i32")?,
                exclusive_cumsum_i32: get("exclusive_cumsum_i32")?,
                reduce_rows: get("reduce_rows")?,
                col_sum_partial: get("col_sum_partial")?,
                col_sum_finish: get("col_sum_finish")?,
                softmax_rows: get("softmax_rows")?,
                softmax_rows_bwd: get("softmax_rows_bwd")?,
                topk_rows: get("topk_rows")?,
                gather_rows: get("gather_rows")?,
                gather_rows_u16: get("gather_rows_u16")?,
                gather_cols: get("gather_cols")?,
                scatter_cols: get("scatter_cols")?,
                permute_copy: get("permute_copy")?,
                index_keys: get("index_keys")?,
                sort_digits: get("sort_digits")?,
                scan_excl: get("scan_excl")?,
                sort_scatter: get("sort_scatter")?,
                segment_bounds: get("segment_bounds")?,
                index_add_apply: get("index_add_apply")?,
                swiglu_bwd: get("swiglu_bwd")?,
                swiglu_gate_up: get("swiglu_gate_up")?,
                swiglu_gate_up_bwd: get("swiglu_gate_up_bwd")?,
                sum_all_partial: get("sum_all_partial")?,
                reduce_partials: get("reduce_partials")?,
            },
        })
    }

    /// `y = x` converted to `y`'s type (f32 → i32 truncates), `n` elements.
    ///
    /// # Safety
    /// For this and every method below: each address must be a live device allocation of
    /// the engine's context holding at least the elements the method's doc names, and
    /// outputs must not overlap inputs unless the doc allows it.
    pub unsafe fn cast(&self, gpu: &Gpu, x: Dev, y: Dev, n: usize) -> Result<()> {
        let (xt, yt) = (x.dtype.code(), y.dtype.code());
        gpu.launch(
            self.k.cast,
            grid(n),
            BLOCK,
            &mut [arg(&x.ptr), arg(&xt), arg(&y.ptr), arg(&yt), arg(&n)],
        )
    }

    /// `y[..n] = value` (f32: a 32-bit memset of the value's bits, at the copy engine's
    /// write bandwidth; other types through the fill kernel).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn fill(&self, gpu: &Gpu, y: Dev, n: usize, value: f32) -> Result<()> {
        if y.dtype == Dtype::F32 {
            return dsys::cuMemsetD32Async(y.ptr, value.to_bits(), n, gpu.stream())
                .result()
                .ctx("cuMemsetD32Async");
        }
        let yt = y.dtype.code();
        gpu.launch(
            self.k.fill,
            grid(n),
            BLOCK,
            &mut [arg(&y.ptr), arg(&yt), arg(&n), arg(&value)],
        )
    }

    /// `y = op(x)` over `n` elements (`y` may be `x`).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn unary(&self, gpu: &Gpu, op: Unary, x: Dev, y: Dev, n: usize) -> Result<()> {
        let (c, mul, add) = op.code();
        let (xt, yt) = (x.dtype.code(), y.dtype.code());
        gpu.launch(
            self.k.unary,
            grid(n),
            BLOCK,
            &mut [
                arg(&c),
                arg(&mul),
                arg(&add),
                arg(&x.ptr),
                arg(&xt),
                arg(&y.ptr),
                arg(&yt),
                arg(&n),
            ],
        )
    }

    /// `y[i] = op(a[i], alpha · b[j])` over `n` elements, `j` per `bcast` (`y` may be `a`:
    /// in place, e.g. `add_assign` and `axpy`). Without broadcast, float operands, `n` a
    /// multiple of 8 and 16-byte aligned tensors: 8 consecutive elements per thread step
    /// (16-byte bf16 accesses), the same bits.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn binary(
        &self,
        gpu: &Gpu,
        op: Binary,
        a: Dev,
        b: Dev,
        y: Dev,
        n: usize,
        bcast: Broadcast,
        alpha: f32,
    ) -> Result<()> {
        let (mode, h) = match bcast {
            Broadcast::None => (0i32, 1usize),
            Broadcast::Row(h) => (1, h.max(1)),
            Broadcast::Col(h) => (2, h.max(1)),
            Broadcast::Scalar => (3, 1),
        };
        let (c, at, bt, yt) = (op.code(), a.dtype.code(), b.dtype.code(), y.dtype.code());
        let floats = [a, b, y].iter().all(|d| d.dtype != Dtype::I32);
        let vec = if mode == 0 && floats {
            vec8(n, &[a.ptr, b.ptr, y.ptr])
        } else {
            0
        };
        gpu.launch(
            self.k.binary,
            grid(if vec == 1 { n / 8 } else { n }),
            BLOCK,
            &mut [
                arg(&c),
                arg(&a.ptr),
                arg(&at),
                arg(&b.ptr),
                arg(&bt),
                arg(&y.ptr),
                arg(&yt),
                arg(&n),
                arg(&mode),
                arg(&h),
                arg(&alpha),
                arg(&vec),
            ],
        )
    }

    /// 0/1 f32 mask: `x > value` (`greater`) or `x == value` (i32 compared exactly).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn compare_scalar(
        &self,
        gpu: &Gpu,
        greater: bool,
        x: Dev,
        y: u64,
        n: usize,
        value: f32,
    ) -> Result<()> {
        let (op, xt) = (i32::from(!greater), x.dtype.code());
        gpu.launch(
            self.k.compare_scalar,
            grid(n),
            BLOCK,
            &mut [
                arg(&op),
                arg(&x.ptr),
                arg(&xt),
                arg(&y),
                arg(&n),
                arg(&value),
            ],
        )
    }

    /// `y = cond ≠ 0 ? a : b` (f32 out).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn where_cond(
        &self,
        gpu: &Gpu,
        cond: Dev,
        a: Dev,
        b: Dev,
        y: u64,
        n: usize,
    ) -> Result<()> {
        let (ct, at, bt) = (cond.dtype.code(), a.dtype.code(), b.dtype.code());
        gpu.launch(
            self.k.where_cond,
            grid(n),
            BLOCK,
            &mut [
                arg(&cond.ptr),
                arg(&ct),
                arg(&a.ptr),
                arg(&at),
                arg(&b.ptr),
                arg(&bt),
                arg(&y),
                arg(&n),
            ],
        )
    }

    /// `y = a + b` on i32 (wrapping).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn add_i32(&self, gpu: &Gpu, a: u64, b: u64, y: u64, n: usize) -> Result<()> {
        gpu.launch(
            self.k.add_i32,
            grid(n),
            BLOCK,
            &mut [arg(&a), arg(&b), arg(&y), arg(&n)],
        )
    }

    /// `out[g] = Σ_{i<g} x[g]` on i32 (`n` elements); `overflow` (one i32) is set to 1 if a
    /// partial sum leaves i32, else 0 (read it to report the error).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn exclusive_cumsum_i32(
        &self,
        gpu: &Gpu,
        x: u64,
        out: u64,
        n: usize,
        overflow: u64,
    ) -> Result<()> {
        let ni = int("cumsum length", n)?;
        gpu.launch(
            self.k.exclusive_cumsum_i32,
            1,
            32,
            &mut [arg(&x), arg(&out), arg(&ni), arg(&overflow)],
        )
    }

    /// `y[r] = op(x[r, ..len])` (f32) for `rows` rows.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn reduce_rows(
        &self,
        gpu: &Gpu,
        op: RowReduce,
        x: Dev,
        y: u64,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (c, xt) = (op.code(), x.dtype.code());
        gpu.launch(
            self.k.reduce_rows,
            int("reduce rows", rows)? as u32,
            BLOCK,
            &mut [arg(&c), arg(&x.ptr), arg(&xt), arg(&y), arg(&len)],
        )
    }

    /// Column sums `y[j] = Σ_r x[r, j]` (f32) of `x [rows, h]`, two passes in a fixed order.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn sum_cols(&self, gpu: &Gpu, x: Dev, y: u64, rows: usize, h: usize) -> Result<()> {
        if h == 0 {
            return Ok(());
        }
        if rows == 0 {
            return self.fill(gpu, Dev::f32(y), h, 0.0);
        }
        let chunks = rows.div_ceil(ROWS_PER_CHUNK);
        let partial = gpu.alloc(chunks * h * 8)?;
        let tiles = h.div_ceil(BLOCK as usize);
        let (ri, hi, per, ci, xt) = (
            int("sum rows", rows)?,
            int("sum width", h)?,
            ROWS_PER_CHUNK as i32,
            int("sum chunks", chunks)?,
            x.dtype.code(),
        );
        gpu.launch(
            self.k.col_sum_partial,
            int("sum grid", tiles * chunks)? as u32,
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&xt),
                arg(&partial.ptr()),
                arg(&ri),
                arg(&hi),
                arg(&per),
            ],
        )?;
        gpu.launch(
            self.k.col_sum_finish,
            tiles as u32,
            BLOCK,
            &mut [arg(&partial.ptr()), arg(&y), arg(&ci), arg(&hi)],
        )
    }

    /// Row softmax (`log = false`) or log-softmax of `x [rows, len]` into `y`.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn softmax_rows(
        &self,
        gpu: &Gpu,
        log: bool,
        x: Dev,
        y: Dev,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        float_only("softmax output", y)?;
        if rows == 0 || len == 0 {
            return Ok(());
        }
        let (op, xt, yt) = (i32::from(log), x.dtype.code(), y.dtype.code());
        gpu.launch(
            self.k.softmax_rows,
            int("softmax rows", rows)? as u32,
            BLOCK,
            &mut [
                arg(&op),
                arg(&x.ptr),
                arg(&xt),
                arg(&y.ptr),
                arg(&yt),
                arg(&len),
            ],
        )
    }

    /// Backward of [`TensorKernels::softmax_rows`] from its output `y` and `dy`.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn softmax_rows_backward(
        &self,
        gpu: &Gpu,
        log: bool,
        y: Dev,
        dy: Dev,
        dx: Dev,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        float_only("softmax gradient", dx)?;
        if rows == 0 || len == 0 {
            return Ok(());
        }
        let (op, yt, dt, xt) = (
            i32::from(log),
            y.dtype.code(),
            dy.dtype.code(),
            dx.dtype.code(),
        );
        gpu.launch(
            self.k.softmax_rows_bwd,
            int("softmax rows", rows)? as u32,
            BLOCK,
            &mut [
                arg(&op),
                arg(&y.ptr),
                arg(&yt),
                arg(&dy.ptr),
                arg(&dt),
                arg(&dx.ptr),
                arg(&xt),
                arg(&len),
            ],
        )
    }

    /// Top-`k` of each row of `x [rows, len]`: `vals [rows, k]` f32, `idx [rows, k]` i32,
    /// descending, ties to the lower index, NaN first.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn topk(
        &self,
        gpu: &Gpu,
        x: Dev,
        vals: u64,
        idx: u64,
        rows: usize,
        len: usize,
        k: usize,
    ) -> Result<()> {
        if k > len {
            return Err(Error::invalid("topk k", k, "must be <= the row length"));
        }
        if rows == 0 || k == 0 {
            return Ok(());
        }
        let (ri, li, ki, xt) = (
            int("topk rows", rows)?,
            int("topk len", len)?,
            int("topk k", k)?,
            x.dtype.code(),
        );
        gpu.launch(
            self.k.topk_rows,
            rows.div_ceil(BLOCK as usize) as u32,
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&xt),
                arg(&vals),
                arg(&idx),
                arg(&ri),
                arg(&li),
                arg(&ki),
            ],
        )
    }

    /// Row gather `out[r] = x[idx[r]]` for `n` rows of `row` elements (any dtype; `out` has
    /// `x`'s type) from `x` of `x_rows` rows. An id outside `0..x_rows` is checked on the
    /// device: it writes the error record `err` (code 7, see `RouteError`) and a zero row.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`]; `err` is the caller's four-i32 error record.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows(
        &self,
        gpu: &Gpu,
        (x, x_rows): (Dev, usize),
        idx: u64,
        out: u64,
        n: usize,
        row: usize,
        err: u64,
    ) -> Result<()> {
        if n == 0 || row == 0 {
            return Ok(());
        }
        let (ni, xr) = (int("gather rows", n)?, int("gather source rows", x_rows)?);
        let (f, words) = if (row * x.dtype.size()).is_multiple_of(4) {
            (self.k.gather_rows, row * x.dtype.size() / 4)
        } else {
            (self.k.gather_rows_u16, row)
        };
        gpu.launch(
            f,
            ni as u32,
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&idx),
                arg(&out),
                arg(&xr),
                arg(&words),
                arg(&err),
            ],
        )
    }

    /// `out[n, j] = x[n, idx[n, j]]` (f32) for `x [rows, e]`, `idx [rows, k]`; an id outside
    /// `0..e` writes the error record `err` (code 9) and reads 0.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`]; `err` is the caller's four-i32 error record.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_cols(
        &self,
        gpu: &Gpu,
        x: Dev,
        idx: u64,
        out: u64,
        rows: usize,
        e: usize,
        k: usize,
        err: u64,
    ) -> Result<()> {
        let (ei, ki, xt) = (
            int("gather_cols e", e)?,
            int("gather_cols k", k)?,
            x.dtype.code(),
        );
        gpu.launch(
            self.k.gather_cols,
            grid(rows * k),
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&xt),
                arg(&idx),
                arg(&out),
                arg(&rows),
                arg(&ei),
                arg(&ki),
                arg(&err),
            ],
        )
    }

    /// `out [rows, e]` (f32) = 0 except `out[n, idx[n, j]] += src[n, j]` in increasing `j`;
    /// an id outside `0..e` writes the error record `err` (code 10) and is skipped.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`]; `err` is the caller's four-i32 error record.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scatter_cols(
        &self,
        gpu: &Gpu,
        src: Dev,
        idx: u64,
        out: u64,
        rows: usize,
        e: usize,
        k: usize,
        err: u64,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (ri, ei, ki, st) = (
            int("scatter_cols rows", rows)?,
            int("scatter_cols e", e)?,
            int("scatter_cols k", k)?,
            src.dtype.code(),
        );
        gpu.launch(
            self.k.scatter_cols,
            rows.div_ceil(BLOCK as usize) as u32,
            BLOCK,
            &mut [
                arg(&src.ptr),
                arg(&st),
                arg(&idx),
                arg(&out),
                arg(&ri),
                arg(&ei),
                arg(&ki),
                arg(&err),
            ],
        )
    }

    /// Copies `x` (contiguous, dims `in_dims`) to `y` with its dimensions permuted:
    /// `y`'s dimension `d` is `x`'s dimension `perm[d]` (rank ≤ 6; 2- or 4-byte elements;
    /// `narrow`, `cat` and `transpose2d` are this with suitable shapes and offsets).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn permute(
        &self,
        gpu: &Gpu,
        x: Dev,
        y: u64,
        in_dims: &[usize],
        perm: &[usize],
    ) -> Result<()> {
        let rank = in_dims.len();
        if rank == 0 || rank > 6 || perm.len() != rank {
            return Err(Error::invalid(
                "permute rank",
                rank,
                "must be 1..=6 with one permutation entry per dimension",
            ));
        }
        let mut strides = [0i64; 6];
        let mut s = 1i64;
        for d in (0..rank).rev() {
            strides[d] = s;
            s *= in_dims[d] as i64;
        }
        let mut a = PermuteArgs {
            rank: rank as i32,
            out_dims: [1; 6],
            in_strides: [0; 6],
        };
        for (d, &p) in perm.iter().enumerate() {
            if p >= rank {
                return Err(Error::invalid("permute axis", p, "must be < rank"));
            }
            a.out_dims[d] = in_dims[p] as i64;
            a.in_strides[d] = strides[p];
        }
        let n: usize = in_dims.iter().product();
        if n == 0 {
            return Ok(());
        }
        let eb = x.dtype.size() as i32;
        gpu.launch(
            self.k.permute_copy,
            grid(n),
            BLOCK,
            &mut [arg(&x.ptr), arg(&y), arg(&eb), arg(&n), arg(&a)],
        )
    }

    /// In place `dst[idx[r]] += w[r] · src[r]` (`dst [m, row]` f32, `src [n, row]`, `idx
    /// [n]` i32, `w [n]` f32 optional), each destination adding its sources in increasing
    /// `r` with the CPU op's exact f32 operations: bitwise equal to it. The sources are put in
    /// destination order by a stable radix sort of the ids (integer work, O(n) per 8-bit
    /// pass), then every destination row sums its segment. An id outside `0..m` writes the
    /// error record `err` (code 8) and that source is skipped.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`]; `err` is the caller's four-i32 error record.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn index_add_rows(
        &self,
        gpu: &Gpu,
        dst: u64,
        (m, row): (usize, usize),
        idx: u64,
        src: Dev,
        w: Option<u64>,
        n: usize,
        err: u64,
    ) -> Result<()> {
        if n == 0 || m == 0 || row == 0 {
            return Ok(());
        }
        let (ni, mi) = (int("index_add rows", n)?, int("index_add dst rows", m)?);
        let chunks = n.div_ceil(SORT_CHUNK);
        let hist_len = int("index_add digit histogram", 256 * chunks)?;
        let ci = chunks as i32;
        // keys, values (ping-pong), in-chunk ranks, digit histogram
        let scratch = gpu.alloc((5 * n + 256 * chunks) * 4)?;
        let key = [scratch.ptr(), scratch.ptr() + (2 * n * 4) as u64];
        let val = [
            scratch.ptr() + (n * 4) as u64,
            scratch.ptr() + (3 * n * 4) as u64,
        ];
        let rank = scratch.ptr() + (4 * n * 4) as u64;
        let hist = scratch.ptr() + (5 * n * 4) as u64;
        let bounds = gpu.alloc(2 * m * 4)?;
        gpu.memset(&bounds, 0)?;
        let (first, last) = (bounds.ptr(), bounds.ptr() + (m * 4) as u64);
        gpu.launch(
            self.k.index_keys,
            grid(n),
            BLOCK,
            &mut [
                arg(&idx),
                arg(&ni),
                arg(&mi),
                arg(&key[0]),
                arg(&val[0]),
                arg(&err),
            ],
        )?;
        // Keys are in 0..=m (m marks a reported bad id): 8-bit digits up to m's top bit.
        let bits = usize::BITS - m.leading_zeros();
        let mut cur = 0;
        for pass in 0..bits.div_ceil(8) {
            let shift = (8 * pass) as i32;
            let nxt = 1 - cur;
            gpu.launch(
                self.k.sort_digits,
                chunks as u32,
                SORT_CHUNK as u32,
                &mut [
                    arg(&key[cur]),
                    arg(&ni),
                    arg(&shift),
                    arg(&ci),
                    arg(&hist),
                    arg(&rank),
                ],
            )?;
            gpu.launch(
                self.k.scan_excl,
                1,
                SORT_CHUNK as u32,
                &mut [arg(&hist), arg(&hist_len)],
            )?;
            gpu.launch(
                self.k.sort_scatter,
                chunks as u32,
                SORT_CHUNK as u32,
                &mut [
                    arg(&key[cur]),
                    arg(&val[cur]),
                    arg(&ni),
                    arg(&shift),
                    arg(&ci),
                    arg(&hist),
                    arg(&rank),
                    arg(&key[nxt]),
                    arg(&val[nxt]),
                ],
            )?;
            cur = nxt;
        }
        gpu.launch(
            self.k.segment_bounds,
            grid(n),
            BLOCK,
            &mut [arg(&key[cur]), arg(&ni), arg(&mi), arg(&first), arg(&last)],
        )?;
        // Column blocks per destination row: `APPLY_COLS` (8) columns per thread, so a few
        // long rows (GQA head sums: 16 rows of T·D) still fill the GPU; short rows take one
        // warp.
        let threads = if row < BLOCK as usize { 32 } else { BLOCK };
        let col_blocks = row.div_ceil(threads as usize * 8).clamp(1, 65535) as u32;
        let (st, wp) = (src.dtype.code(), w.unwrap_or(0));
        gpu.launch_2d(
            self.k.index_add_apply,
            (mi as u32, col_blocks),
            threads,
            0,
            &mut [
                arg(&src.ptr),
                arg(&st),
                arg(&wp),
                arg(&val[cur]),
                arg(&first),
                arg(&last),
                arg(&dst),
                arg(&row),
            ],
        )
    }

    /// SwiGLU backward: `d_gate = dy · up · silu'(gate)`, `d_up = dy · silu(gate)`, f32
    /// math stored as `d_gate`'s element type (f32 or bf16; `d_up` has the same); 8
    /// elements per thread step where `n` is a multiple of 8 and the tensors 16-byte aligned.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn swiglu_backward(
        &self,
        gpu: &Gpu,
        gate: Dev,
        up: Dev,
        dy: Dev,
        d_gate: Dev,
        d_up: u64,
        n: usize,
    ) -> Result<()> {
        let (gt, ut, dt, ot) = (
            gate.dtype.code(),
            up.dtype.code(),
            dy.dtype.code(),
            d_gate.dtype.code(),
        );
        let vec = vec8(n, &[gate.ptr, up.ptr, dy.ptr, d_gate.ptr, d_up]);
        gpu.launch(
            self.k.swiglu_bwd,
            grid(if vec == 1 { n / 8 } else { n }),
            BLOCK,
            &mut [
                arg(&gate.ptr),
                arg(&gt),
                arg(&up.ptr),
                arg(&ut),
                arg(&dy.ptr),
                arg(&dt),
                arg(&d_gate.ptr),
                arg(&d_up),
                arg(&ot),
                arg(&n),
                arg(&vec),
            ],
        )
    }

    /// SwiGLU of gate‖up rows: `y[r, j] = silu(gu[r, j]) · gu[r, f + j]` for the `n = rows·f`
    /// elements of `y [rows, f]`, `gu [rows, 2f]` (any float types). `f` a multiple of 8 and
    /// 16-byte aligned tensors: 8 consecutive outputs per thread step (16-byte bf16 accesses).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn swiglu_gate_up(
        &self,
        gpu: &Gpu,
        gu: Dev,
        y: Dev,
        f: usize,
        n: usize,
    ) -> Result<()> {
        float_only("swiglu_gate_up gate_up", gu)?;
        let (gt, yt) = (gu.dtype.code(), y.dtype.code());
        let vec = vec8(f, &[gu.ptr, y.ptr]);
        gpu.launch(
            self.k.swiglu_gate_up,
            grid(if vec == 1 { n / 8 } else { n }),
            BLOCK,
            &mut [
                arg(&gu.ptr),
                arg(&gt),
                arg(&y.ptr),
                arg(&yt),
                arg(&f),
                arg(&n),
                arg(&vec),
            ],
        )
    }

    /// Backward of [`TensorKernels::swiglu_gate_up`]: `d_gu [rows, 2f]` (`d_gate` in the
    /// first f columns of each row, `d_up` in the last f; f32 math stored as `d_gu`'s type,
    /// f32 or bf16) from `gu [rows, 2f]` and `dy [rows, f]`, `n = rows·f`; vectorised as the
    /// forward.
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn swiglu_gate_up_backward(
        &self,
        gpu: &Gpu,
        gu: Dev,
        dy: Dev,
        d_gu: Dev,
        f: usize,
        n: usize,
    ) -> Result<()> {
        float_only("swiglu_gate_up_backward gate_up", gu)?;
        float_only("swiglu_gate_up_backward d_gate_up", d_gu)?;
        let (gt, dt, ot) = (gu.dtype.code(), dy.dtype.code(), d_gu.dtype.code());
        let vec = vec8(f, &[gu.ptr, dy.ptr, d_gu.ptr]);
        gpu.launch(
            self.k.swiglu_gate_up_bwd,
            grid(if vec == 1 { n / 8 } else { n }),
            BLOCK,
            &mut [
                arg(&gu.ptr),
                arg(&gt),
                arg(&dy.ptr),
                arg(&dt),
                arg(&d_gu.ptr),
                arg(&ot),
                arg(&f),
                arg(&n),
                arg(&vec),
            ],
        )
    }

    /// `out[0]` (f32) = Σ x (`AllReduce::Sum`), its mean, Σ x² or √(Σ x²) over `n`
    /// elements: fixed-grid partial sums in f64, then one ordered sum (deterministic).
    ///
    /// # Safety
    /// See [`TensorKernels::cast`].
    pub unsafe fn reduce_all(
        &self,
        gpu: &Gpu,
        op: AllReduce,
        x: Dev,
        out: u64,
        n: usize,
    ) -> Result<()> {
        let blocks = grid(n);
        let partial = gpu.alloc(blocks as usize * 8)?;
        let (squares, fin) = match op {
            AllReduce::Sum => (0i32, 0i32),
            AllReduce::Mean => (0, 1),
            AllReduce::SumSquares => (1, 0),
            AllReduce::Norm => (1, 2),
        };
        let (xt, bi) = (x.dtype.code(), blocks as i32);
        gpu.launch(
            self.k.sum_all_partial,
            blocks,
            BLOCK,
            &mut [
                arg(&x.ptr),
                arg(&xt),
                arg(&n),
                arg(&squares),
                arg(&partial.ptr()),
            ],
        )?;
        gpu.launch(
            self.k.reduce_partials,
            1,
            32,
            &mut [arg(&partial.ptr()), arg(&bi), arg(&fin), arg(&n), arg(&out)],
        )
    }
}
