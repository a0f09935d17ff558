//! bf16 GEMMs through cuBLASLt: the row-major contract of [`Gpu::gemm`] (same operands,
//! same column-major swap), with the algorithm picked by cuBLASLt's heuristic for the
//! engine's workspace and the operands' actual alignment. The descriptors and the
//! heuristic's candidate list are made once per shape and cached on the engine, so a call
//! costs one `cublasLtMatmul` (graph-capturable: no allocation, no host read).
//!
//! Which bf16 GEMMs take it is [`GEMM_PATH_VAR`] (an A/B switch): `blas` (the default)
//! none (`cublasGemmEx` / `cublasGemmStridedBatchedEx`), `lt` the strided-batched ones
//! (expert GEMMs over `[G, C, ·]`: few fixed shapes), `lt-all` every bf16 GEMM (also the
//! dense ones and the per-group GEMMs of dropless experts, whose row counts change every
//! step: one heuristic query per new shape), `tuned` per fixed shape the fastest of
//! classic cuBLAS and the cuBLASLt candidates, timed once on first use (`Gpu::gemm_tuned`;
//! a timed choice can differ between runs when contenders are within its margin, and with
//! it the results' last bits). On an H200 at the gpu_1b expert shapes the
//! heuristic's first choice was not faster than classic cuBLAS (docs/perf.md), hence the
//! default. f32 GEMMs always take classic cuBLAS (no TF32: the parity path). A problem
//! cuBLASLt has no algorithm for falls back to classic cuBLAS.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lres, sys as lsys};

use crate::device::Gpu;
use crate::error::{DriverCtx, Error, Result};
use crate::gemm::{Elem, Operand};

/// The variable choosing the bf16 GEMM path: `blas` (default), `lt`, `lt-all` or `tuned`.
pub const GEMM_PATH_VAR: &str = "MEGAMOE_CUDA_GEMM";

/// Candidates asked of the heuristic per shape.
const CANDIDATES: usize = 8;

/// Which library runs bf16 GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// Strided-batched bf16 GEMMs through cuBLASLt, single ones through classic cuBLAS.
    Lt,
    /// Every bf16 GEMM through cuBLASLt.
    LtAll,
    /// Classic cuBLAS (`cublasGemmEx` / `cublasGemmStridedBatchedEx`) only.
    Blas,
    /// Per shape, the fastest of classic cuBLAS and the cuBLASLt candidates, timed once on
    /// the shape's first use (`Gpu::gemm_tuned` in this module).
    Tuned,
}

impl GemmPath {
    /// [`GEMM_PATH_VAR`] (unset or empty: [`GemmPath::Blas`]); another value is a named
    /// error.
    pub fn from_env() -> Result<GemmPath> {
        match std::env::var(GEMM_PATH_VAR) {
            Err(_) => Ok(GemmPath::Blas),
            Ok(v) => match v.as_str() {
                "" | "blas" => Ok(GemmPath::Blas),
                "lt" => Ok(GemmPath::Lt),
                "lt-all" => Ok(GemmPath::LtAll),
                "tuned" => Ok(GemmPath::Tuned),
                _ => Err(Error::invalid(
                    GEMM_PATH_VAR,
                    v,
                    "must be blas, lt, lt-all or tuned",
                )),
            },
        }
    }

    /// Whether a bf16 GEMM of `batch` entries goes to cuBLASLt.
    pub fn uses_lt(self, batch: usize) -> bool {
        match self {
            GemmPath::Lt => batch > 1,
            GemmPath::LtAll => true,
            GemmPath::Blas | GemmPath::Tuned => false,
        }
    }
}

/// What identifies a cached plan: the shape, layouts and the operands' alignments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    mnk: (usize, usize, usize),
    a: (Elem, usize, usize, bool, u32),
    b: (Elem, usize, usize, bool, u32),
    c: (Elem, usize, usize, u32),
    batch: usize,
}

