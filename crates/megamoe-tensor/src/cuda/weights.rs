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
//!
//! Copies written by the optimizer: the flat AdamW launch ([`CudaBackend::segments_adamw`])
//! writes the bf16 copy of each updated weight that had a slot in the last registration
//! (same rounding as the cast), and the slot remembers the weight's
//! [write stamp](crate::Tensor) — its buffer's serial and count of in-place writes. The
//! next registration finds such a copy filled without casting when the weight is that
//! buffer with that stamp: a weight loaded from a checkpoint is another buffer, and any
//! in-place write through a tensor counts, so a changed weight misses and is cast again.
//! Every flat AdamW launch renews those marks (a weight it updates without a copy loses
//! its mark). A captured graph that read such copies keeps the list
//! ([`CudaBackend::written_weight_copies`]) and checks it before each replay
//! ([`CudaBackend::written_copies_hold`]).

use std::collections::HashMap;

use super::{dev, CudaBackend};
use crate::tensor::BufferRef;
use crate::{DType, Device, Result, Tensor};

/// A weight buffer's serial and count of in-place writes (`Tensor::write_stamp`).
type Stamp = (u64, u64);

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
    /// Serial of the buffer registered last (kept between steps).
    serial: u64,
    /// Slots whose copies share `copy`'s buffer (1, or the size of a joint group made by
    /// [`CudaBackend::bf16_joint`]): the handles on it when nobody else reads it.
    sharing: usize,
    /// The copy holds the weight with this stamp, written by the flat AdamW launch.
    written: Option<Stamp>,
}

/// Weight copies the flat AdamW launch writes: (slot, stamp of the weight, copy address).
pub(crate) type CopyMarks = Vec<(usize, Stamp, u64)>;

/// The weight copies one registration found written by the optimizer (a captured graph
/// reads them: [`CudaBackend::written_copies_hold`] before each replay).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenCopies(CopyMarks);

