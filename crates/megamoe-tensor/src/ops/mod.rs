//! Ops on [`Tensor`](crate::Tensor), one file per family. Each op validates shapes, dtypes
//! and devices (typed errors naming the op), then calls its kernel on the tensor's backend
//! (`self.backend().<kernel>(..)`); each file also defines its family's kernel trait (see
//! [`crate::backend`]).
//!
//! # Adding an op family (e.g. the MoE engineer's `routing`)
//! 1. `src/ops/<family>.rs`: a `<Family>Kernels` trait and an `impl Tensor { .. }` block
//!    with the validated ops, documented with shapes, each calling its kernel;
//! 2. add the trait to the `Backend` supertrait in `backend.rs`;
//! 3. `src/cpu/<family>.rs`: slice kernels, deterministic across thread counts (fixed
//!    pieces, fixed summation order; see `cpu/mod.rs`), and `src/cpu/backend/<family>.rs`:
//!    `impl <Family>Kernels for CpuBackend`;
//! 4. append `pub mod <family>;` below and the `mod` lines in `cpu/mod.rs`,
//!    `cpu/backend/mod.rs`.
//!
//! Ops never read element data: only the backends do (the CPU one through the
//! crate-private `Tensor::cpu_f32`/`cpu_i32`), so ops stay valid on a device.

pub mod attention;
pub mod capacity;
pub mod elementwise;
pub mod groups;
pub mod index;
pub mod loss;
pub mod mask;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod residual;
pub mod rng;
pub mod rope;
pub mod router;
pub mod routing;
pub mod scalar;
pub mod softmax;
pub mod stacked;
pub mod topk;
// New families: append `pub mod <family>;` here.

/// The f32 bit patterns of `x`'s elements (bitwise comparisons in the ops' unit tests).
#[cfg(test)]
pub(crate) fn test_bits(x: &crate::Tensor) -> Vec<u32> {
    x.to_host_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}
