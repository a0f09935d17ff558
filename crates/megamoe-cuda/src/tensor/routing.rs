//! [`RouteKernels`]: the MoE routing, capacity and static-buffer kernels behind
//! megamoe-tensor's routing and capacity families (`routing.cu`), so that a MoE layer runs
//! on the device with no host read: router helpers, the stable per-expert positions of the
//! assignments (a chunked counting sort: integer histograms, a fixed-order scan, an in-chunk
//! rank), capacity selection by position or by gate, the static `[E·C, d]` layout, the
//! permute gather and the weighted combine with its backward, and the masking helpers of
//! grouped GEMMs over fixed-stride row groups (those last two in `buffers.rs`).
//!
//! Index checks run in every build: a bad id writes the caller's error record (four i32:
//! code, index, position, bound; see [`RouteError`]) instead of faulting, and the caller
//! reads it at its next synchronisation.

use std::ffi::c_void;

use cudarc::driver::sys as dsys;

use crate::device::{arg, Gpu};
use crate::error::{Error, Result};

/// routing.cu with the fused router (router.cu) appended: one module.
const SRC: &str = concat!(include_str!("routing.cu"), include_str!("router.cu"));
pub(super) const BLOCK: u32 = 256;
/// Assignments per chunk of the counting sort (`CHUNK` in routing.cu).
const CHUNK: usize = 256;
/// Threads per expert block of the highest-gate capacity select (`SEL_THREADS` in routing.cu).
const SEL_THREADS: u32 = 1024;
/// Most slots per token the combine kernels take (their shared arrays).
pub const MAX_SLOTS: usize = 64;
/// Most expert groups of the group-limited mask.
pub const MAX_GROUPS: usize = 256;

pub(super) fn grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 132 * 16) as u32
}

pub(super) fn int(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(field, v, "must fit in i32"))
}

/// What a device index check found (decoded from the error record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteError {
    /// 1 slot id outside `0..bound`; 2 negative expert id; 3 row id outside `-1..bound`;
    /// 4 expert over capacity (`index` = expert, `bound` = capacity); 5 group counts outside
    /// `0..=capacity` or not summing to the rows; 6 group size outside `0..=stride`; the
    /// index ops' ids outside `0..bound` (kernels.cu, ops' cross-entropy): 7 `index_select`,
    /// 8 `index_add_rows`, 9 `gather_cols`, 10 `scatter_cols`, 11 `cross_entropy` target;
    /// 12 a buffer row named by two assignments (combine backward); 13 a slot id outside
    /// `0..pool` (the fused router backward).
    pub code: i32,
    /// The bad value.
    pub index: i32,
    /// Where it was (element position; group for codes 5 and 6).
    pub position: i32,
    /// The bound it broke.
    pub bound: i32,
}

impl RouteError {
    /// Decodes a downloaded error record; `None` when no check failed.
    pub fn decode(record: [i32; 4]) -> Option<RouteError> {
        (record[0] != 0).then_some(RouteError {
            code: record[0],
            index: record[1],
            position: record[2],
            bound: record[3],
        })
    }

    /// The index op whose id was outside `0..bound` (codes 7–11), if it was one.
    pub fn index_op(&self) -> Option<&'static str> {
        Some(match self.code {
            7 => "index_select",
            8 => "index_add_rows",
            9 => "gather_cols",
            10 => "scatter_cols",
            11 => "cross_entropy",
            _ => return None,
        })
    }

    /// The op family whose check failed and the rule it broke.
    pub fn rule(&self) -> (&'static str, &'static str) {
        if let Some(op) = self.index_op() {
            return (op, "ids must be in 0..bound");
        }
        match self.code {
            1 => ("slot_counts", "slot ids must be in 0..n_slots"),
            2 => ("routing", "expert ids must be non-negative"),
            3 => (
                "static expert buffers",
                "row ids must be -1 (none) or in 0..rows",
            ),
            4 => (
                "capacity_permutation",
                "an expert keeps at most `capacity` assignments (capacity_keep)",
            ),
            5 => (
                "pad_groups/unpad_groups",
                "counts must be in 0..=capacity and sum to the rows",
            ),
            6 => (
                "grouped_matmul",
                "strided group sizes must be in 0..=stride",
            ),
            12 => (
                "combine_slots_backward",
                "each buffer row holds at most one assignment (capacity_permutation)",
            ),
            13 => ("route_backward", "slot ids must be in 0..pool"),
            _ => ("device check", "unknown error code"),
        }
    }
}

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        pub(super) struct Fns { $(pub(super) $name: dsys::CUfunction,)* }
        impl Fns {
            fn load(gpu: &mut Gpu) -> Result<Fns> {
                Ok(Fns { $($name: gpu.kernels.function("routing", SRC, &[], stringify!($name))?,)* })
            }
        }
    };
}

