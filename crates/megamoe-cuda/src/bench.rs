//! `megamoe bench moe`: times the static-capacity MoE layer with CUDA events (median of
//! many runs after a warm-up), eager and as a replayed CUDA graph, per stage, with the
//! pool's memory counters.

use cudarc::driver::{result as dres, sys as dsys};

use crate::device::{EventTimer, Gpu};
use crate::error::{DriverCtx, Error, Result};
use crate::gemm::Elem;
use crate::moe::{CudaMoe, MoeShape, RouterSpec};
use crate::pool::PoolStats;

/// What to time.
#[derive(Debug, Clone)]
pub struct MoeBenchConfig {
    /// T, H, F, E, k (capacity is chosen by the bench).
    pub tokens: usize,
    /// H.
    pub d_model: usize,
    /// F.
    pub hidden: usize,
    /// E.
    pub experts: usize,
    /// k.
    pub top_k: usize,
    /// C = ceil(T·k/E · cf); `None`: C = the largest expert's demand rounded up to 128
    /// (nothing dropped), read once before timing.
    pub capacity_factor: Option<f64>,
    /// Storage type.
    pub elem: Elem,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (the median is reported).
    pub iters: usize,
    /// Seed of the device-side random weights and inputs.
    pub seed: u64,
}

/// Measured results (milliseconds are medians).
#[derive(Debug, Clone)]
pub struct MoeBenchReport {
    /// Device name.
    pub device: String,
    /// The layer's shape (with the chosen capacity).
    pub shape: MoeShape,
    /// Storage type.
    pub elem: Elem,
    /// Assignments kept / demanded (T·k).
    pub kept: usize,
    /// Largest per-expert demand.
    pub max_demand: usize,
    /// Forward.
    pub fwd_ms: f64,
    /// Forward + backward, eager.
    pub fwd_bwd_ms: f64,
    /// Forward + backward, one CUDA graph replay.
    pub graph_fwd_bwd_ms: f64,
    /// Per-stage medians (forward then backward stages).
    pub stages: Vec<(&'static str, f64)>,
    /// Pool counters after the runs.
    pub pool: PoolStats,
    /// NVRTC compile seconds.
    pub compile_secs: f64,
    /// Timed runs per number.
    pub iters: usize,
}

impl MoeBenchReport {
    /// Useful TFLOP/s of the forward (6·T·k·d·h).
    pub fn fwd_tflops(&self) -> f64 {
        self.shape.forward_flops() / (self.fwd_ms * 1e-3) / 1e12
    }

    /// Useful TFLOP/s of forward + backward (3 × the forward FLOPs), eager.
    pub fn fwd_bwd_tflops(&self) -> f64 {
        3.0 * self.shape.forward_flops() / (self.fwd_bwd_ms * 1e-3) / 1e12
    }

