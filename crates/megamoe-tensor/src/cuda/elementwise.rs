//! Elementwise, scalar, reduction, softmax and top-k families on the GPU
//! (`megamoe_cuda::tensor` kernels). Outputs are f32, as on the CPU backend, except in
//! bf16-activation mode ([`CudaBackend::set_bf16_activations`]): there elementwise ops,
//! broadcasts and SwiGLU and its backward with a bf16 input write bf16 (f32 math), and the
//! causal softmax writes its probabilities and their gradient bf16.

use megamoe_cuda::tensor::{AllReduce, Binary, Broadcast, Dev, RowReduce, Unary};

use super::{dev, CudaBackend, Engine};
use crate::backend::HostTransfer;
use crate::ops::elementwise::{gate_up_half, BinaryOp, ElementwiseKernels, RowOp, UnaryOp};
use crate::ops::reduce::{ReduceAll, ReduceKernels, ReduceLast};
use crate::ops::scalar::ScalarKernels;
use crate::ops::softmax::{SoftmaxKernels, SoftmaxKind};
use crate::ops::topk::TopkKernels;
use crate::{DType, Error, Result, Shape, Tensor};

type Launch<'a> = Box<dyn FnOnce(&Engine, Dev) -> megamoe_cuda::Result<()> + 'a>;

impl CudaBackend {
    /// A fresh `dtype` tensor of `shape` written by `f(engine, out)`.
    pub(crate) fn produce(
        &self,
        op: &'static str,
        shape: Shape,
        dtype: DType,
        f: Launch<'_>,
    ) -> Result<Tensor> {
        let e = self.engine(op)?;
        let (t, d) = self.empty(&e, shape, dtype)?;
        self.ck(op, f(&e, d))?;
        Ok(t)
    }

    /// `dst` made a unique f32 buffer (copy-on-write), then written by `f(engine, dst)`.
    pub(crate) fn in_place(
        &self,
        op: &'static str,
        dst: &mut Tensor,
        f: impl FnOnce(&Engine, Dev) -> megamoe_cuda::Result<()>,
    ) -> Result<()> {
        dst.make_unique_f32(|t| self.to_dtype(t, DType::F32))?;
        let d = dev(op, dst)?;
        let e = self.engine(op)?;
        self.ck(op, f(&e, d))
    }

    /// The dtype of an elementwise result of `inputs`: bf16 in bf16-activation mode when
    /// any input is bf16 (an activation), else f32 (parameters, gradients and optimizer
    /// state, which are f32, stay f32).
    pub(crate) fn elementwise_dtype(&self, inputs: &[&Tensor]) -> DType {
        if self.bf16_activations() && inputs.iter().any(|t| t.dtype() == DType::BF16) {
            DType::BF16
        } else {
            DType::F32
        }
    }

    fn binary_into(
        &self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        kop: Binary,
        bcast: Broadcast,
    ) -> Result<Tensor> {
        let (ad, bd, n) = (dev(op, a)?, dev(op, b)?, a.numel());
        self.produce(
            op,
            a.shape().clone(),
            self.elementwise_dtype(&[a, b]),
            Box::new(move |e, y| {
                // SAFETY: the op layer checked the shapes: `a` and `y` hold n elements, `b`
                // what `bcast` indexes.
                unsafe { e.tk.binary(&e.gpu, kop, ad, bd, y, n, bcast, 1.0) }
            }),
        )
    }
}

fn unary_op(op: UnaryOp) -> Result<Unary> {
    Ok(match op {
        UnaryOp::Neg => Unary::Neg,
        UnaryOp::Abs => Unary::Abs,
        UnaryOp::Exp => Unary::Exp,
        UnaryOp::Log => Unary::Log,
        UnaryOp::Sqrt => Unary::Sqrt,
        UnaryOp::Recip => Unary::Recip,
        UnaryOp::Square => Unary::Square,
        UnaryOp::Sigmoid => Unary::Sigmoid,
        UnaryOp::Tanh => Unary::Tanh,
        UnaryOp::Silu => Unary::Silu,
        UnaryOp::GeluErf => Unary::GeluErf,
        UnaryOp::GeluTanh => Unary::GeluTanh,
        UnaryOp::Relu => Unary::Relu,
        UnaryOp::Relu2 => Unary::Relu2,
        UnaryOp::Affine { mul, add } => Unary::Affine { mul, add },
        #[allow(unreachable_patterns)]
        other => return Err(unsupported("unary", format!("{other:?}"))),
    })
}