kernels!(
    group_limited_mask,
    expand_null_slots,
    reduce_null_slots,
    real_slot_mask,
    kept_slots,
    normalize_rows,
    normalize_rows_bwd,
    route_hist,
    route_scan,
    route_place,
    keep_earliest,
    route_list,
    keep_select,
    capacity_place,
    clamp_counts,
    sort_place,
    slot_counts,
    expert_bias_step,
    gather_rows_or_zero,
    combine_slots,
    combine_rows_of,
    combine_slots_bwd,
    check_counts,
    pad_groups,
    unpad_groups,
    zero_pad_rows,
    axpby,
    mask_rows,
    offsets_of,
    fill_i32,
    route_tokens,
    route_tokens_bwd,
);

/// The routing kernels, compiled once per process and loaded.
pub struct RouteKernels {
    pub(super) k: Fns,
}

// SAFETY: as `TensorKernels`: function handles of a module loaded in the GPU's context,
// launched through a `&Gpu` whose context is current.
unsafe impl Send for RouteKernels {}
unsafe impl Sync for RouteKernels {}

/// An optional device address as a kernel argument (0 = null).
fn opt(p: Option<u64>) -> u64 {
    p.unwrap_or(0)
}

impl RouteKernels {
    /// Compiles and loads the module (header-free, cached per process).
    pub fn new(gpu: &mut Gpu) -> Result<RouteKernels> {
        Ok(RouteKernels { k: Fns::load(gpu)? })
    }

    pub(super) unsafe fn go(
        &self,
        gpu: &Gpu,
        f: dsys::CUfunction,
        grid: u32,
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        gpu.launch(f, grid, block, args)
    }

    /// Group-limited mask of `sel [rows, e]` f32 into `out` (`g ≤ MAX_GROUPS` groups, best
    /// `m` kept).
    ///
    /// # Safety
    /// For this and every method below: each address must be a live device allocation of
    /// the GPU's context holding the elements the doc names; outputs do not overlap inputs;
    /// `err` is the caller's four-i32 error record.
    pub unsafe fn group_limited_mask(
        &self,
        gpu: &Gpu,
        sel: u64,
        (rows, e, g, m): (usize, usize, usize, usize),
        out: u64,
    ) -> Result<()> {
        if g == 0 || g > MAX_GROUPS || m == 0 || m > g || !e.is_multiple_of(g) {
            return Err(Error::invalid(
                "n_groups",
                g,
                "must be in 1..=256, divide E and be >= topk_groups >= 1",
            ));
        }
        let (r, e, g, m) = (
            int("rows", rows)?,
            int("e", e)?,
            int("groups", g)?,
            int("m", m)?,
        );
        self.go(
            gpu,
            self.k.group_limited_mask,
            grid(rows),
            BLOCK,
            &mut [arg(&sel), arg(&r), arg(&e), arg(&g), arg(&m), arg(&out)],
        )
    }