    /// Same, graph replay.
    pub fn graph_tflops(&self) -> f64 {
        3.0 * self.shape.forward_flops() / (self.graph_fwd_bwd_ms * 1e-3) / 1e12
    }
}

impl std::fmt::Display for MoeBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shape;
        let es = self.elem.size() as f64;
        writeln!(
            f,
            "MoE layer on {} ({:?}): T {} d {} h {} E {} k {}, capacity {} (max demand {}, kept {}/{})",
            self.device, self.elem, s.tokens, s.d_model, s.hidden, s.experts, s.top_k, s.capacity,
            self.max_demand, self.kept, s.tokens * s.top_k
        )?;
        writeln!(
            f,
            "median of {} runs after warm-up, CUDA events",
            self.iters
        )?;
        writeln!(
            f,
            "  forward            {:8.3} ms  {:6.1} TFLOP/s",
            self.fwd_ms,
            self.fwd_tflops()
        )?;
        writeln!(
            f,
            "  fwd+bwd (eager)    {:8.3} ms  {:6.1} TFLOP/s",
            self.fwd_bwd_ms,
            self.fwd_bwd_tflops()
        )?;
        writeln!(
            f,
            "  fwd+bwd (graph)    {:8.3} ms  {:6.1} TFLOP/s",
            self.graph_fwd_bwd_ms,
            self.graph_tflops()
        )?;
        let rows = (s.experts * s.capacity) as f64;
        let (t, h) = (s.tokens as f64, s.d_model as f64);
        for (name, ms) in &self.stages {
            // bytes each memory-bound stage must move (read + write), for GB/s
            let bytes = match *name {
                "permute" => Some((self.kept as f64 + rows) * h * es),
                "combine" => Some((self.kept as f64 + t) * h * es),
                "unpermute" => Some((self.kept as f64 * h * es) + t * h * (4.0 + es)),
                _ => None,
            };
            match bytes {
                Some(b) => writeln!(
                    f,
                    "  {name:<18} {ms:8.3} ms  {:6.0} GB/s",
                    b / (ms * 1e-3) / 1e9
                )?,
                None => writeln!(f, "  {name:<18} {ms:8.3} ms")?,
            }
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "  pool: reserved {:.2} GiB, used {:.2} GiB, peak {:.2} GiB; NVRTC {:.2} s",
            gib(self.pool.reserved),
            gib(self.pool.used),
            gib(self.pool.peak),
            self.compile_secs
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Raw events for stage marks.
struct Events(Vec<dsys::CUevent>);

impl Events {
    fn record(&mut self, gpu: &Gpu) -> Result<()> {
        let ev = dres::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT).ctx("cuEventCreate")?;
        unsafe { dres::event::record(ev, gpu.stream()) }.ctx("cuEventRecord")?;
        self.0.push(ev);
        Ok(())
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        for &e in &self.0 {
            unsafe {
                let _ = dres::event::destroy(e);
            }
        }
    }
}

/// Runs the benchmark on GPU 0.
pub fn bench_moe(cfg: &MoeBenchConfig) -> Result<MoeBenchReport> {
    if cfg.iters < 1 {
        return Err(Error::invalid("iters", cfg.iters, "must be >= 1"));
    }
    let mut gpu = Gpu::new(0)?;
    let spec = RouterSpec::default();
    let base = |capacity| MoeShape {
        tokens: cfg.tokens,
        d_model: cfg.d_model,
        hidden: cfg.hidden,
        experts: cfg.experts,
        top_k: cfg.top_k,
        capacity,
    };
    let tk = cfg.tokens * cfg.top_k;
    let (moe, max_demand) = match cfg.capacity_factor {
        Some(cf) => {
            if !(cf.is_finite() && cf > 0.0) {
                return Err(Error::invalid("capacity_factor", cf, "must be > 0"));
            }
            let c = ((tk as f64 / cfg.experts as f64) * cf).ceil() as usize;
            let moe = CudaMoe::new_random(&mut gpu, base(c), spec, cfg.elem, cfg.seed)?;
            moe.forward(&gpu)?;
            let d = moe.read_demand(&gpu)?;
            (moe, d.into_iter().max().unwrap_or(0) as usize)
        }
        None => {
            // one routed pass at the balanced capacity reads the demand; the same seed
            // gives the same weights and inputs, so the rebuilt layer routes identically
            let c0 = tk.div_ceil(cfg.experts);
            let probe = CudaMoe::new_random(&mut gpu, base(c0), spec, cfg.elem, cfg.seed)?;
            probe.forward(&gpu)?;
            let d = probe.read_demand(&gpu)?.into_iter().max().unwrap_or(0) as usize;
            drop(probe);
            let c = d.div_ceil(128).max(1) * 128;
            (
                CudaMoe::new_random(&mut gpu, base(c), spec, cfg.elem, cfg.seed)?,
                d,
            )
        }
    };
    for _ in 0..cfg.warmup.max(1) {
        moe.forward(&gpu)?;
        moe.backward(&gpu, false)?;
    }
    gpu.synchronize()?;
    gpu.reset_peak();
    let timer = EventTimer::new()?;
    let time = |body: &dyn Fn(&Gpu) -> Result<()>| -> Result<f64> {
        let mut v = Vec::with_capacity(cfg.iters);
        for _ in 0..cfg.iters {
            timer.start(&gpu)?;
            body(&gpu)?;
            v.push(timer.stop_ms(&gpu)? as f64);
        }
        Ok(median(v))
    };
    let fwd_ms = time(&|g| moe.forward(g))?;
    let fwd_bwd_ms = time(&|g| {
        moe.forward(g)?;
        moe.backward(g, false)
    })?;
    // per stage: events after every stage mark
    let mut per_stage: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for _ in 0..cfg.iters {
        let mut ev = Events(Vec::new());
        let mut names = Vec::new();
        ev.record(&gpu)?;
        {
            let mut mark = |name: &'static str| -> Result<()> {
                names.push(name);
                ev.record(&gpu)
            };
            moe.forward_marked(&gpu, &mut mark)?;
            moe.backward_marked(&gpu, false, &mut mark)?;
        }
        gpu.synchronize()?;
        for (i, name) in names.iter().enumerate() {
            let ms =
                unsafe { dres::event::elapsed(ev.0[i], ev.0[i + 1]) }.ctx("cuEventElapsedTime")?;
            match per_stage.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(ms as f64),
                None => per_stage.push((name, vec![ms as f64])),
            }
        }
    }
    let stages = per_stage.into_iter().map(|(n, v)| (n, median(v))).collect();
    let graph = gpu.capture(|g| {
        moe.forward(g)?;
        moe.backward(g, false)
    })?;
    for _ in 0..cfg.warmup.max(1) {
        gpu.replay(&graph)?;
    }
    let graph_fwd_bwd_ms = time(&|g| g.replay(&graph))?;
    let kept = moe.read_counts(&gpu)?.iter().map(|&c| c as usize).sum();
    Ok(MoeBenchReport {
        device: gpu.info().name.clone(),
        shape: moe.shape(),
        elem: cfg.elem,
        kept,
        max_demand,
        fwd_ms,
        fwd_bwd_ms,
        graph_fwd_bwd_ms,
        stages,
        pool: gpu.pool_stats()?,
        compile_secs: gpu.compile_secs(),
        iters: cfg.iters,
    })
}
