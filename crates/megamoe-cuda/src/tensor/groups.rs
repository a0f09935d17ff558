//! [`GroupKernels`]: the row-group copies around strided-batched grouped GEMMs
//! (`groups.cu`): packed row groups to a padded `[g·cap, ·]` buffer (pad rows zero) and
//! back (converting f32 ↔ bf16 on the way when asked), and zeroing the rows past each
//! group's size of a strided buffer. Copies move the widest word that divides the row and
//! both addresses.

use cudarc::driver::sys as dsys;

use super::routing::int;
use super::{Dev, Dtype};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};

const SRC: &str = include_str!("groups.cu");
const BLOCK: u32 = 256;
/// Most blocks of one launch (the kernels stride over rows).
const MAX_BLOCKS: usize = 132 * 16;

fn blocks(rows: usize) -> u32 {
    rows.clamp(1, MAX_BLOCKS) as u32
}

/// The widest copy word (16, 4 or 2 bytes) dividing `bytes` and every address.
fn unit(bytes: usize, addrs: &[u64]) -> i32 {
    let fits =
        |u: u64| (bytes as u64).is_multiple_of(u) && addrs.iter().all(|a| a.is_multiple_of(u));
    if fits(16) {
        16
    } else if fits(4) {
        4
    } else {
        2
    }
}

fn float_only(src: Dev, dst: Dev) -> Result<()> {
    if src.dtype == Dtype::I32 || dst.dtype == Dtype::I32 {
        return Err(Error::invalid(
            "row-group copy dtype",
            "i32",
            "must be f32 or bf16",
        ));
    }
    Ok(())
}

/// The row-group copy kernels, compiled once per process and loaded.
pub struct GroupKernels {
    pad_packed: dsys::CUfunction,
    unpad_packed: dsys::CUfunction,
    zero_past_sizes: dsys::CUfunction,
}

// SAFETY: as `TensorKernels`: function handles of a module loaded in the GPU's context,
// launched through a `&Gpu` whose context is current.
unsafe impl Send for GroupKernels {}
unsafe impl Sync for GroupKernels {}

impl GroupKernels {
    /// Compiles and loads the module (header-free, cached per process).
    pub fn new(gpu: &mut Gpu) -> Result<GroupKernels> {
        let mut get = |name: &str| gpu.kernels.function("groups", SRC, &[], name);
        Ok(GroupKernels {
            pad_packed: get("pad_packed")?,
            unpad_packed: get("unpad_packed")?,
            zero_past_sizes: get("zero_past_sizes")?,
        })
    }

    /// `dst [g·cap, n]` = group `i`'s `sizes[i]` rows of the packed `src` (from row
    /// `offsets[i]`), then zero rows; f32 or bf16, converted when the types differ
    /// (round to nearest even, the cast kernel's bits). A size outside `0..=cap` is
    /// reported in `err` (code 6).
    ///
    /// # Safety
    /// For this and every method below: each address must be a live device allocation of
    /// the GPU's context holding the rows the doc names (`sizes`, `offsets`: `g` i32; every
    /// group's rows inside `src`); outputs do not overlap inputs; `err` is the caller's
    /// four-i32 error record.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pad_packed(
        &self,
        gpu: &Gpu,
        src: Dev,
        dst: Dev,
        n: usize,
        (sizes, offsets): (u64, u64),
        (g, cap): (usize, usize),
        err: u64,
    ) -> Result<()> {
        let rows = g * cap;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        float_only(src, dst)?;
        let u = if src.dtype == dst.dtype {
            unit(n * src.dtype.size(), &[src.ptr, dst.ptr])
        } else {
            unit(n * dst.dtype.size(), &[dst.ptr])
        };
        let (sdt, ddt, ni, gi, ci) = (
            src.dtype.code(),
            dst.dtype.code(),
            int("n", n)?,
            int("groups", g)?,
            int("capacity", cap)?,
        );
        gpu.launch(
            self.pad_packed,
            blocks(rows),
            BLOCK,
            &mut [
                arg(&src.ptr),
                arg(&sdt),
                arg(&dst.ptr),
                arg(&ddt),
                arg(&ni),
                arg(&u),
                arg(&sizes),
                arg(&offsets),
                arg(&gi),
                arg(&ci),
                arg(&err),
            ],
        )
    }

    /// The counted rows of `src [g·cap, n]` into the packed rows of `dst` (group `i` from
    /// row `offsets[i]`): `dst = beta · dst + src` in f32 (`beta = 0` overwrites without
    /// reading `dst`; a plain copy when the types agree). Other rows of `dst` are untouched.
    ///
    /// # Safety
    /// See [`GroupKernels::pad_packed`]; the sizes must lie in `0..=cap` (checked when the
    /// groups were padded).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn unpad_packed(
        &self,
        gpu: &Gpu,
        src: Dev,
        dst: Dev,
        n: usize,
        (sizes, offsets): (u64, u64),
        (g, cap): (usize, usize),
        beta: f32,
    ) -> Result<()> {
        let rows = g * cap;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        float_only(src, dst)?;
        let copy = i32::from(src.dtype == dst.dtype && beta == 0.0);
        let u = unit(n * src.dtype.size(), &[src.ptr, dst.ptr]);
        let (sdt, ddt, ni, gi, ci) = (
            src.dtype.code(),
            dst.dtype.code(),
            int("n", n)?,
            int("groups", g)?,
            int("capacity", cap)?,
        );
        gpu.launch(
            self.unpad_packed,
            blocks(rows),
            BLOCK,
            &mut [
                arg(&src.ptr),
                arg(&sdt),
                arg(&dst.ptr),
                arg(&ddt),
                arg(&ni),
                arg(&copy),
                arg(&u),
                arg(&beta),
                arg(&sizes),
                arg(&offsets),
                arg(&gi),
                arg(&ci),
            ],
        )
    }

    /// Rows past each group's size in `out [g·stride, row]` become 0 (`row_bytes` bytes
    /// per row, any element type); a size outside `0..=stride` is reported (code 6).
    ///
    /// # Safety
    /// See [`GroupKernels::pad_packed`].
    pub unsafe fn zero_past_sizes(
        &self,
        gpu: &Gpu,
        out: u64,
        row_bytes: usize,
        sizes: u64,
        (g, stride): (usize, usize),
        err: u64,
    ) -> Result<()> {
        let rows = g * stride;
        if rows == 0 || row_bytes == 0 {
            return Ok(());
        }
        let (b, u, gi, si) = (
            int("row bytes", row_bytes)?,
            unit(row_bytes, &[out]),
            int("groups", g)?,
            int("stride", stride)?,
        );
        gpu.launch(
            self.zero_past_sizes,
            blocks(rows),
            BLOCK,
            &mut [
                arg(&out),
                arg(&b),
                arg(&u),
                arg(&sizes),
                arg(&gi),
                arg(&si),
                arg(&err),
            ],
        )
    }
}