    /// `out [rows, e + n_null]` = `z [rows, e]` then `zn [rows]` repeated `n_null` times.
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn expand_null_slots(
        &self,
        gpu: &Gpu,
        z: u64,
        zn: u64,
        (rows, e, n_null): (usize, usize, usize),
        out: u64,
    ) -> Result<()> {
        let (r, ei, ni) = (int("rows", rows)?, int("e", e)?, int("n_null", n_null)?);
        self.go(
            gpu,
            self.k.expand_null_slots,
            grid(rows * (e + n_null)),
            BLOCK,
            &mut [arg(&z), arg(&zn), arg(&r), arg(&ei), arg(&ni), arg(&out)],
        )
    }

    /// `d [rows, w]` → `dz [rows, e]`, `dn [rows]` (sum of the null columns).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn reduce_null_slots(
        &self,
        gpu: &Gpu,
        d: u64,
        (rows, e, w): (usize, usize, usize),
        dz: u64,
        dn: u64,
    ) -> Result<()> {
        let (r, ei, wi) = (int("rows", rows)?, int("e", e)?, int("w", w)?);
        self.go(
            gpu,
            self.k.reduce_null_slots,
            grid(rows),
            BLOCK,
            &mut [arg(&d), arg(&r), arg(&ei), arg(&wi), arg(&dz), arg(&dn)],
        )
    }

    /// `out[i]` = 1 where `0 ≤ idx[i] < n_real`, else 0 (`n` elements).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn real_slot_mask(
        &self,
        gpu: &Gpu,
        idx: u64,
        n: usize,
        n_real: usize,
        out: u64,
    ) -> Result<()> {
        let (ni, nr) = (int("n", n)?, int("n_real", n_real)?);
        self.go(
            gpu,
            self.k.real_slot_mask,
            grid(n),
            BLOCK,
            &mut [arg(&idx), arg(&ni), arg(&nr), arg(&out)],
        )
    }

    /// `out[i]` = `idx[i]` where `keep[i] ≠ 0`, else −1 (`n` elements).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn kept_slots(
        &self,
        gpu: &Gpu,
        idx: u64,
        keep: u64,
        n: usize,
        out: u64,
    ) -> Result<()> {
        let ni = int("n", n)?;
        self.go(
            gpu,
            self.k.kept_slots,
            grid(n),
            BLOCK,
            &mut [arg(&idx), arg(&keep), arg(&ni), arg(&out)],
        )
    }

    /// Row normalisation `g / (Σ g + eps)` of `g [rows, k]`, or its backward when `dn` is
    /// given (`g` the forward input).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn normalize_rows(
        &self,
        gpu: &Gpu,
        g: u64,
        dn: Option<u64>,
        (rows, k): (usize, usize),
        eps: f32,
        out: u64,
    ) -> Result<()> {
        let (r, ki) = (int("rows", rows)?, int("k", k)?);
        match dn {
            None => self.go(
                gpu,
                self.k.normalize_rows,
                grid(rows),
                BLOCK,
                &mut [arg(&g), arg(&r), arg(&ki), arg(&eps), arg(&out)],
            ),
            Some(d) => self.go(
                gpu,
                self.k.normalize_rows_bwd,
                grid(rows),
                BLOCK,
                &mut [arg(&g), arg(&d), arg(&r), arg(&ki), arg(&eps), arg(&out)],
            ),
        }
    }

    /// `y[..n] = v` (i32).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn fill_i32(&self, gpu: &Gpu, y: u64, n: usize, v: i32) -> Result<()> {
        let ni = int("n", n)?;
        self.go(
            gpu,
            self.k.fill_i32,
            grid(n),
            BLOCK,
            &mut [arg(&y), arg(&ni), arg(&v)],
        )
    }

    /// Stable positions per expert: for each of the `n` assignments `idx` (i32; `keep` f32
    /// optional), `pos[a]` = its position among the assignments of its expert that take
    /// part (real expert `< n_real`, kept), in flat order; −1 for the others.
    /// `counts [n_real]` = assignments per expert. Negative ids are reported (code 2).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn positions(
        &self,
        gpu: &Gpu,
        (idx, keep): (u64, Option<u64>),
        (n, n_real): (usize, usize),
        pos: u64,
        counts: u64,
        err: u64,
    ) -> Result<()> {
        if n_real == 0 {
            return self.fill_i32(gpu, pos, n, -1);
        }
        let chunks = n.div_ceil(CHUNK).max(1);
        let hist = gpu.alloc(chunks * n_real * 4)?;
        let hp = hist.ptr();
        self.fill_i32(gpu, hp, chunks * n_real, 0)?;
        let (ni, nr, ci) = (int("n", n)?, int("n_real", n_real)?, int("chunks", chunks)?);
        let kp = opt(keep);
        if n > 0 {
            self.go(
                gpu,
                self.k.route_hist,
                chunks as u32,
                CHUNK as u32,
                &mut [arg(&idx), arg(&kp), arg(&ni), arg(&nr), arg(&hp), arg(&err)],
            )?;
        }
        self.go(
            gpu,
            self.k.route_scan,
            n_real.div_ceil(BLOCK as usize / 32).max(1) as u32,
            BLOCK,
            &mut [arg(&hp), arg(&ci), arg(&nr), arg(&counts)],
        )?;
        if n > 0 {
            self.go(
                gpu,
                self.k.route_place,
                chunks as u32,
                CHUNK as u32,
                &mut [arg(&idx), arg(&kp), arg(&ni), arg(&nr), arg(&hp), arg(&pos)],
            )?;
        }
        Ok(())
    }

    /// `off [n]` = exclusive prefix of `counts [n]`.
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn offsets(&self, gpu: &Gpu, counts: u64, n: usize, off: u64) -> Result<()> {
        let ni = int("n", n)?;
        self.go(
            gpu,
            self.k.offsets_of,
            1,
            1,
            &mut [arg(&counts), arg(&ni), arg(&off)],
        )
    }

    /// Capacity selection `keep [n]` f32 from the positions of [`RouteKernels::positions`]
    /// (computed without `keep`): `gates = None` keeps the earliest `cap` per expert (every
    /// real one when `cap` is `None`); `Some(gates)` keeps the `cap` highest gates (ties →
    /// lower flat index), found per expert by a radix select over its assignments (one
    /// block per expert, linear in its count).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn capacity_keep(
        &self,
        gpu: &Gpu,
        idx: u64,
        pos: u64,
        counts: u64,
        (n, n_real): (usize, usize),
        cap: Option<usize>,
        gates: Option<u64>,
        keep: u64,
    ) -> Result<()> {
        let ni = int("n", n)?;
        let capi = match cap {
            Some(c) => int("capacity", c)?,
            None => -1,
        };
        match (gates, cap) {
            (Some(g), Some(_)) if n_real > 0 && n > 0 => {
                let off = gpu.alloc(n_real * 4)?;
                let list = gpu.alloc(n * 4)?;
                let (op, lp) = (off.ptr(), list.ptr());
                self.offsets(gpu, counts, n_real, op)?;
                self.go(
                    gpu,
                    self.k.route_list,
                    grid(n),
                    BLOCK,
                    &mut [
                        arg(&idx),
                        arg(&pos),
                        arg(&ni),
                        arg(&op),
                        arg(&lp),
                        arg(&keep),
                    ],
                )?;
                self.go(
                    gpu,
                    self.k.keep_select,
                    int("n_real", n_real)? as u32,
                    SEL_THREADS,
                    &mut [
                        arg(&g),
                        arg(&capi),
                        arg(&counts),
                        arg(&op),
                        arg(&lp),
                        arg(&keep),
                    ],
                )
            }
            _ => self.go(
                gpu,
                self.k.keep_earliest,
                grid(n),
                BLOCK,
                &mut [arg(&pos), arg(&ni), arg(&capi), arg(&keep)],
            ),
        }
    }

    /// Static layout from positions (computed with `keep`): `slot_row [n]`, `row_token
    /// [n_real·cap]` (pad rows −1), `counts` clamped to `cap`; a position past `cap` is
    /// reported (code 4).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn capacity_place(
        &self,
        gpu: &Gpu,
        idx: u64,
        pos: u64,
        (n, k, n_real, cap): (usize, usize, usize, usize),
        slot_row: u64,
        row_token: u64,
        counts: u64,
        err: u64,
    ) -> Result<()> {
        self.fill_i32(gpu, row_token, n_real * cap, -1)?;
        let (ni, ki, ci, nr) = (
            int("n", n)?,
            int("k", k)?,
            int("capacity", cap)?,
            int("n_real", n_real)?,
        );
        if n > 0 {
            self.go(
                gpu,
                self.k.capacity_place,
                grid(n),
                BLOCK,
                &mut [
                    arg(&idx),
                    arg(&pos),
                    arg(&ni),
                    arg(&ki),
                    arg(&ci),
                    arg(&slot_row),
                    arg(&row_token),
                    arg(&err),
                ],
            )?;
        }
        self.go(
            gpu,
            self.k.clamp_counts,
            grid(n_real),
            BLOCK,
            &mut [arg(&counts), arg(&nr), arg(&ci)],
        )
    }

    /// Packed layout from positions and offsets: `token[off[e] + pos]`, `assignment[..]`,
    /// and `slot_row [n]` (the row of each assignment, −1 where it takes no part).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn sort_place(
        &self,
        gpu: &Gpu,
        (idx, pos, off): (u64, u64, u64),
        (n, k): (usize, usize),
        (token, assignment, slot_row): (u64, u64, u64),
    ) -> Result<()> {
        let (ni, ki) = (int("n", n)?, int("k", k)?);
        self.go(
            gpu,
            self.k.sort_place,
            grid(n),
            BLOCK,
            &mut [
                arg(&idx),
                arg(&pos),
                arg(&ni),
                arg(&ki),
                arg(&off),
                arg(&token),
                arg(&assignment),
                arg(&slot_row),
            ],
        )
    }

    /// Slot counts `cnt [n / k / seg, n_slots]` (zeroed here) of `idx [n]` (`k` slots per
    /// token, `seg` tokens per segment, `keep` optional), i32, or f32 when `f32_out` (exact:
    /// needs `n < 2^24`); ids outside `0..n_slots` are reported (code 1).
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn slot_counts(
        &self,
        gpu: &Gpu,
        idx: u64,
        keep: Option<u64>,
        (n, k, seg, n_slots): (usize, usize, usize, usize),
        (cnt, f32_out): (u64, bool),
        err: u64,
    ) -> Result<()> {
        if f32_out && n >= 1 << 24 {
            return Err(Error::invalid(
                "n",
                n,
                "f32 slot counts need fewer than 2^24 assignments (exact float sums)",
            ));
        }
        let segs = n.checked_div(k * seg).unwrap_or(0);
        self.fill_i32(gpu, cnt, segs * n_slots, 0)?;
        let (ni, ki, si, ns) = (
            int("n", n)?,
            int("k", k)?,
            int("seg", seg)?,
            int("n_slots", n_slots)?,
        );
        let kp = opt(keep);
        let fo = i32::from(f32_out);
        self.go(
            gpu,
            self.k.slot_counts,
            grid(n),
            BLOCK,
            &mut [
                arg(&idx),
                arg(&kp),
                arg(&ni),
                arg(&ki),
                arg(&si),
                arg(&ns),
                arg(&cnt),
                arg(&fo),
                arg(&err),
            ],
        )
    }

    /// Loss-free balancing step of `counts [n]` f32 into `out [n]`.
    ///
    /// # Safety
    /// See [`RouteKernels::group_limited_mask`].
    pub unsafe fn expert_bias_step(
        &self,
        gpu: &Gpu,
        counts: u64,
        n: usize,
        rate: f32,
        centre: bool,
        out: u64,
    ) -> Result<()> {
        let (ni, ci) = (int("n", n)?, i32::from(centre));
        self.go(
            gpu,
            self.k.expert_bias_step,
            1,
            1,
            &mut [arg(&counts), arg(&ni), arg(&rate), arg(&ci), arg(&out)],
        )
    }
}
