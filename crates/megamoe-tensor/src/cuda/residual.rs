//! The residual-sum family on the GPU: in bf16-activation mode `matmul_add` is one
//! cuBLASLt GEMM reading the residual as C and writing a fresh D (`beta = 1`), and
//! `add_sum` one 8-wide pass (megamoe-cuda `Ops::add_sum`); other dtypes, unaligned
//! buffers and problems cuBLASLt has no algorithm for take the unfused ops (the trait's
//! defaults), never an error. [`RESIDUAL_VAR`] `=unfused` takes them always (A/B timing).

use megamoe_cuda::{Elem, Operand};

use super::matmul::operand;
use super::{dev, view, CudaBackend};
use crate::ops::elementwise::{BinaryOp, ElementwiseKernels};
use crate::ops::matmul::MatmulKernels;
use crate::ops::residual::ResidualKernels;
use crate::{DType, Error, Result, Tensor};

/// The A/B switch of the fused residual ops: `fused` (the default) or `unfused` (read once
/// per process; another value is a named error at the first call).
pub(super) const RESIDUAL_VAR: &str = "MEGAMOE_CUDA_RESIDUAL";

/// Whether the fused forms run ([`RESIDUAL_VAR`]).
fn fused(op: &'static str) -> Result<bool> {
    static MODE: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    MODE.get_or_init(|| match std::env::var(RESIDUAL_VAR) {
        Err(_) => Ok(true),
        Ok(v) => match v.as_str() {
            "" | "fused" => Ok(true),
            "unfused" => Ok(false),
            _ => Err(v),
        },
    })
    .clone()
    .map_err(|value| Error::InvalidArgument {
        op,
        arg: RESIDUAL_VAR,
        value,
        rule: "must be fused or unfused",
    })
}

impl ResidualKernels for CudaBackend {
    fn matmul_add(&self, c: &Tensor, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul_add";
        let (m, n) = c.dims2()?;
        let k = a.dims().get(1).copied().unwrap_or(0);
        if fused(OP)? && self.bf16_activations() && c.dtype() == DType::BF16 && m * n * k > 0 {
            let (a2, b2) = self.gemm_pair(a, b)?;
            if a2.dtype() == DType::BF16 && b2.dtype() == DType::BF16 {
                let (ad, bd, cd) = (dev(OP, &a2)?, dev(OP, &b2)?, dev(OP, c)?);
                let e = self.engine(OP)?;
                let (y, yd) = self.empty(&e, c.shape().clone(), DType::BF16)?;
                let oa = operand(&a2, ad.ptr, false, a2.dims()[1], 0);
                let ob = operand(&b2, bd.ptr, trans_b, b2.dims()[1], 0);
                let oc = Operand::dense(cd.ptr, Elem::Bf16, n, 0);
                let fused = e.gpu.gemm_lt_into((m, n, k), oa, ob, oc, yd.ptr, 1.0, 1.0);
                drop(e);
                if self.ck(OP, fused)? {
                    return Ok(y);
                }
            }
        }
        let p = self.matmul(a, b, false, trans_b)?;
        self.binary(c, &p, BinaryOp::Add)
    }

    fn add_sum(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_sum";
        let act = self.act();
        if fused(OP)? && [a, b, c].iter().all(|t| t.dtype() == act) {
            let e = self.engine(OP)?;
            let (y, _) = self.empty(&e, a.shape().clone(), act)?;
            let fused = {
                let v = (view(OP, a)?, view(OP, b)?, view(OP, c)?, view(OP, &y)?);
                e.ops(act)
                    .add_sum(&e.gpu, &v.0, &v.1, &v.2, &v.3, a.numel())
            };
            drop(e);
            if self.ck(OP, fused)? {
                return Ok(y);
            }
        }
        let bc = self.binary(b, c, BinaryOp::Add)?;
        self.binary(a, &bc, BinaryOp::Add)
    }
}
