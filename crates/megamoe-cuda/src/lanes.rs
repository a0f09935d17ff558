//! GEMM lanes: independent GEMMs (the per-expert GEMMs of a dropless grouped matmul) spread
//! over the engine's stream and up to [`MAX_LANES`]` − 1` side streams, so that one GEMM's
//! ramp-up and tail overlap the next one's instead of leaving SMs idle.
//!
//! [`Gpu::with_gemm_lanes`] forks (every side stream waits, on the device, for the work
//! queued on the engine's stream so far), runs the caller's GEMMs ([`GemmLanes::gemm`], lane
//! `i` on stream `i`, lane 0 being the engine's stream) and joins (the engine's stream waits
//! for every side stream), also when the caller fails. So the engine's stream stays the one
//! order the rest of the engine (the stream-ordered pool's frees included) relies on, and
//! fork / join are events: graph-capturable. Each side stream has its own cuBLAS handle and
//! a workspace of the engine's size: a GEMM then picks the same algorithm on every lane, so
//! its result bits do not depend on the lane (tested on the GPU). Only classic cuBLAS runs on
//! side streams (cuBLASLt shares one workspace): with another [`crate::GemmPath`] every lane
//! is the engine's stream.

use std::cell::RefCell;
use std::ffi::c_void;

use cudarc::cublas::{result as bres, sys as bsys};
use cudarc::driver::{result as dres, sys as dsys};

use crate::device::{Gpu, CUBLAS_WORKSPACE};
use crate::error::{DriverCtx, Result};
use crate::gemm::Operand;
use crate::pool::DeviceBuffer;

/// Most lanes (the engine's stream included) a fork may use.
pub const MAX_LANES: usize = 4;

/// One side stream with its own cuBLAS handle and workspace.
struct Lane {
    stream: dsys::CUstream,
    blas: bsys::cublasHandle_t,
    /// Recorded on `stream` at the join.
    done: dsys::CUevent,
    _workspace: DeviceBuffer,
}

impl Drop for Lane {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::stream::synchronize(self.stream);
            let _ = bres::destroy_handle(self.blas);
            let _ = dres::event::destroy(self.done);
            let _ = dres::stream::destroy(self.stream);
        }
    }
}

/// The engine's side streams (made on first use) and its fork event.
#[derive(Default)]
pub(crate) struct LaneState {
    lanes: RefCell<Vec<Lane>>,
    fork: RefCell<Option<dsys::CUevent>>,
}

impl Drop for LaneState {
    fn drop(&mut self) {
        self.lanes.borrow_mut().clear();
        if let Some(e) = self.fork.borrow_mut().take() {
            unsafe {
                let _ = dres::event::destroy(e);
            }
        }
    }
}

fn event() -> Result<dsys::CUevent> {
    dres::event::create(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING).ctx("cuEventCreate")
}