/// A cached problem: the descriptors and the heuristic's candidates (best first).
pub(crate) struct Plan {
    pub(crate) desc: lsys::cublasLtMatmulDesc_t,
    /// Column-major A (our B), B (our A), C (= D).
    layouts: [lsys::cublasLtMatrixLayout_t; 3],
    pub(crate) algos: Vec<lsys::cublasLtMatmulHeuristicResult_t>,
    /// [`GemmPath::Tuned`]: the timed choice (`None`: classic cuBLAS, `Some(i)`: candidate
    /// `i`), once made.
    tuned: std::cell::Cell<Option<Option<usize>>>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            for l in self.layouts {
                let _ = lres::destroy_matrix_layout(l);
            }
            let _ = lres::destroy_matmul_desc(self.desc);
        }
    }
}

/// The engine's cuBLASLt state: handle, workspace (the cuBLAS handle's, same stream, so
/// never used by two GEMMs at once) and the plan cache.
pub(crate) struct LtState {
    pub(crate) handle: lsys::cublasLtHandle_t,
    pub(crate) workspace: (u64, usize),
    pub(crate) plans: RefCell<HashMap<Key, Option<Plan>>>,
    pub(crate) path: GemmPath,
}

impl LtState {
    pub(crate) fn new(workspace: (u64, usize), path: GemmPath) -> Result<LtState> {
        Ok(LtState {
            handle: lres::create_handle().ctx("cublasLtCreate")?,
            workspace,
            plans: RefCell::new(HashMap::new()),
            path,
        })
    }
}

impl Drop for LtState {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        unsafe {
            let _ = lres::destroy_handle(self.handle);
        }
    }
}

/// The largest power of two (≤ 256) dividing every byte address an operand's batch
/// entries start at.
fn align(ptr: u64, stride: usize, elem: Elem, batch: usize) -> u32 {
    let mut v = ptr | 256;
    if batch > 1 {
        v |= (stride * elem.size()) as u64;
    }
    1 << v.trailing_zeros().min(8)
}

fn cuda_type(e: Elem) -> lsys::cudaDataType {
    match e {
        Elem::F32 => lsys::cudaDataType::CUDA_R_32F,
        Elem::Bf16 => lsys::cudaDataType::CUDA_R_16BF,
    }
}

/// `cublasOperation_t` as the descriptor attribute takes it (an `int32`: N = 0, T = 1).
fn lt_op(trans: bool) -> i32 {
    i32::from(trans)
}

/// A column-major layout of `rows × cols` (ld, batch stride in elements).
pub(crate) fn layout(
    e: Elem,
    (rows, cols): (usize, usize),
    ld: usize,
    stride: usize,
    batch: usize,
) -> Result<lsys::cublasLtMatrixLayout_t> {
    let l = lres::create_matrix_layout(cuda_type(e), rows as u64, cols as u64, ld as i64)
        .ctx("cublasLtMatrixLayoutCreate")?;
    if batch > 1 {
        let count = batch as i32;
        let offset = stride as i64;
        use lsys::cublasLtMatrixLayoutAttribute_t as A;
        unsafe {
            lres::set_matrix_layout_attribute(
                l,
                A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                4,
            )
            .ctx("cublasLtMatrixLayoutSetAttribute")?;
            lres::set_matrix_layout_attribute(
                l,
                A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &offset as *const i64 as *const c_void,
                8,
            )
            .ctx("cublasLtMatrixLayoutSetAttribute")?;
        }
    }
    Ok(l)
}

impl LtState {
    /// The plan of `key` (made and cached on first use; `None`: cuBLASLt has no algorithm).
    pub(crate) fn plan(&self, key: Key) -> Result<bool> {
        if let Some(p) = self.plans.borrow().get(&key) {
            return Ok(p.is_some());
        }
        let plan = self.make_plan(key)?;
        let ok = plan.is_some();
        self.plans.borrow_mut().insert(key, plan);
        Ok(ok)
    }