fn binary_op(op: BinaryOp) -> Result<Binary> {
    Ok(match op {
        BinaryOp::Add => Binary::Add,
        BinaryOp::Sub => Binary::Sub,
        BinaryOp::Mul => Binary::Mul,
        BinaryOp::Div => Binary::Div,
        BinaryOp::Maximum => Binary::Maximum,
        BinaryOp::Minimum => Binary::Minimum,
        BinaryOp::SiluBackward => Binary::SiluBackward,
        BinaryOp::GeluErfBackward => Binary::GeluErfBackward,
        BinaryOp::GeluTanhBackward => Binary::GeluTanhBackward,
        BinaryOp::SigmoidBackward => Binary::SigmoidBackward,
        BinaryOp::TanhBackward => Binary::TanhBackward,
        BinaryOp::ReluBackward => Binary::ReluBackward,
        BinaryOp::Relu2Backward => Binary::Relu2Backward,
        #[allow(unreachable_patterns)]
        other => return Err(unsupported("binary", format!("{other:?}"))),
    })
}

/// An op variant this backend has no kernel for (a compile-time gap made explicit).
pub(crate) fn unsupported(op: &'static str, what: String) -> Error {
    Error::InvalidArgument {
        op,
        arg: "op",
        value: what,
        rule: "has no CUDA kernel yet",
    }
}

impl ElementwiseKernels for CudaBackend {
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
        let (k, xd, n) = (unary_op(op)?, dev("unary", x)?, x.numel());
        self.produce(
            "unary",
            x.shape().clone(),
            self.elementwise_dtype(&[x]),
            // SAFETY: `x` and the output hold n elements.
            Box::new(move |e, y| unsafe { e.tk.unary(&e.gpu, k, xd, y, n) }),
        )
    }

    fn binary(&self, a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
        self.binary_into("binary", a, b, binary_op(op)?, Broadcast::None)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.binary_into("swiglu", gate, up, Binary::Swiglu, Broadcast::None)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "swiglu_backward";
        let (g, u, d, n) = (dev(OP, gate)?, dev(OP, up)?, dev(OP, dy)?, gate.numel());
        // Activation gradients: bf16 in bf16-activation mode (their only readers are GEMMs,
        // which round them to bf16 anyway: same bits, half the bytes), else f32.
        let dtype = self.elementwise_dtype(&[gate, up, dy]);
        let e = self.engine(OP)?;
        let (dg, dgd) = self.empty(&e, gate.shape().clone(), dtype)?;
        let (du, dud) = self.empty(&e, gate.shape().clone(), dtype)?;
        // SAFETY: all five hold n elements of their dtypes (shapes checked by the op).
        self.ck(OP, unsafe {
            e.tk.swiglu_backward(&e.gpu, g, u, d, dgd, dud.ptr, n)
        })?;
        Ok((dg, du))
    }

    fn swiglu_gate_up(&self, gate_up: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu_gate_up";
        let (f, shape) = gate_up_half(gate_up);
        let (x, n) = (dev(OP, gate_up)?, shape.numel());
        self.produce(
            OP,
            shape,
            self.elementwise_dtype(&[gate_up]),
            // SAFETY: `gate_up` holds 2n elements in rows of 2f, the output n in rows of f
            // (shapes checked by the op).
            Box::new(move |e, y| unsafe { e.tk.swiglu_gate_up(&e.gpu, x, y, f, n) }),
        )
    }

    fn swiglu_gate_up_backward(&self, gate_up: &Tensor, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu_gate_up_backward";
        let (f, half) = gate_up_half(gate_up);
        let (g, d, n) = (dev(OP, gate_up)?, dev(OP, dy)?, half.numel());
        // An activation gradient, as `swiglu_backward`: bf16 in bf16-activation mode (its
        // readers are GEMMs, which round it to bf16 anyway: same bits, half the bytes).
        self.produce(
            OP,
            gate_up.shape().clone(),
            self.elementwise_dtype(&[gate_up, dy]),
            // SAFETY: `gate_up` and the output hold 2n elements in rows of 2f, `dy` n in rows
            // of f (shapes checked by the op).
            Box::new(move |e, y| unsafe { e.tk.swiglu_gate_up_backward(&e.gpu, g, d, y, f, n) }),
        )
    }

    fn row_broadcast(&self, x: &Tensor, v: &Tensor, op: RowOp) -> Result<Tensor> {
        let h = v.numel();
        let k = match op {
            RowOp::Add => Binary::Add,
            RowOp::Mul => Binary::Mul,
        };
        self.binary_into("row_broadcast", x, v, k, Broadcast::Row(h))
    }

    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        let h = x.numel().checked_div(s.numel()).unwrap_or(1);
        self.binary_into("mul_col", x, s, Binary::Mul, Broadcast::Col(h))
    }

    fn axpy(&self, dst: &mut Tensor, alpha: f32, x: &Tensor) -> Result<()> {
        const OP: &str = "axpy";
        // `x` stays borrowed (alive) while a copy-on-write of `dst` swaps dst's buffer.
        let (xd, n) = (dev(OP, x)?, dst.numel());
        // SAFETY: `d` is a unique f32 buffer of n elements, `x` holds n elements.
        self.in_place(OP, dst, |e, d| unsafe {
            e.tk.binary(&e.gpu, Binary::Add, d, xd, d, n, Broadcast::None, alpha)
        })
    }

    fn fill(&self, dst: &mut Tensor, value: f32) -> Result<()> {
        let n = dst.numel();
        // SAFETY: `d` is a unique f32 buffer of n elements.
        self.in_place("fill_in_place", dst, |e, d| unsafe {
            e.tk.fill(&e.gpu, d, n, value)
        })
    }
}