impl Gpu {
    /// The side stream `i` (≥ 1), made with its handle and workspace when first needed.
    fn ensure_lanes(&self, n: usize) -> Result<()> {
        let mut lanes = self.lanes.lanes.borrow_mut();
        while lanes.len() + 1 < n {
            let stream = dres::stream::create(dres::stream::StreamKind::NonBlocking)
                .ctx("cuStreamCreate")?;
            let workspace = DeviceBuffer::alloc(&self.pool, CUBLAS_WORKSPACE)?;
            let blas = bres::create_handle().ctx("cublasCreate")?;
            let lane = Lane {
                stream,
                blas,
                done: event()?,
                _workspace: workspace,
            };
            unsafe {
                bres::set_stream(lane.blas, stream as bsys::cudaStream_t).ctx("cublasSetStream")?;
                bsys::cublasSetWorkspace_v2(
                    lane.blas,
                    lane._workspace.ptr() as *mut c_void,
                    CUBLAS_WORKSPACE,
                )
                .result()
                .ctx("cublasSetWorkspace")?;
                bsys::cublasSetMathMode(lane.blas, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                    .result()
                    .ctx("cublasSetMathMode")?;
            }
            lanes.push(lane);
        }
        let mut fork = self.lanes.fork.borrow_mut();
        if fork.is_none() {
            *fork = Some(event()?);
        }
        Ok(())
    }

    /// Runs `f` with `n` GEMM lanes (clamped to `1..=`[`MAX_LANES`]; 1 when the engine's
    /// bf16 GEMMs do not take classic cuBLAS): fork, `f`, join (see the module doc). `f`'s
    /// error comes first; a failed join is reported after a successful `f`.
    pub fn with_gemm_lanes<T>(
        &self,
        n: usize,
        f: impl FnOnce(&GemmLanes<'_>) -> Result<T>,
    ) -> Result<T> {
        let n = if self.lt.path == crate::GemmPath::Blas {
            n.clamp(1, MAX_LANES)
        } else {
            1
        };
        if n == 1 {
            return f(&GemmLanes { gpu: self, n: 1 });
        }
        self.ensure_lanes(n)?;
        let main = self.stream();
        {
            let fork = self.lanes.fork.borrow().ok_or_else(|| {
                crate::Error::invalid("gemm lanes", "no fork event", "made by ensure_lanes")
            })?;
            let lanes = self.lanes.lanes.borrow();
            unsafe {
                dres::event::record(fork, main).ctx("cuEventRecord")?;
                for l in &lanes[..n - 1] {
                    dres::stream::wait_event(
                        l.stream,
                        fork,
                        dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .ctx("cuStreamWaitEvent")?;
                }
            }
        }
        let out = f(&GemmLanes { gpu: self, n });
        let joined = self.join_lanes(n);
        let out = out?;
        joined?;
        Ok(out)
    }

    /// The engine's stream waits for side streams `1..n`.
    fn join_lanes(&self, n: usize) -> Result<()> {
        let main = self.stream();
        let lanes = self.lanes.lanes.borrow();
        for l in &lanes[..n - 1] {
            unsafe {
                dres::event::record(l.done, l.stream).ctx("cuEventRecord")?;
                dres::stream::wait_event(
                    main,
                    l.done,
                    dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .ctx("cuStreamWaitEvent")?;
            }
        }
        Ok(())
    }
}

/// The lanes of one fork ([`Gpu::with_gemm_lanes`]).
pub struct GemmLanes<'a> {
    gpu: &'a Gpu,
    n: usize,
}

impl GemmLanes<'_> {
    /// Lanes of this fork (1 to [`MAX_LANES`]).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a fork has at least the engine's stream.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// [`GemmLanes::gemm`], on lane 0 first through [`Gpu::gemm_bucketed`] when `vary` is
    /// given (its dimension's bucket picks the algorithm); side lanes ignore `vary`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_varying(
        &self,
        lane: usize,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        beta: f32,
        vary: Option<crate::Varying>,
    ) -> Result<()> {
        if let Some(v) = vary {
            if lane.is_multiple_of(self.n) && self.gpu.gemm_bucketed(mnk, a, b, c, 1.0, beta, v)? {
                return Ok(());
            }
        }
        self.gemm(lane, mnk, a, b, c, 1, 1.0, beta)
    }

    /// [`Gpu::gemm`] on lane `lane % len()` (lane 0: the engine's stream, and the engine's
    /// GEMM path; other lanes: classic cuBLAS on their side stream).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        lane: usize,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let lane = lane % self.n;
        if lane == 0 {
            return self.gpu.gemm(m, n, k, a, b, c, batch, alpha, beta);
        }
        self.gpu.check_gemm((m, n, k), a, b, c, batch)?;
        let blas = self.gpu.lanes.lanes.borrow()[lane - 1].blas;
        self.gpu
            .gemm_blas_on(blas, (m, n, k), a, b, c, batch, alpha, beta)
    }
}