impl WrittenCopies {
    /// Number of copies.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the registration cast every weight itself.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The weight copies of one GPU (see the module doc).
#[derive(Debug)]
pub(crate) struct WeightCache {
    /// Registration is honoured ([`CudaBackend::set_weight_copies`]).
    on: bool,
    slots: Vec<Slot>,
    /// Buffer identity → slots registered on it.
    by_buffer: HashMap<usize, Vec<usize>>,
    /// Copies promised to the next table's AdamW launch, by copy address.
    pending: HashMap<u64, (usize, Stamp)>,
    /// The copies the latest registration found written.
    written: WrittenCopies,
    stats: WeightCopyStats,
}

impl Default for WeightCache {
    fn default() -> Self {
        WeightCache {
            // `MEGAMOE_CUDA_WEIGHT_COPIES=off` casts at every use (for A/B timing).
            on: std::env::var("MEGAMOE_CUDA_WEIGHT_COPIES").as_deref() != Ok("off"),
            slots: Vec::new(),
            by_buffer: HashMap::new(),
            pending: HashMap::new(),
            written: WrittenCopies::default(),
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
    /// Copies a registration found written by the flat AdamW launch (fills saved).
    pub written: u64,
    /// Stacked weights served as one joint copy ([`CudaBackend::bf16_joint`]).
    pub joint: u64,
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
            written,
            stats,
            ..
        } = &mut *c;
        by_buffer.clear();
        written.0.clear();
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
                    serial: 0,
                    written: None,
                    sharing: 1,
                });
            }
            let s = &mut slots[n];
            if s.numel != numel {
                (s.copy, s.sharing) = (None, 1);
            }
            let stamp = w.write_stamp();
            let copy = s
                .copy
                .as_ref()
                .and_then(|c| dev("register_weights", c).ok());
            let prefilled = match copy {
                Some(c) if s.offset == offset && s.written == Some(stamp) => {
                    written.0.push((n, stamp, c.ptr));
                    stats.written += 1;
                    true
                }
                _ => false,
            };
            if !prefilled {
                s.written = None;
            }
            (s.source, s.offset, s.numel, s.filled, s.serial) =
                (Some(w.buffer_ref()), offset, numel, prefilled, stamp.0);
            on_buffer.push(n);
            n += 1;
        }
        for s in &mut slots[n..] {
            (s.source, s.filled, s.written) = (None, false, None);
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

    /// The bf16 copy the flat AdamW launch may write for `param` (f32, about to be updated
    /// in place as it is): the address of its slot's copy when `param` is the whole weight
    /// registered last in that slot and nobody else holds the copy, else 0. The promise
    /// is kept by [`CudaBackend::optimizer_segments`].
    pub(crate) fn adamw_copy_for(&self, param: &Tensor) -> u64 {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let WeightCache {
            on, slots, pending, ..
        } = &mut *c;
        if !*on {
            return 0;
        }
        let stamp = param.write_stamp();
        let (offset, numel) = (param.layout().offset(), param.numel());
        let found = slots.iter_mut().enumerate().find(|(_, s)| {
            s.source.is_none() && s.serial == stamp.0 && s.offset == offset && s.numel == numel
        });
        let Some((i, s)) = found else {
            return 0;
        };
        if !s.copy_is_free() {
            return 0;
        }
        let Some(copy) = s.copy.as_mut() else {
            return 0;
        };
        match dev("adamw_copy_for", copy) {
            Ok(d) => {
                pending.insert(d.ptr, (i, stamp));
                d.ptr
            }
            Err(_) => 0,
        }
    }

    /// The marks of the copies promised at `copies` (addresses from
    /// [`CudaBackend::adamw_copy_for`]); forgets every other promise.
    pub(crate) fn take_copy_marks(&self, copies: impl Iterator<Item = u64>) -> CopyMarks {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let marks = copies
            .filter_map(|ptr| c.pending.get(&ptr).map(|&(i, st)| (i, st, ptr)))
            .collect();
        c.pending.clear();
        marks
    }

    /// After a flat AdamW launch: exactly the copies in `marks` hold their weights (the
    /// launch updated every other registered weight without its copy).
    pub(crate) fn mark_copies_written(&self, marks: &CopyMarks) {
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        for s in &mut c.slots {
            s.written = None;
        }
        for &(i, stamp, ptr) in marks {
            let s = &mut c.slots[i];
            let at = s
                .copy
                .as_ref()
                .and_then(|t| dev("mark_copies_written", t).ok());
            if at.is_some_and(|d| d.ptr == ptr) {
                s.written = Some(stamp);
            }
        }
    }

    /// The copies the latest registration found written by the optimizer (none were cast
    /// in that step); a graph captured in that step reads them.
    pub fn written_weight_copies(&self) -> WrittenCopies {
        let c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        c.written.clone()
    }

    /// True while every copy in `copies` still holds its weight: the optimizer's last
    /// launch wrote it (same slot, same address) and the weight among `weights` with that
    /// buffer has not been written in place since. A graph that read them replays only
    /// then.
    pub fn written_copies_hold(&self, copies: &WrittenCopies, weights: &[Tensor]) -> bool {
        let stamps: HashMap<u64, u64> = weights.iter().map(|w| w.write_stamp()).collect();
        let c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        copies.0.iter().all(|&(i, stamp, ptr)| {
            let Some(s) = c.slots.get(i) else {
                return false;
            };
            let at = s
                .copy
                .as_ref()
                .and_then(|t| dev("written_copies_hold", t).ok());
            s.written == Some(stamp)
                && at.is_some_and(|d| d.ptr == ptr)
                && stamps.get(&stamp.0) == Some(&stamp.1)
        })
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
            if s.copy.is_some() && !s.copy_is_free() {
                (s.copy, s.sharing) = (None, 1);
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

/// The copies of `group` as one `[Σ rows, k]` view when they lie back to back in one buffer.
fn joint_copy(group: &[Slot], k: usize) -> Option<Tensor> {
    let parts = group
        .iter()
        .map(|s| s.copy.as_ref())
        .collect::<Option<Vec<&Tensor>>>()?;
    let rows = group.iter().map(|s| s.numel / k).sum::<usize>();
    Tensor::joined(&parts, [rows, k])
}

impl Slot {
    /// True when only the slots sharing the copy's buffer hold it (nobody reads it).
    fn copy_is_free(&self) -> bool {
        self.copy
            .as_ref()
            .is_some_and(|c| c.handle_count() == self.sharing)
    }
}

impl CudaBackend {
    /// The bf16 copies of `ws` as ONE `[Σ rows_i, K]` tensor, for a GEMM over the stacked
    /// weights (megamoe-tensor's `matmul_stacked`): `ws` must be whole registered weights
    /// `[rows_i, K]`, registered one right after the other (a layer's q, k, v projections
    /// in visit order). Their copies are then laid out back to back in one buffer — made so
    /// on the first call, kept from step to step (same addresses; the flat AdamW launch
    /// writes them as any copy) — and filled as [`CudaBackend::bf16_operand`] fills a
    /// copy (the same cast, the same bits). `None` where `ws` are not such weights: the
    /// caller multiplies them one by one.
    pub(crate) fn bf16_joint(&self, ws: &[&Tensor]) -> Result<Option<Tensor>> {
        const OP: &str = "cast_weight";
        let Some(k) = ws.first().and_then(|w| w.dims().get(1).copied()) else {
            return Ok(None);
        };
        let plain = |w: &&Tensor| {
            w.dtype() == DType::F32 && !w.is_write_through() && w.rank() == 2 && w.dims()[1] == k
        };
        if !ws.iter().all(plain) {
            return Ok(None);
        }
        let mut c = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let WeightCache {
            on,
            slots,
            by_buffer,
            stats,
            ..
        } = &mut *c;
        if !*on {
            return Ok(None);
        }
        // The slot holding each weight whole; they must follow each other.
        let mut first = None;
        for (j, w) in ws.iter().enumerate() {
            let (offset, numel) = (w.layout().offset(), w.numel());
            let found = by_buffer.get(&w.buffer_id()).and_then(|on_buffer| {
                on_buffer.iter().copied().find(|&i| {
                    let s = &slots[i];
                    s.source.as_ref().is_some_and(BufferRef::is_alive)
                        && s.offset == offset
                        && s.numel == numel
                })
            });
            match (found, first) {
                (Some(i), None) if j == 0 => first = Some(i),
                (Some(i), Some(f)) if i == f + j => {}
                _ => return Ok(None),
            }
        }
        let Some(first) = first else {
            return Ok(None);
        };
        let group = first..first + ws.len();
        let unfilled = slots[group.clone()].iter().any(|s| !s.filled);
        let free = slots[group.clone()]
            .iter()
            .all(|s| s.sharing == ws.len() && s.copy_is_free());
        if joint_copy(&slots[group.clone()], k).is_none() || (unfilled && !free) {
            // One buffer for the group (a copy another handle still reads is left to it).
            let total: usize = slots[group.clone()].iter().map(|s| s.numel).sum();
            let e = self.engine(OP)?;
            let buf = self.empty(&e, [total].into(), DType::BF16)?.0;
            drop(e);
            let mut at = 0;
            for s in &mut slots[group.clone()] {
                s.copy = Some(buf.view(at, [s.numel])?);
                (s.filled, s.written, s.sharing) = (false, None, ws.len());
                at += s.numel;
            }
        }
        let e = self.engine(OP)?;
        for (s, w) in slots[group.clone()].iter_mut().zip(ws) {
            if s.filled {
                stats.hits += 1;
                continue;
            }
            let Some(copy) = s.copy.as_ref() else {
                return Ok(None);
            };
            let (src, dst) = (dev(OP, w)?, dev(OP, copy)?);
            // SAFETY: `w` is the whole registered weight (s.numel f32, alive: it is borrowed);
            // `copy` views s.numel bf16 of the group's buffer.
            self.ck(OP, unsafe {
                e.tk.cast(
                    &e.gpu,
                    megamoe_cuda::tensor::Dev::f32(src.ptr),
                    dst,
                    s.numel,
                )
            })?;
            s.filled = true;
            stats.fills += 1;
        }
        drop(e);
        let joint = joint_copy(&slots[group], k);
        if joint.is_some() {
            stats.joint += 1;
        }
        Ok(joint)
    }
}