impl ScalarKernels for CudaBackend {
    fn scale_by(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.binary_into("scale_by", x, s, Binary::Mul, Broadcast::Scalar)
    }

    fn scale_by_assign(&self, x: &mut Tensor, s: &Tensor) -> Result<()> {
        const OP: &str = "scale_by_assign";
        let sd = dev(OP, s)?;
        let n = x.numel();
        // SAFETY: `d` is a unique f32 buffer of n elements, `s` one element.
        self.in_place(OP, x, |e, d| unsafe {
            e.tk.binary(&e.gpu, Binary::Mul, d, sd, d, n, Broadcast::Scalar, 1.0)
        })
    }

    fn where_cond(&self, cond: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        const OP: &str = "where_cond";
        let (c, a, b, n) = (
            dev(OP, cond)?,
            dev(OP, on_true)?,
            dev(OP, on_false)?,
            cond.numel(),
        );
        self.produce(
            OP,
            cond.shape().clone(),
            DType::F32,
            // SAFETY: all four hold n elements.
            Box::new(move |e, y| unsafe { e.tk.where_cond(&e.gpu, c, a, b, y.ptr, n) }),
        )
    }

    fn add_i32(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_i32";
        let (ad, bd, n) = (dev(OP, a)?, dev(OP, b)?, a.numel());
        self.produce(
            OP,
            a.shape().clone(),
            DType::I32,
            // SAFETY: all three hold n i32 elements.
            Box::new(move |e, y| unsafe { e.tk.add_i32(&e.gpu, ad.ptr, bd.ptr, y.ptr, n) }),
        )
    }

    fn gt_scalar(&self, x: &Tensor, thr: f32) -> Result<Tensor> {
        self.compare("gt_scalar", x, true, thr)
    }

