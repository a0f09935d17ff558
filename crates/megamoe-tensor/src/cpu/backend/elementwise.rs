//! [`ElementwiseKernels`] on the CPU.

use crate::backend::CpuBackend;
use crate::cpu::elementwise as kernel;
use crate::ops::elementwise::{gate_up_half, BinaryOp, ElementwiseKernels, RowOp, UnaryOp};
use crate::{Result, Tensor};

impl ElementwiseKernels for CpuBackend {
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
        let v = x.cpu_f32(op.name(), "x")?;
        Ok(Tensor::cpu_f32_from(kernel::unary(op, &v), x.shape()))
    }

    fn binary(&self, a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let name = op.name();
        let av = a.cpu_f32(name, "a")?;
        let bv = b.cpu_f32(name, "b")?;
        Ok(Tensor::cpu_f32_from(
            kernel::binary(op, &av, &bv),
            a.shape(),
        ))
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu";
        let g = gate.cpu_f32(OP, "gate")?;
        let u = up.cpu_f32(OP, "up")?;
        Ok(Tensor::cpu_f32_from(kernel::swiglu(&g, &u), gate.shape()))
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "swiglu_backward";
        let g = gate.cpu_f32(OP, "gate")?;
        let u = up.cpu_f32(OP, "up")?;
        let d = dy.cpu_f32(OP, "dy")?;
        let (dg, du) = kernel::swiglu_backward(&g, &u, &d);
        Ok((
            Tensor::cpu_f32_from(dg, gate.shape()),
            Tensor::cpu_f32_from(du, gate.shape()),
        ))
    }

    fn swiglu_gate_up(&self, gate_up: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu_gate_up";
        let (f, shape) = gate_up_half(gate_up);
        let gu = gate_up.cpu_f32(OP, "gate_up")?;
        Ok(Tensor::cpu_f32_from(kernel::swiglu_gate_up(&gu, f), shape))
    }

    fn swiglu_gate_up_backward(&self, gate_up: &Tensor, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu_gate_up_backward";
        let (f, _) = gate_up_half(gate_up);
        let gu = gate_up.cpu_f32(OP, "gate_up")?;
        let d = dy.cpu_f32(OP, "dy")?;
        Ok(Tensor::cpu_f32_from(
            kernel::swiglu_gate_up_backward(&gu, &d, f),
            gate_up.shape(),
        ))
    }

    fn row_broadcast(&self, x: &Tensor, v: &Tensor, op: RowOp) -> Result<Tensor> {
        let name = match op {
            RowOp::Add => "add_row",
            RowOp::Mul => "mul_row",
        };
        let f: fn(f32, f32) -> f32 = match op {
            RowOp::Add => |x, v| x + v,
            RowOp::Mul => |x, v| x * v,
        };
        let xv = x.cpu_f32(name, "x")?;
        let vv = v.cpu_f32(name, "v")?;
        Ok(Tensor::cpu_f32_from(
            kernel::broadcast_row(&xv, &vv, f),
            x.shape(),
        ))
    }

    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        const OP: &str = "mul_col";
        let xv = x.cpu_f32(OP, "x")?;
        let sv = s.cpu_f32(OP, "s")?;
        Ok(Tensor::cpu_f32_from(
            kernel::scale_rows(&xv, &sv),
            x.shape(),
        ))
    }

    fn axpy(&self, dst: &mut Tensor, alpha: f32, x: &Tensor) -> Result<()> {
        const OP: &str = "axpy";
        let src = x.cpu_f32(OP, "x")?;
        // If `x` shares dst's buffer, the Arc count is ≥ 2 and cpu_f32_mut copies before
        // writing, so `src` (borrowed from x's storage) is never written through.
        let d = dst.cpu_f32_mut(OP)?;
        kernel::axpy(d, alpha, &src);
        Ok(())
    }

    fn fill(&self, dst: &mut Tensor, value: f32) -> Result<()> {
        dst.cpu_f32_mut("fill_in_place")?.fill(value);
        Ok(())
    }
}
