//! cuBLAS GEMMs in row-major terms: `C = alpha · op(A) · op(B) + beta · C`, optionally a
//! strided batch. bf16 or f32 storage, always f32 accumulation (`CUBLAS_COMPUTE_32F`; the
//! f32 path uses no TF32, so it is the parity path).
//!
//! cuBLAS is column-major: a row-major `[m, n]` matrix is its column-major transpose, so
//! row-major `C = op(A) · op(B)` is issued as column-major `Cᵀ = op(B)ᵀ · op(A)ᵀ`.

use std::ffi::c_void;

use cudarc::cublas::{result as bres, sys as bsys};

use crate::device::Gpu;
use crate::error::{DriverCtx, Error, Result};

/// Element type of device storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    /// IEEE single.
    F32,
    /// bfloat16.
    Bf16,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }

    /// The C type name the kernels are compiled with.
    pub fn c_type(self) -> &'static str {
        match self {
            Elem::F32 => "float",
            Elem::Bf16 => "__nv_bfloat16",
        }
    }

    fn cuda(self) -> bsys::cudaDataType {
        match self {
            Elem::F32 => bsys::cudaDataType::CUDA_R_32F,
            Elem::Bf16 => bsys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// One row-major GEMM operand: a device address, its element type, leading dimension (row
/// length in storage), the batch stride in elements and whether it is used transposed.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    /// Device address of batch 0.
    pub ptr: u64,
    /// Storage type.
    pub elem: Elem,
    /// Elements between the starts of consecutive rows.
    pub ld: usize,
    /// Elements between consecutive batch entries (0 when not batched).
    pub stride: usize,
    /// Use the transpose.
    pub trans: bool,
}

impl Operand {
    /// A dense row-major matrix with `cols` columns, not transposed, batch stride `stride`.
    pub fn dense(ptr: u64, elem: Elem, cols: usize, stride: usize) -> Operand {
        Operand {
            ptr,
            elem,
            ld: cols,
            stride,
            trans: false,
        }
    }

    /// The same operand used transposed.
    pub fn t(self) -> Operand {
        Operand {
            trans: true,
            ..self
        }
    }
}

fn dim(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(field, v, "must fit in i32 for cuBLAS"))
}

impl Gpu {
    /// `C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C`, `batch` times with the
    /// operands' strides. A and B share one element type; C may be f32 with bf16 inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.check_gemm((m, n, k), a, b, c, batch)?;
        if a.elem == Elem::Bf16 && self.lt.path == crate::gemm_lt::GemmPath::Tuned {
            return self.gemm_tuned((m, n, k), a, b, c, batch, alpha, beta);
        }
        if a.elem == Elem::Bf16
            && self.lt.path.uses_lt(batch)
            && self.gemm_lt((m, n, k), a, b, c, batch, alpha, beta, 0)?
        {
            return Ok(());
        }
        self.gemm_blas((m, n, k), a, b, c, batch, alpha, beta)
    }

    /// [`Gpu::gemm`]'s checks: one A/B element type, C not transposed, no empty dimension.
    pub(crate) fn check_gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
    ) -> Result<()> {
        if a.elem != b.elem {
            return Err(Error::invalid(
                "gemm operand types",
                format!("{:?} x {:?}", a.elem, b.elem),
                "A and B must have one element type",
            ));
        }
        if c.trans {
            return Err(Error::invalid(
                "gemm C",
                "transposed",
                "C cannot be transposed",
            ));
        }
        if m == 0 || n == 0 || k == 0 || batch == 0 {
            return Err(Error::invalid(
                "gemm shape",
                format!("m={m} n={n} k={k} batch={batch}"),
                "every dimension must be >= 1",
            ));
        }
        Ok(())
    }

    /// [`Gpu::gemm`] through classic cuBLAS (`cublasGemmEx` / `cublasGemmStridedBatchedEx`)
    /// whatever the engine's [`crate::GemmPath`] (for A/B timing); shapes checked by
    /// [`Gpu::gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_blas(
        &self,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_blas_on(self.blas, mnk, a, b, c, batch, alpha, beta)
    }

    /// [`Gpu::gemm_blas`] through cuBLAS handle `blas` (the engine's, or a GEMM lane's bound
    /// to its side stream, `lanes.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_blas_on(
        &self,
        blas: bsys::cublasHandle_t,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // column-major: C'[n, m] = op(B)' [n, k] · op(A)' [k, m]
        let (mi, ni, ki) = (dim("gemm n", n)?, dim("gemm m", m)?, dim("gemm k", k)?);
        let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let alpha_p = &alpha as *const f32 as *const c_void;
        let beta_p = &beta as *const f32 as *const c_void;
        unsafe {
            if batch == 1 {
                bres::gemm_ex(
                    blas,
                    op(b.trans),
                    op(a.trans),
                    mi,
                    ni,
                    ki,
                    alpha_p,
                    b.ptr as *const c_void,
                    b.elem.cuda(),
                    dim("gemm ldb", b.ld)?,
                    a.ptr as *const c_void,
                    a.elem.cuda(),
                    dim("gemm lda", a.ld)?,
                    beta_p,
                    c.ptr as *mut c_void,
                    c.elem.cuda(),
                    dim("gemm ldc", c.ld)?,
                    compute,
                    algo,
                )
                .ctx("cublasGemmEx")
            } else {
                bres::gemm_strided_batched_ex(
                    blas,
                    op(b.trans),
                    op(a.trans),
                    mi,
                    ni,
                    ki,
                    alpha_p,
                    b.ptr as *const c_void,
                    b.elem.cuda(),
                    dim("gemm ldb", b.ld)?,
                    b.stride as i64,
                    a.ptr as *const c_void,
                    a.elem.cuda(),
                    dim("gemm lda", a.ld)?,
                    a.stride as i64,
                    beta_p,
                    c.ptr as *mut c_void,
                    c.elem.cuda(),
                    dim("gemm ldc", c.ld)?,
                    c.stride as i64,
                    dim("gemm batch", batch)?,
                    compute,
                    algo,
                )
                .ctx("cublasGemmStridedBatchedEx")
            }
        }
    }
}
