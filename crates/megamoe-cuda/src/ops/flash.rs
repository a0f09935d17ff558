//! Fused causal attention (FlashAttention-2 style, `flash.cu`): bf16 q, k, v `[BH, T, D]`
//! on tensor cores with f32 accumulation, the forward writing `o` and the per-row
//! log-sum-exp, the backward recomputing the probabilities tile by tile. Memory is
//! `O(BH·T·D)`: no `[T, T]` scores or probabilities exist, in either pass. Deterministic
//! (every output element has one writer, fixed loop order).

use cudarc::driver::{result as dres, sys as dsys};

use super::{int, need, positive};
use crate::device::{arg, Gpu};
use crate::error::{DriverCtx, Error, Result};
use crate::pool::DeviceMem;

const SRC: &str = include_str!("flash.cu");
/// Rows per block and per tile (`BR` in flash.cu); 4 warps of 16 rows.
const BR: usize = 64;
const THREADS: u32 = 128;

/// The fused attention kernels for one head dim.
pub struct FlashAttention {
    d: usize,
    fwd: dsys::CUfunction,
    delta: dsys::CUfunction,
    dkv: dsys::CUfunction,
    dq: dsys::CUfunction,
}

// SAFETY: the functions are handles into a module loaded in the GPU's context, valid from
// any thread where that context is current (`Gpu::bind`); launching goes through a `&Gpu`.
unsafe impl Send for FlashAttention {}
unsafe impl Sync for FlashAttention {}

/// Shared-memory bytes of the forward (`fwd`) or a backward kernel for head dim `d` (the
/// regions of flash.cu).
fn smem_bytes(d: usize, fwd: bool) -> usize {
    let tile = BR * (d + 8) * 2;
    let scores = 4 * 16 * 68 * 4;
    let probs = 4 * 16 * 72 * 2;
    let staging = 4 * 16 * (d + 4) * 4;
    debug_assert!(staging <= 2 * tile);
    if fwd {
        3 * tile + scores + probs + staging
    } else {
        // the staging reuses two tiles after the loop
        4 * tile + scores + probs + 2 * BR * 4
    }
}

impl FlashAttention {
    /// Whether a head dim has kernels: a multiple of 16 from 16 to 128.
    pub fn supports(head_dim: usize) -> bool {
        head_dim.is_multiple_of(16) && (16..=128).contains(&head_dim)
    }

    /// Compiles (once per process and head dim) and loads the kernels.
    pub fn new(gpu: &mut Gpu, head_dim: usize) -> Result<FlashAttention> {
        if !Self::supports(head_dim) {
            return Err(Error::invalid(
                "flash attention head_dim",
                head_dim,
                "must be a multiple of 16 from 16 to 128",
            ));
        }
        let d = head_dim.to_string();
        let defines = [("HEAD_DIM", d.as_str())];
        let mut get = |name: &str| gpu.kernels.function("flash", SRC, &defines, name);
        let f = FlashAttention {
            d: head_dim,
            fwd: get("flash_fwd")?,
            delta: get("flash_delta")?,
            dkv: get("flash_bwd_dkv")?,
            dq: get("flash_bwd_dq")?,
        };
        let attr = dsys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (func, fwd) in [(f.fwd, true), (f.dkv, false), (f.dq, false)] {
            let bytes = smem_bytes(head_dim, fwd) as i32;
            // SAFETY: `func` is a function of the module just loaded.
            unsafe { dres::function::set_function_attribute(func, attr, bytes) }
                .ctx("cuFuncSetAttribute")?;
        }
        Ok(f)
    }

    /// The head dim these kernels were compiled for.
    pub fn head_dim(&self) -> usize {
        self.d
    }

    /// Checks the shapes and the buffers (`[bh, t, d]` bf16 each, 16-byte aligned).
    fn check(
        &self,
        what: &'static str,
        bufs: &[&dyn DeviceMem],
        bh: usize,
        t: usize,
    ) -> Result<()> {
        positive("flash attention rows (B·heads)", bh)?;
        positive("flash attention seq", t)?;
        if bh > 65535 {
            return Err(Error::invalid(
                "flash attention rows (B·heads)",
                bh,
                "must be at most 65535 (grid y)",
            ));
        }
        for b in bufs {
            need(what, *b, bh * t * self.d, 2)?;
            if b.ptr() % 16 != 0 {
                return Err(Error::invalid(
                    "flash attention buffer address",
                    b.ptr(),
                    "must be 16-byte aligned",
                ));
            }
        }
        Ok(())
    }

