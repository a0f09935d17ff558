//! The transformer-step kernels with a raw API (device buffers + shapes): RMSNorm and the
//! residual stream's sum, RoPE,
//! softmax cross-entropy over the vocabulary, embedding gather and its deterministic
//! scatter-add backward, causal GQA attention on cuBLAS GEMMs with a masked-softmax
//! kernel, fused causal attention on tensor cores ([`FlashAttention`]: no `[T, T]` matrix
//! in memory), and the fused AdamW update.
//!
//! Every op only queues work on the engine's stream (no host reads), so a step made of
//! them can be captured as a graph; the few scratch buffers come from the stream-ordered
//! pool. Activations are stored in the [`Ops`]' element type (f32 parity mode or bf16);
//! row statistics, losses, weight gradients of norms and embeddings, master weights and
//! optimizer moments are f32. Reductions run in a fixed order: bitwise reproducible.
//!
//! Semantics are those of megamoe-tensor's CPU ops of the same names (its parity tests in
//! `tests/ops_parity.rs` compare them on fresh random inputs).

mod attention;
mod flash;
mod loss;
mod norm;
mod optim;

pub use attention::{AttentionGrads, AttentionShape};
pub use flash::FlashAttention;
pub use optim::{AdamWParams, AdamWSegment, Moments, SegmentTable};

use cudarc::driver::sys as dsys;

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::gemm::Elem;
use crate::pool::DeviceMem;

const SRC: &str = include_str!("kernels.cu");
/// Threads per block of every kernel in kernels.cu (`BLOCK` there).
const BLOCK: u32 = 256;

struct Kernels {
    rms_norm_fwd: dsys::CUfunction,
    rms_norm_fwd_vec: dsys::CUfunction,
    add_sum_vec: dsys::CUfunction,
    rms_norm_bwd_input: dsys::CUfunction,
    rms_norm_bwd_add: dsys::CUfunction,
    rms_norm_bwd_add_f32dy: dsys::CUfunction,
    rms_norm_bwd_weight_partial: dsys::CUfunction,
    sum_partials: dsys::CUfunction,
    rope_table: dsys::CUfunction,
    rope_apply: dsys::CUfunction,
    rope_apply_vec: dsys::CUfunction,
    ce_count_valid: dsys::CUfunction,
    ce_fwd_bwd: dsys::CUfunction,
    ce_fwd_bwd_vec: dsys::CUfunction,
    ce_mean: dsys::CUfunction,
    embed_gather: dsys::CUfunction,
    embed_rank: dsys::CUfunction,
    exclusive_scan: dsys::CUfunction,
    embed_place: dsys::CUfunction,
    embed_scatter_add: dsys::CUfunction,
    causal_softmax_fwd: dsys::CUfunction,
    causal_softmax_bwd: dsys::CUfunction,
    adamw: dsys::CUfunction,
    adamw_dev: dsys::CUfunction,
    seg_sumsq_partial: dsys::CUfunction,
    seg_norm_finish: dsys::CUfunction,
    adamw_segments: dsys::CUfunction,
}

/// The step kernels compiled for one storage type.
pub struct Ops {
    elem: Elem,
    k: Kernels,
}

// SAFETY: the functions are handles into modules loaded in the GPU's context, valid from
// any thread where that context is current (`Gpu::bind`); launching goes through a `&Gpu`.
unsafe impl Send for Ops {}
unsafe impl Sync for Ops {}

impl Ops {
    /// Compiles (once per process and type) and loads the kernels for storage `elem`.
    pub fn new(gpu: &mut Gpu, elem: Elem) -> Result<Ops> {
        let defines = [("ELEM", elem.c_type())];
        let mut get = |name: &str| gpu.kernels.function("ops", SRC, &defines, name);
        let k = Kernels {
            rms_norm_fwd: get("rms_norm_fwd")?,
            rms_norm_fwd_vec: get("rms_norm_fwd_vec")?,
            add_sum_vec: get("add_sum_vec")?,
            rms_norm_bwd_input: get("rms_norm_bwd_input")?,
            rms_norm_bwd_add: get("rms_norm_bwd_add")?,
            rms_norm_bwd_add_f32dy: get("rms_norm_bwd_add_f32dy")?,
            rms_norm_bwd_weight_partial: get("rms_norm_bwd_weight_partial")?,
            sum_partials: get("sum_partials")?,
            rope_table: get("rope_table")?,
            rope_apply: get("rope_apply")?,
            rope_apply_vec: get("rope_apply_vec")?,
            ce_count_valid: get("ce_count_valid")?,
            ce_fwd_bwd: get("ce_fwd_bwd")?,
            ce_fwd_bwd_vec: get("ce_fwd_bwd_vec")?,
            ce_mean: get("ce_mean")?,
            embed_gather: get("embed_gather")?,
            embed_rank: get("embed_rank")?,
            exclusive_scan: get("exclusive_scan")?,
            embed_place: get("embed_place")?,
            embed_scatter_add: get("embed_scatter_add")?,
            causal_softmax_fwd: get("causal_softmax_fwd")?,
            causal_softmax_bwd: get("causal_softmax_bwd")?,
            adamw: get("adamw")?,
            adamw_dev: get("adamw_dev")?,
            seg_sumsq_partial: get("seg_sumsq_partial")?,
            seg_norm_finish: get("seg_norm_finish")?,
            adamw_segments: get("adamw_segments")?,
        };
        Ok(Ops { elem, k })
    }

    /// The storage type of activations.
    pub fn elem(&self) -> Elem {
        self.elem
    }
}

/// Checks that `buf` holds at least `elems` elements of `size` bytes.
pub(crate) fn need(
    what: &'static str,
    buf: &dyn DeviceMem,
    elems: usize,
    size: usize,
) -> Result<()> {
    let bytes = elems
        .checked_mul(size)
        .ok_or_else(|| Error::invalid("buffer size", elems, "overflows usize"))?;
    if buf.bytes() < bytes {
        return Err(Error::Length {
            what,
            host: bytes,
            device: buf.bytes(),
        });
    }
    Ok(())
}

/// A dimension passed to a kernel as `int`.
fn int(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(field, v, "must fit in i32"))
}

/// A count that must be at least 1.
pub(crate) fn positive(field: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        Err(Error::invalid(field, v, "must be >= 1"))
    } else {
        Ok(())
    }
}

/// Blocks of a grid-stride loop over `n` items.
fn stride_grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 132 * 16) as u32
}
