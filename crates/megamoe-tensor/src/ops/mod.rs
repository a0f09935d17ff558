//! Ops on [`Tensor`](crate::Tensor), one file per family. Each op validates shapes, dtypes
//! and devices (typed errors naming the op), then dispatches on the storage to the backend
//! kernel in `cpu/<family>.rs` (and, with feature `cuda`, `cuda/<family>.rs`).
//!
//! # Adding an op family (e.g. the MoE engineer's `routing`)
//! 1. `src/ops/<family>.rs`: an `impl Tensor { .. }` block (or free functions) with the
//!    validated ops, documented with shapes;
//! 2. `src/cpu/<family>.rs`: slice kernels, deterministic across thread counts (fixed
//!    pieces, fixed summation order; see `cpu/mod.rs`);
//! 3. append `pub mod <family>;` below and `pub(crate) mod <family>;` in `cpu/mod.rs`.
//!
//! Ops read element data only through `Tensor::cpu_f32`/`cpu_i32` (crate-private) and never
//! through the host-read API, so they stay valid when storage is on a device.

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
pub mod rng;
pub mod rope;
pub mod routing;
pub mod scalar;
pub mod softmax;
pub mod topk;
// New families: append `pub mod <family>;` here.