    /// `o = softmax(scale · q kᵀ, causal) · v` per row of `bh` and `lse [bh, t]` (f32,
    /// natural log of each query row's sum of exponentials, for the backward). All of q,
    /// k, v, o bf16 `[bh, t, d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        q: &dyn DeviceMem,
        k: &dyn DeviceMem,
        v: &dyn DeviceMem,
        o: &dyn DeviceMem,
        lse: &dyn DeviceMem,
        (bh, t): (usize, usize),
        scale: f32,
    ) -> Result<()> {
        self.check("flash attention q/k/v/o", &[q, k, v, o], bh, t)?;
        need("flash attention lse", lse, bh * t, 4)?;
        let (ti, grid) = grid(bh, t)?;
        // SAFETY: sizes checked above; the kernel reads q/k/v and writes o and lse rows < t.
        unsafe {
            gpu.launch_2d(
                self.fwd,
                grid,
                THREADS,
                smem_bytes(self.d, true) as u32,
                &mut [
                    arg(&q.ptr()),
                    arg(&k.ptr()),
                    arg(&v.ptr()),
                    arg(&o.ptr()),
                    arg(&lse.ptr()),
                    arg(&ti),
                    arg(&scale),
                ],
            )
        }
    }

    /// Gradients `dq, dk, dv` (bf16 `[bh, t, d]`, written whole) of
    /// [`FlashAttention::forward`] from its inputs, output `o`, `lse` and `d_o`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        (q, k, v): (&dyn DeviceMem, &dyn DeviceMem, &dyn DeviceMem),
        o: &dyn DeviceMem,
        d_o: &dyn DeviceMem,
        lse: &dyn DeviceMem,
        (dq, dk, dv): (&dyn DeviceMem, &dyn DeviceMem, &dyn DeviceMem),
        (bh, t): (usize, usize),
        scale: f32,
    ) -> Result<()> {
        self.check(
            "flash attention q/k/v/o/dO/dq/dk/dv",
            &[q, k, v, o, d_o, dq, dk, dv],
            bh,
            t,
        )?;
        need("flash attention lse", lse, bh * t, 4)?;
        let rows = bh * t;
        let delta = gpu.alloc(rows * 4)?;
        let (ti, grid) = grid(bh, t)?;
        let warps_per_block = 8usize;
        let delta_blocks = int("flash attention rows", rows.div_ceil(warps_per_block))? as u32;
        // SAFETY: sizes checked above; `delta` holds one f32 per row.
        unsafe {
            gpu.launch(
                self.delta,
                delta_blocks,
                (warps_per_block * 32) as u32,
                &mut [
                    arg(&o.ptr()),
                    arg(&d_o.ptr()),
                    arg(&delta.ptr()),
                    arg(&rows),
                ],
            )?;
            gpu.launch_2d(
                self.dkv,
                grid,
                THREADS,
                smem_bytes(self.d, false) as u32,
                &mut [
                    arg(&q.ptr()),
                    arg(&k.ptr()),
                    arg(&v.ptr()),
                    arg(&d_o.ptr()),
                    arg(&lse.ptr()),
                    arg(&delta.ptr()),
                    arg(&dk.ptr()),
                    arg(&dv.ptr()),
                    arg(&ti),
                    arg(&scale),
                ],
            )?;
            gpu.launch_2d(
                self.dq,
                grid,
                THREADS,
                smem_bytes(self.d, false) as u32,
                &mut [
                    arg(&q.ptr()),
                    arg(&k.ptr()),
                    arg(&v.ptr()),
                    arg(&d_o.ptr()),
                    arg(&lse.ptr()),
                    arg(&delta.ptr()),
                    arg(&dq.ptr()),
                    arg(&ti),
                    arg(&scale),
                ],
            )
        }
    }
}

/// `t` as the kernels' `int` and the grid of a launch over `bh` rows of `t` positions: one
/// block per 64-row tile and row of `bh`.
fn grid(bh: usize, t: usize) -> Result<(i32, (u32, u32))> {
    Ok((
        int("flash attention seq", t)?,
        (
            int("flash attention tiles", t.div_ceil(BR))? as u32,
            bh as u32,
        ),
    ))
}