    fn eq_scalar(&self, x: &Tensor, value: f32) -> Result<Tensor> {
        self.compare("eq_scalar", x, false, value)
    }
}

impl CudaBackend {
    fn compare(&self, op: &'static str, x: &Tensor, greater: bool, v: f32) -> Result<Tensor> {
        let (xd, n) = (dev(op, x)?, x.numel());
        self.produce(
            op,
            x.shape().clone(),
            DType::F32,
            // SAFETY: `x` and the output hold n elements.
            Box::new(move |e, y| unsafe { e.tk.compare_scalar(&e.gpu, greater, xd, y.ptr, n, v) }),
        )
    }

    fn rows(
        &self,
        op: &'static str,
        x: &Tensor,
        k: RowReduce,
        rows: usize,
        len: usize,
        shape: Shape,
    ) -> Result<Tensor> {
        let xd = dev(op, x)?;
        self.produce(
            op,
            shape,
            DType::F32,
            // SAFETY: `x` holds rows·len elements, the output `rows`.
            Box::new(move |e, y| unsafe { e.tk.reduce_rows(&e.gpu, k, xd, y.ptr, rows, len) }),
        )
    }
}

impl ReduceKernels for CudaBackend {
    fn reduce_all(&self, x: &Tensor, op: ReduceAll) -> Result<Tensor> {
        const OP: &str = "reduce_all";
        let k = match op {
            ReduceAll::Sum => AllReduce::Sum,
            ReduceAll::Mean => AllReduce::Mean,
            ReduceAll::SumSquares => AllReduce::SumSquares,
            ReduceAll::Norm => AllReduce::Norm,
        };
        let (xd, n) = (dev(OP, x)?, x.numel());
        self.produce(
            OP,
            Shape::from(Vec::new()),
            DType::F32,
            // SAFETY: `x` holds n elements, the output one.
            Box::new(move |e, y| unsafe { e.tk.reduce_all(&e.gpu, k, xd, y.ptr, n) }),
        )
    }

    fn reduce_last(&self, x: &Tensor, op: ReduceLast) -> Result<Tensor> {
        let (lead, h) = match x.dims().split_last() {
            Some((&h, lead)) => (lead.to_vec(), h),
            None => return Err(x.rank_error("reduce_last", "x", 1)),
        };
        let rows: usize = lead.iter().product();
        let k = match op {
            ReduceLast::Sum => RowReduce::Sum,
            ReduceLast::Mean => RowReduce::Mean,
            ReduceLast::Max => RowReduce::Max,
            ReduceLast::LogSumExp => RowReduce::LogSumExp,
        };
        self.rows("reduce_last", x, k, rows, h, lead.into())
    }

    fn sum_rows(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "sum_rows";
        let h = x.dims().last().copied().unwrap_or(1);
        let rows = x.numel().checked_div(h).unwrap_or(0);
        let xd = dev(OP, x)?;
        self.produce(
            OP,
            [h].into(),
            DType::F32,
            // SAFETY: `x` holds rows·h elements, the output h.
            Box::new(move |e, y| unsafe { e.tk.sum_cols(&e.gpu, xd, y.ptr, rows, h) }),
        )
    }

    fn norm_rows(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dims().first().copied().unwrap_or(1);
        let len: usize = x.dims().iter().skip(1).product();
        self.rows("norm_rows", x, RowReduce::Norm, rows, len, [rows].into())
    }

    fn exclusive_cumsum_i32(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "exclusive_cumsum_i32";
        let (xd, n) = (dev(OP, x)?, x.numel());
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, x.shape().clone(), DType::I32)?;
        let flag = self.ck(OP, e.gpu.alloc(4))?;
        // SAFETY: `x` and the output hold n i32 elements, `flag` one.
        self.ck(OP, unsafe {
            e.tk.exclusive_cumsum_i32(&e.gpu, xd.ptr, d.ptr, n, flag.ptr())
        })?;
        // The overflow flag costs a host read: checked in debug builds only (row counts of
        // a valid plan stay far below i32::MAX).
        if cfg!(debug_assertions) {
            let mut f = [0i32];
            self.ck(OP, e.gpu.download(&flag, &mut f))?;
            if f[0] != 0 {
                return Err(Error::InvalidArgument {
                    op: OP,
                    arg: "x",
                    value: "(on the GPU)".into(),
                    rule: "partial sums must fit in i32",
                });
            }
        }
        Ok(t)
    }
}

