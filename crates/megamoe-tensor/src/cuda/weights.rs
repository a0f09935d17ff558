//! bf16 copies of the f32 master weights, made once per optimizer step.
//!
//! In bf16-matmul mode every GEMM operand is bf16; the weights are f32 masters, so without
//! this cache each matmul cast its weight again (forward, input gradient, every
//! micro-batch). A trainer registers its parameters at the start of a step
//! ([`crate::WeightCopies`]); the first cast of a registered weight (or of a view of one:
//! an expert's slice, a reshape) fills its bf16 copy, and every later cast in the step
//! reads it. The copy is the same cast kernel on the same elements, so results are
//! bit-identical to casting each time.
//!
//! Validity: an entry holds a weak handle on the weight's buffer ([`BufferRef`]). While it
//! is held the buffer cannot be written in place (in-place ops copy-on-write a shared
//! buffer), and a replaced weight (the optimizer's fresh result, a loaded checkpoint) is a
//! different buffer and misses; write-through buffers (written in place by design) are
//! never registered. Registration ends with the step's forward and backward, before the
//! optimizer runs, and every registration starts a new epoch in which each copy is filled
//! again on first use.
//!
//! Addresses: copies live in slots numbered by registration order and keep their buffer
//! from step to step (same size), so a captured CUDA graph reads them at the address it
//! recorded. A slot still referenced elsewhere when it is refilled gets a fresh buffer.

use std::collections::HashMap;

use super::{dev, CudaBackend};
use crate::tensor::BufferRef;
use crate::{DType, Device, Result, Tensor};

/// One registered weight and its copy.
#[derive(Debug)]
struct Slot {
    /// The weight's buffer while registered (`None` between steps).
    source: Option<BufferRef>,
    /// The weight's element range in its buffer.
    offset: usize,
    numel: usize,
    /// The bf16 copy of that range (allocated on first use, kept between steps).
    copy: Option<Tensor>,
    /// The copy holds this epoch's values.
    filled: bool,
}

/// The weight copies of one GPU (see the module doc).
#[derive(Debug)]
pub(crate) struct WeightCache {
    /// Registration is honoured ([`CudaBackend::set_weight_copies`]).
    on: bool,
    slots: Vec<Slot>,
    /// Buffer identity → slots registered on it.
    by_buffer: HashMap<usize, Vec<usize>>,
    stats: WeightCopyStats,
}

impl Default for WeightCache {
    fn default() -> Self {
        WeightCache {
            // `MEGAMOE_CUDA_WEIGHT_COPIES=off` casts at every use (for A/B timing).
            on: std::env::var("MEGAMOE_CUDA_WEIGHT_COPIES").as_deref() != Ok("off"),
            slots: Vec::new(),
            by_buffer: HashMap::new(),
            stats: WeightCopyStats::default(),
        }
    }
}

/// Counters of a GPU's weight copies since its backend opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightCopyStats {
    /// Weights registered by the latest registration (0 once released).
    pub registered: usize,
    /// Copies filled (one cast of a weight each).
    pub fills: u64,
    /// bf16 operands served from a filled copy (casts saved).
    pub hits: u64,
}

impl CudaBackend {
    /// Registers `weights` (this GPU's f32, non-write-through tensors; others are skipped)
    /// for the step that starts: a new epoch of copies. See [`crate::WeightCopies`].
    pub(crate) fn register_weights(&self, weights: &[Tensor]) {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let WeightCache {
            on,
            slots,
            by_buffer,
            stats,
        } = &mut *c;
        by_buffer.clear();
        let mut n = 0;
        for w in weights.iter().filter(|_| *on) {
            let eligible = w.dtype() == DType::F32
                && !w.is_write_through()
                && w.device() == Device::Cuda(self.ordinal)
                && w.numel() > 0;
            if !eligible {
                continue;
            }
            let (offset, numel) = (w.layout().offset(), w.numel());
            let on_buffer = by_buffer.entry(w.buffer_id()).or_default();
            let covered = on_buffer.iter().any(|&i| {
                let s: &Slot = &slots[i];
                s.offset <= offset && offset + numel <= s.offset + s.numel
            });
            if covered {
                continue;
            }
            if n == slots.len() {
                slots.push(Slot {
                    source: None,
                    offset,
                    numel,
                    copy: None,
                    filled: false,
                });
            }
            let s = &mut slots[n];
            if s.numel != numel {
                s.copy = None;
            }
            (s.source, s.offset, s.numel, s.filled) = (Some(w.buffer_ref()), offset, numel, false);
            on_buffer.push(n);
            n += 1;
        }
        for s in &mut slots[n..] {
            (s.source, s.filled) = (None, false);
        }
        stats.registered = n;
    }