    fn make_plan(&self, key: Key) -> Result<Option<Plan>> {
        let (m, n, k) = key.mnk;
        let (ae, ald, ast, at, aal) = key.a;
        let (be, bld, bst, bt, bal) = key.b;
        let (ce, cld, cst, cal) = key.c;
        // column-major: C'[n, m] = op(B)' [n, k] · op(A)' [k, m]; Lt's A is our B.
        let desc = lres::create_matmul_desc(
            lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lsys::cudaDataType::CUDA_R_32F,
        )
        .ctx("cublasLtMatmulDescCreate")?;
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algos: Vec::new(),
            tuned: std::cell::Cell::new(None),
        };
        use lsys::cublasLtMatmulDescAttributes_t as D;
        for (attr, t) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, bt),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, at),
        ] {
            let op = lt_op(t);
            unsafe {
                lres::set_matmul_desc_attribute(desc, attr, &op as *const i32 as *const c_void, 4)
                    .ctx("cublasLtMatmulDescSetAttribute")?;
            }
        }
        let dims = |t: bool, r: usize, c: usize| if t { (c, r) } else { (r, c) };
        plan.layouts[0] = layout(be, dims(bt, n, k), bld, bst, key.batch)?;
        plan.layouts[1] = layout(ae, dims(at, k, m), ald, ast, key.batch)?;
        plan.layouts[2] = layout(ce, (n, m), cld, cst, key.batch)?;
        let pref = lres::create_matmul_pref().ctx("cublasLtMatmulPreferenceCreate")?;
        let result = (|| -> Result<Vec<lsys::cublasLtMatmulHeuristicResult_t>> {
            use lsys::cublasLtMatmulPreferenceAttributes_t as P;
            let ws = self.workspace.1 as u64;
            let set = |attr, v: &u64| unsafe {
                lres::set_matmul_pref_attribute(pref, attr, v as *const u64 as *const c_void, 8)
                    .ctx("cublasLtMatmulPreferenceSetAttribute")
            };
            set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
            let aligns = [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, bal),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, aal),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, cal),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, cal),
            ];
            for (attr, a) in aligns {
                let v: u32 = a;
                unsafe {
                    lres::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &v as *const u32 as *const c_void,
                        4,
                    )
                    .ctx("cublasLtMatmulPreferenceSetAttribute")?;
                }
            }
            let mut out: Vec<lsys::cublasLtMatmulHeuristicResult_t> =
                vec![unsafe { std::mem::zeroed() }; CANDIDATES];
            let mut count = 0i32;
            let l = plan.layouts;
            let st = unsafe {
                lsys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    l[0],
                    l[1],
                    l[2],
                    l[2],
                    pref,
                    CANDIDATES as i32,
                    out.as_mut_ptr(),
                    &mut count,
                )
            };
            if st != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Ok(Vec::new());
            }
            out.truncate(count.max(0) as usize);
            out.retain(|r| {
                r.state == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && r.workspaceSize <= self.workspace.1
            });
            Ok(out)
        })();
        unsafe {
            let _ = lres::destroy_matmul_pref(pref);
        }
        plan.algos = result?;
        Ok(if plan.algos.is_empty() {
            None
        } else {
            Some(plan)
        })
    }
}

pub(crate) fn key(
    mnk: (usize, usize, usize),
    a: &Operand,
    b: &Operand,
    c: &Operand,
    batch: usize,
) -> Key {
    Key {
        mnk,
        a: (
            a.elem,
            a.ld,
            a.stride,
            a.trans,
            align(a.ptr, a.stride, a.elem, batch),
        ),
        b: (
            b.elem,
            b.ld,
            b.stride,
            b.trans,
            align(b.ptr, b.stride, b.elem, batch),
        ),
        c: (
            c.elem,
            c.ld,
            c.stride,
            align(c.ptr, c.stride, c.elem, batch),
        ),
        batch,
    }
}

