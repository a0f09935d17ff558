//! Residual-stream sums folded into their producers: a pre-norm block adds each branch's
//! output to the stream it read (`x + o·W_oᵀ`, `x + ffn(x)`), and an MoE layer's output is
//! itself a sum (shared + routed experts). Written as separate ops these are full passes
//! over `[N, H]` activations; here
//! - [`Tensor::matmul_add`] `= self + a·op(b)`: on a GPU in bf16-activation mode ONE GEMM
//!   reading the residual as its C operand and writing a fresh D (cuBLASLt, `beta = 1`,
//!   the f32 accumulator rounded once);
//! - [`Tensor::add_sum`] `= self + (b + c)`: on a GPU one pass (f32 math, rounded once).
//!
//! The CPU backend takes the trait's default methods, the unfused ops in the unfused order,
//! so on the CPU every fused op has exactly the bits of the ops it replaces (the reference
//! the GPU parity tests compare with). Backward needs nothing new: the residual's gradient
//! is the output's.

use crate::backend::CpuBackend;
use crate::ops::elementwise::{BinaryOp, ElementwiseKernels};
use crate::ops::matmul::MatmulKernels;
use crate::{Error, Result, Tensor};

/// The residual-sum kernel family of a [`Backend`](crate::backend::Backend) (see
/// [`Tensor::matmul_add`] and [`Tensor::add_sum`]). The defaults are the unfused ops.
pub trait ResidualKernels: ElementwiseKernels + MatmulKernels {
    /// `c + a·op(b)` (`a [M, K]`, `op(b) [K, N]`, `c [M, N]`, checked).
    fn matmul_add(&self, c: &Tensor, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        let p = self.matmul(a, b, false, trans_b)?;
        self.binary(c, &p, BinaryOp::Add)
    }

    /// `a + (b + c)` (equal shapes, checked).
    fn add_sum(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
        let bc = self.binary(b, c, BinaryOp::Add)?;
        self.binary(a, &bc, BinaryOp::Add)
    }
}

/// The CPU computes the unfused ops (the defaults): the definition of the fused ones.
impl ResidualKernels for CpuBackend {}

impl Tensor {
    /// `self + a·op(b)`: a residual stream `self [M, N]` plus a linear layer's output
    /// (`a [M, K]`, `b [K, N]`, stored `[N, K]` if `trans_b`; `x + o·W_oᵀ` is
    /// `x.matmul_add(&o, &w_o, true)`). On the CPU the bits of
    /// `self.add(&a.matmul(b, false, trans_b)?)`; on a GPU in bf16-activation mode one GEMM
    /// with the residual as its C operand (`beta = 1`), the sum rounded to bf16 once, where
    /// the unfused ops round the product first (elsewhere, and where cuBLASLt has no
    /// algorithm for the problem, the unfused ops).
    pub fn matmul_add(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul_add";
        self.same_device(OP, a)?;
        self.same_device(OP, b)?;
        let (m, k) = match a.dims() {
            &[r, c] => (r, c),
            _ => return Err(a.rank_error(OP, "a", 2)),
        };
        let (k2, n) = match (b.dims(), trans_b) {
            (&[r, c], false) => (r, c),
            (&[r, c], true) => (c, r),
            _ => return Err(b.rank_error(OP, "b", 2)),
        };
        if k != k2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: a.dims().to_vec(),
                rhs: b.dims().to_vec(),
                rule: "inner dimensions (after transposes) must agree",
            });
        }
        if self.dims() != [m, n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: vec![m, n],
                rule: "the residual must have the product's shape [M, N]",
            });
        }
        self.backend().matmul_add(self, a, b, trans_b)
    }

    /// `self + (b + c)` (equal shapes): a residual stream plus two branch outputs (an MoE
    /// layer's shared and routed experts). On the CPU the bits of `self.add(&b.add(c)?)`;
    /// on a GPU one pass in f32, rounded once (in bf16-activation mode the unfused ops
    /// round `b + c` to bf16 first).
    pub fn add_sum(&self, b: &Tensor, c: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_sum";
        self.same_shape(OP, b)?;
        self.same_shape(OP, c)?;
        self.backend().add_sum(self, b, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_bits as bits;
    use crate::Device;

    fn randn(seed: u64, dims: &[usize]) -> Tensor {
        Tensor::randn_named(seed, "r", dims.to_vec(), 1.0, Device::Cpu).unwrap()
    }

    #[test]
    fn matmul_add_is_the_unfused_ops_bit_for_bit_on_the_cpu() {
        let (x, o) = (randn(1, &[7, 5]), randn(2, &[7, 3]));
        for (w, trans) in [(randn(3, &[5, 3]), true), (randn(4, &[3, 5]), false)] {
            let fused = x.matmul_add(&o, &w, trans).unwrap();
            let unfused = x.add(&o.matmul(&w, false, trans).unwrap()).unwrap();
            assert_eq!(fused.dims(), [7, 5]);
            assert_eq!(bits(&fused), bits(&unfused));
        }
        // by hand: [1, 2] + [1, 1]·[[1, 0], [2, 3]] = [1 + 3, 2 + 3]
        let x = Tensor::from_vec_f32(vec![1.0, 2.0], [1, 2], Device::Cpu).unwrap();
        let a = Tensor::from_vec_f32(vec![1.0, 1.0], [1, 2], Device::Cpu).unwrap();
        let b = Tensor::from_vec_f32(vec![1.0, 0.0, 2.0, 3.0], [2, 2], Device::Cpu).unwrap();
        let y = x.matmul_add(&a, &b, false).unwrap();
        assert_eq!(y.to_host_f32().unwrap(), vec![4.0, 5.0]);
    }

    #[test]
    fn matmul_add_names_bad_shapes() {
        let (x, o, w) = (randn(1, &[4, 6]), randn(2, &[4, 3]), randn(3, &[6, 3]));
        assert!(x.matmul_add(&o, &w, true).is_ok());
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(err(x.matmul_add(&o, &w, false)).contains("inner dimensions"));
        let e = err(randn(4, &[4, 5]).matmul_add(&o, &w, true));
        assert!(e.contains("matmul_add") && e.contains("[M, N]"), "{e}");
        assert!(err(x.matmul_add(&randn(5, &[4, 3, 1]), &w, true)).contains("matmul_add"));
    }

    #[test]
    fn add_sum_is_the_unfused_adds_bit_for_bit_on_the_cpu() {
        let (a, b, c) = (randn(1, &[6, 8]), randn(2, &[6, 8]), randn(3, &[6, 8]));
        let fused = a.add_sum(&b, &c).unwrap();
        assert_eq!(bits(&fused), bits(&a.add(&b.add(&c).unwrap()).unwrap()));
        // the order matters in f32: 1 + (1e8 + −1e8) = 1, (1 + 1e8) + −1e8 = 0
        let v = |x: f32| Tensor::from_vec_f32(vec![x], [1], Device::Cpu).unwrap();
        let y = v(1.0).add_sum(&v(1e8), &v(-1e8)).unwrap();
        assert_eq!(y.to_host_f32().unwrap(), vec![1.0]);
        let e = a.add_sum(&b, &randn(4, &[6, 7])).unwrap_err().to_string();
        assert!(e.contains("add_sum"), "{e}");
    }
}