    /// Ends the registration (the weights may be written again); the copies' buffers stay.
    pub(crate) fn release_weights(&self) {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        c.by_buffer.clear();
        for s in &mut c.slots {
            (s.source, s.filled) = (None, false);
        }
        c.stats.registered = 0;
    }

    /// With `on` (the default unless the environment sets
    /// `MEGAMOE_CUDA_WEIGHT_COPIES=off` when the backend opens), [`crate::WeightCopies`]
    /// registrations make bf16 weight copies; off, they register nothing and every bf16
    /// operand is cast where it is used (the results are the same bits either way).
    pub fn set_weight_copies(&self, on: bool) {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        c.on = on;
    }

    /// The weight-copy counters of this GPU.
    pub fn weight_copy_stats(&self) -> WeightCopyStats {
        self.weights.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// Device addresses of the weight copies by slot (registration order; 0 where no
    /// copy was made yet): they stay put from step to step.
    pub fn weight_copy_addresses(&self) -> Vec<u64> {
        let c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        c.slots
            .iter()
            .map(
                |s| match s.copy.as_ref().map(|t| dev("weight_copy_addresses", t)) {
                    Some(Ok(d)) => d.ptr,
                    _ => 0,
                },
            )
            .collect()
    }

    /// `t` (f32) as bf16: a view of its registered weight's copy (filled on first use this
    /// epoch), or a fresh cast when `t` is not (inside) a registered weight.
    pub(crate) fn bf16_operand(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == DType::F32 && !t.is_write_through() {
            if let Some(copy) = self.cached_copy(t)? {
                return Ok(copy);
            }
        }
        crate::backend::HostTransfer::to_dtype(self, t, DType::BF16)
    }

    fn cached_copy(&self, t: &Tensor) -> Result<Option<Tensor>> {
        const OP: &str = "cast_weight";
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let WeightCache {
            slots,
            by_buffer,
            stats,
            ..
        } = &mut *c;
        let Some(on_buffer) = by_buffer.get(&t.buffer_id()) else {
            return Ok(None);
        };
        let (offset, numel) = (t.layout().offset(), t.numel());
        let Some(&i) = on_buffer.iter().find(|&&i| {
            let s = &slots[i];
            s.source.as_ref().is_some_and(BufferRef::is_alive)
                && s.offset <= offset
                && offset + numel <= s.offset + s.numel
        }) else {
            return Ok(None);
        };
        let s = &mut slots[i];
        if !s.filled {
            // A copy another handle still reads (another trainer's step on this GPU) is
            // left to it; this epoch's values go to a fresh buffer.
            if s.copy.as_mut().is_some_and(|c| !c.is_unique()) {
                s.copy = None;
            }
            let e = self.engine(OP)?;
            let copy = match &s.copy {
                Some(c) => c.clone(),
                None => self.empty(&e, [s.numel].into(), DType::BF16)?.0,
            };
            // The registered range starts (offset − s.offset) elements before `t`.
            let src = dev(OP, t)?.ptr - ((offset - s.offset) * DType::F32.size_in_bytes()) as u64;
            let dst = dev(OP, &copy)?;
            // SAFETY: the registered range (s.numel f32 from `src`) lies in `t`'s live buffer
            // (it is `s.source`, still alive); `copy` holds s.numel bf16.
            self.ck(OP, unsafe {
                e.tk.cast(&e.gpu, megamoe_cuda::tensor::Dev::f32(src), dst, s.numel)
            })?;
            s.copy = Some(copy);
            s.filled = true;
            stats.fills += 1;
        } else {
            stats.hits += 1;
        }
        match &s.copy {
            Some(copy) => Ok(Some(copy.view(offset - s.offset, t.shape().clone())?)),
            None => Ok(None),
        }
    }
}