impl SoftmaxKernels for CudaBackend {
    fn softmax(&self, x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
        const OP: &str = "softmax";
        let len = x.dims().last().copied().unwrap_or(1);
        let rows = x.numel().checked_div(len).unwrap_or(0);
        match kind {
            SoftmaxKind::Causal { scale } => {
                // Scores are read f32; the probabilities are an activation.
                let src = self.as_f32(x)?;
                let e = self.engine(OP)?;
                let (t, _) = self.empty(&e, x.shape().clone(), self.act())?;
                let (sv, tv) = (super::view(OP, &src)?, super::view(OP, &t)?);
                self.ck(
                    OP,
                    e.ops(self.act())
                        .causal_softmax(&e.gpu, &sv, &tv, rows, len, scale),
                )?;
                Ok(t)
            }
            SoftmaxKind::Plain | SoftmaxKind::Log => {
                let log = kind == SoftmaxKind::Log;
                let xd = dev(OP, x)?;
                self.produce(
                    OP,
                    x.shape().clone(),
                    DType::F32,
                    // SAFETY: `x` and the output hold rows·len elements.
                    Box::new(move |e, y| unsafe {
                        e.tk.softmax_rows(&e.gpu, log, xd, y, rows, len)
                    }),
                )
            }
        }
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        let len = y.dims().last().copied().unwrap_or(1);
        let rows = y.numel().checked_div(len).unwrap_or(0);
        match kind {
            SoftmaxKind::Causal { scale } => {
                let (yf, df) = (self.as_act(y)?, self.as_f32(dy)?);
                let e = self.engine(OP)?;
                let (t, _) = self.empty(&e, y.shape().clone(), self.act())?;
                let (yv, dv, tv) = (
                    super::view(OP, &yf)?,
                    super::view(OP, &df)?,
                    super::view(OP, &t)?,
                );
                self.ck(
                    OP,
                    e.ops(self.act())
                        .causal_softmax_backward(&e.gpu, &yv, &dv, &tv, rows, len, scale),
                )?;
                Ok(t)
            }
            SoftmaxKind::Plain | SoftmaxKind::Log => {
                let log = kind == SoftmaxKind::Log;
                let (yd, dd) = (dev(OP, y)?, dev(OP, dy)?);
                self.produce(
                    OP,
                    y.shape().clone(),
                    DType::F32,
                    // SAFETY: all three hold rows·len elements.
                    Box::new(move |e, x| unsafe {
                        e.tk.softmax_rows_backward(&e.gpu, log, yd, dd, x, rows, len)
                    }),
                )
            }
        }
    }
}

impl CudaBackend {
    /// `t` itself if f32, else an f32 copy.
    pub(crate) fn as_f32(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == DType::F32 {
            Ok(t.clone())
        } else {
            self.to_dtype(t, DType::F32)
        }
    }
}

impl TopkKernels for CudaBackend {
    fn topk(&self, x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        let len = x.dims().last().copied().unwrap_or(1);
        let rows = x.numel().checked_div(len).unwrap_or(0);
        let mut shape = x.dims().to_vec();
        if let Some(l) = shape.last_mut() {
            *l = k;
        }
        let xd = dev(OP, x)?;
        let e = self.engine(OP)?;
        let (vals, vd) = self.empty(&e, shape.clone().into(), DType::F32)?;
        let (idx, id) = self.empty(&e, shape.into(), DType::I32)?;
        // SAFETY: `x` holds rows·len elements, the outputs rows·k.
        self.ck(OP, unsafe {
            e.tk.topk(&e.gpu, xd, vd.ptr, id.ptr, rows, len, k)
        })?;
        Ok((vals, idx))
    }
}
