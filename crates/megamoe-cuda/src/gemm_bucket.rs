//! bf16 GEMMs whose row count (or inner dimension) changes from call to call — the
//! per-expert GEMMs of a dropless MoE layer, sized by the routing — through cuBLASLt with
//! the algorithm chosen once per *bucket* of that dimension.
//!
//! Classic cuBLAS (and [`Gpu::gemm_lt`]) choose an algorithm per exact shape: each new row
//! count costs a heuristic query on the host, and a dropless layer brings up to `E` new
//! row counts per GEMM per step. [`Gpu::gemm_bucketed`] instead keys cuBLASLt's plan (the
//! matmul descriptor and the heuristic's first candidate) on the shape with the varying
//! dimension rounded up to its bucket ([`bucket`]: at most 1/16 above it), asked for that
//! rounded shape; the call then runs the actual problem (layouts made for the call) with
//! the bucket's algorithm. The algorithm is thus a function of the bucket alone: results
//! are the same bits run to run, whatever order the row counts come in.

use std::ffi::c_void;

use cudarc::cublaslt::{result as lres, sys as lsys};

use crate::device::Gpu;
use crate::error::{DriverCtx, Result};
use crate::gemm::{Elem, Operand};
use crate::gemm_lt::{key, layout};

/// Which dimension of a bucketed GEMM changes between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Varying {
    /// The rows of `op(A)` and C (a forward / input-gradient GEMM over a group's rows).
    M,
    /// The inner dimension (a weight gradient summed over a group's rows).
    K,
}

/// `v` rounded up to a multiple of `2^(⌊log2 v⌋ − 4)` (at least 8): at most 1/16 above `v`,
/// about 16 buckets per doubling (e.g. 2000 → 2048 in steps of 64, 2100 → 2176 in steps
/// of 128); 0 stays 0.
pub fn bucket(v: usize) -> usize {
    if v == 0 {
        return 0;
    }
    let log2 = usize::BITS - 1 - v.leading_zeros();
    let q = 1usize << log2.saturating_sub(4).max(3);
    v.div_ceil(q) * q
}

/// Three cuBLASLt layouts, destroyed on drop.
struct Layouts([lsys::cublasLtMatrixLayout_t; 3]);

impl Drop for Layouts {
    fn drop(&mut self) {
        for l in self.0 {
            if !l.is_null() {
                unsafe {
                    let _ = lres::destroy_matrix_layout(l);
                }
            }
        }
    }
}

impl Gpu {
    /// `C[m, n] = alpha · op(A) · op(B) + beta · C` (one GEMM, no batch) through cuBLASLt
    /// with the algorithm of `vary`'s bucket (see the module doc). `Ok(false)`: nothing
    /// launched — the operands are not bf16, cuBLASLt has no algorithm for the bucket's
    /// shape, or the bucket's algorithm refuses this problem; the caller then runs
    /// [`Gpu::gemm`]. Shapes are checked as [`Gpu::gemm`] checks them.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bucketed(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        alpha: f32,
        beta: f32,
        vary: Varying,
    ) -> Result<bool> {
        self.check_gemm((m, n, k), a, b, c, 1)?;
        if a.elem != Elem::Bf16 {
            return Ok(false);
        }
        let canonical = match vary {
            Varying::M => (bucket(m), n, k),
            Varying::K => (m, n, bucket(k)),
        };
        let key = key(canonical, &a, &b, &c, 1);
        if !self.lt.plan(key)? {
            return Ok(false);
        }
        let plans = self.lt.plans.borrow();
        let Some(Some(plan)) = plans.get(&key) else {
            return Ok(false);
        };
        let Some(h) = plan.algos.first() else {
            return Ok(false);
        };
        // column-major: C'[n, m] = op(B)' [n, k] · op(A)' [k, m]; Lt's A is our B.
        let dims = |t: bool, r: usize, c: usize| if t { (c, r) } else { (r, c) };
        let mut l = Layouts([std::ptr::null_mut(); 3]);
        l.0[0] = layout(b.elem, dims(b.trans, n, k), b.ld, 0, 1)?;
        l.0[1] = layout(a.elem, dims(a.trans, k, m), a.ld, 0, 1)?;
        l.0[2] = layout(c.elem, (n, m), c.ld, 0, 1)?;
        let lt = &self.lt;
        let status = unsafe {
            lsys::cublasLtMatmul(
                lt.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                b.ptr as *const c_void,
                l.0[0],
                a.ptr as *const c_void,
                l.0[1],
                &beta as *const f32 as *const c_void,
                c.ptr as *const c_void,
                l.0[2],
                c.ptr as *mut c_void,
                l.0[2],
                &h.algo,
                lt.workspace.0 as *mut c_void,
                lt.workspace.1,
                self.stream() as lsys::cudaStream_t,
            )
        };
        use lsys::cublasStatus_t as S;
        match status {
            S::CUBLAS_STATUS_SUCCESS => Ok(true),
            // the bucket's algorithm does not take this problem: nothing was launched
            S::CUBLAS_STATUS_NOT_SUPPORTED | S::CUBLAS_STATUS_INVALID_VALUE => Ok(false),
            other => other.result().map(|()| false).ctx("cublasLtMatmul"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_by_at_most_a_sixteenth() {
        assert_eq!((bucket(0), bucket(1), bucket(8)), (0, 8, 8));
        assert_eq!(
            (bucket(2000), bucket(2048), bucket(2100)),
            (2048, 2048, 2176)
        );
        for v in 1..5000 {
            let b = bucket(v);
            assert!(b >= v && (b - v) * 16 <= v.max(8 * 16), "{v} -> {b}");
            assert_eq!(bucket(b), b, "a bucket is its own bucket");
        }
    }
}