/// A cuBLASLt candidate replaces classic cuBLAS only when at least this much faster (a
/// margin, so that near-ties do not flip the choice, and the results' bits, between runs).
const TUNE_MARGIN: f32 = 0.95;

/// Timed calls per contender when tuning.
const TUNE_CALLS: usize = 3;

impl Gpu {
    /// [`Gpu::gemm`] under [`GemmPath::Tuned`] for a shape worth tuning (strided-batched,
    /// or every dimension a multiple of 64: fixed model shapes, not the per-expert GEMMs of
    /// dropless layers whose row counts change every step; others take classic cuBLAS).
    /// On a shape's first use outside a stream capture, times classic cuBLAS and each
    /// cuBLASLt candidate ([`TUNE_CALLS`] calls each, into a scratch output, after one
    /// untimed call; synchronizes) and keeps the fastest (cuBLASLt only if faster by
    /// [`TUNE_MARGIN`]). First seen while capturing: classic cuBLAS, kept.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tuned(
        &self,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (m, n, k) = mnk;
        let fixed = batch > 1 || (m % 64 == 0 && n % 64 == 0 && k % 64 == 0);
        let key = key(mnk, &a, &b, &c, batch);
        if !fixed || !self.lt.plan(key)? {
            return self.gemm_blas(mnk, a, b, c, batch, alpha, beta);
        }
        let choice = {
            let plans = self.lt.plans.borrow();
            let Some(Some(plan)) = plans.get(&key) else {
                return self.gemm_blas(mnk, a, b, c, batch, alpha, beta);
            };
            plan.tuned.get()
        };
        let choice = match choice {
            Some(choice) => choice,
            None => {
                let choice = self.tune(mnk, a, b, c, batch, beta)?;
                if let Some(Some(plan)) = self.lt.plans.borrow().get(&key) {
                    plan.tuned.set(Some(choice));
                }
                choice
            }
        };
        match choice {
            Some(i) if self.gemm_lt(mnk, a, b, c, batch, alpha, beta, i)? => Ok(()),
            _ => self.gemm_blas(mnk, a, b, c, batch, alpha, beta),
        }
    }

    /// The timed choice of [`Gpu::gemm_tuned`] (`None`: classic cuBLAS).
    fn tune(
        &self,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        beta: f32,
    ) -> Result<Option<usize>> {
        let capturing = unsafe { cudarc::driver::result::stream::is_capturing(self.stream()) }
            .ctx("cuStreamIsCapturing")?;
        if capturing != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(None);
        }
        let (m, n, _) = mnk;
        let elems = if batch > 1 { c.stride * (batch - 1) } else { 0 } + (m - 1) * c.ld + n;
        let scratch = self.alloc(elems * c.elem.size())?;
        let sc = Operand {
            ptr: scratch.ptr(),
            ..c
        };
        let timer = crate::device::EventTimer::new()?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f32> {
            f()?;
            timer.start(self)?;
            for _ in 0..TUNE_CALLS {
                f()?;
            }
            timer.stop_ms(self)
        };
        let blas = time(&|| self.gemm_blas(mnk, a, b, sc, batch, 1.0, beta))?;
        // the plan of the real operands (a fresh pool buffer is at least as aligned)
        let key = key(mnk, &a, &b, &c, batch);
        let candidates = self.gemm_lt_candidates(mnk, a, b, c, batch)?;
        let ptrs = (a.ptr, b.ptr, sc.ptr);
        let mut best: Option<(usize, f32)> = None;
        for i in 0..candidates {
            let t = time(&|| self.lt_launch(key, ptrs, 1.0, beta, i).map(|_| ()))?;
            if best.is_none_or(|(_, bt)| t < bt) {
                best = Some((i, t));
            }
        }
        drop(scratch);
        Ok(best
            .filter(|&(_, t)| t <= TUNE_MARGIN * blas)
            .map(|(i, _)| i))
    }

    /// [`Gpu::gemm`] through cuBLASLt with candidate `algo` of the heuristic's list (0 =
    /// its first choice). `Ok(false)`: cuBLASLt has no algorithm for this problem, or no
    /// candidate `algo` (nothing was launched).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_lt(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
        algo: usize,
    ) -> Result<bool> {
        let key = key((m, n, k), &a, &b, &c, batch);
        if !self.lt.plan(key)? {
            return Ok(false);
        }
        self.lt_launch(key, (a.ptr, b.ptr, c.ptr), alpha, beta, algo)
    }

    /// `D[m, n] = alpha · op(A) · op(B) + beta · C` with the result in `d`, a buffer other
    /// than C's of C's type and layout (batch 1, the heuristic's first candidate): a
    /// residual add folded into its GEMM (C the residual stream, read; D fresh). Classic
    /// cuBLAS has no D ≠ C, so this takes cuBLASLt whatever [`GEMM_PATH_VAR`] says.
    /// `Ok(false)`: cuBLASLt has no algorithm for this problem (nothing was launched).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_lt_into(
        &self,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        d: u64,
        alpha: f32,
        beta: f32,
    ) -> Result<bool> {
        let (m, n, k) = mnk;
        if a.elem != b.elem || c.trans || m == 0 || n == 0 || k == 0 {
            return Err(Error::invalid(
                "gemm_lt_into operands",
                format!("m={m} n={n} k={k} A {:?} B {:?}", a.elem, b.elem),
                "A and B of one type, C not transposed, every dimension >= 1",
            ));
        }
        let mut key = key(mnk, &a, &b, &c, 1);
        // one plan serves C and D: the alignment both have
        key.c.3 = key.c.3.min(align(d, 0, c.elem, 1));
        if !self.lt.plan(key)? {
            return Ok(false);
        }
        self.lt_launch_into(key, (a.ptr, b.ptr, c.ptr, d), alpha, beta, 0)
    }

    /// Candidate `algo` of the cached plan `key` on these operand addresses (which must
    /// have the key's alignment); `Ok(false)`: no such plan or candidate.
    fn lt_launch(
        &self,
        key: Key,
        (a, b, c): (u64, u64, u64),
        alpha: f32,
        beta: f32,
        algo: usize,
    ) -> Result<bool> {
        self.lt_launch_into(key, (a, b, c, c), alpha, beta, algo)
    }

    /// [`Gpu::lt_launch`] with the result in `d` (C's layout; `d` may be `c`).
    fn lt_launch_into(
        &self,
        key: Key,
        (a, b, c, d): (u64, u64, u64, u64),
        alpha: f32,
        beta: f32,
        algo: usize,
    ) -> Result<bool> {
        let lt = &self.lt;
        let plans = lt.plans.borrow();
        let Some(Some(plan)) = plans.get(&key) else {
            return Ok(false);
        };
        let Some(h) = plan.algos.get(algo) else {
            return Ok(false);
        };
        let l = plan.layouts;
        unsafe {
            lres::matmul(
                lt.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                l[0],
                a as *const c_void,
                l[1],
                c as *const c_void,
                l[2],
                d as *mut c_void,
                l[2],
                &h.algo,
                lt.workspace.0 as *mut c_void,
                lt.workspace.1,
                self.stream() as lsys::cudaStream_t,
            )
            .ctx("cublasLtMatmul")?;
        }
        Ok(true)
    }

    /// How many heuristic candidates cuBLASLt offers for this problem (0: none); made and
    /// cached as [`Gpu::gemm_lt`] would (for A/B timing of the candidates).
    pub fn gemm_lt_candidates(
        &self,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
    ) -> Result<usize> {
        let lt = &self.lt;
        let key = key(mnk, &a, &b, &c, batch);
        if !lt.plan(key)? {
            return Ok(0);
        }
        Ok(lt
            .plans
            .borrow()
            .get(&key)
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.algos.len()))
    }

    /// The bf16 GEMM path of this engine ([`GEMM_PATH_VAR`]).
    pub fn gemm_path(&self) -> GemmPath {
        self.lt.path
    }
}
