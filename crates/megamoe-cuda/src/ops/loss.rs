//! Softmax cross-entropy over the vocabulary, and the token embedding (gather forward,
//! deterministic scatter-add backward).

use super::{int, need, positive, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::Result;
use crate::pool::DeviceMem;

/// 16-byte vectors per thread of the register-resident cross-entropy (`CE_K` in kernels.cu).
const CE_K: usize = 16;

impl Ops {
    /// Mean cross-entropy of `logits [n, v]` (storage type) against `targets [n]` (i32),
    /// rows whose target is `ignore_index` left out: `loss [1]` (f32) `= (1/n_valid)
    /// Σ (lse(x) − x[t])` and `d_logits = (softmax(x) − onehot(t)) / n_valid` (0 on ignored
    /// rows; 0 and loss 0 when no row is valid). `d_logits` may be `logits` (in place: no
    /// copy of `[n, v]` beyond the logits). The count of valid rows is taken on the device.
    /// A target outside `0..v` makes its row's loss and gradient NaN and, when `err` (a
    /// four-i32 device error record, 0 for none) is given, writes it (code 11, the target,
    /// its row, `v`; see `tensor::RouteError`) for the caller's next synchronising read.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy(
        &self,
        gpu: &Gpu,
        logits: &impl DeviceMem,
        targets: &impl DeviceMem,
        d_logits: &impl DeviceMem,
        loss: &impl DeviceMem,
        (n, v): (usize, usize),
        ignore_index: i32,
        err: u64,
    ) -> Result<()> {
        positive("cross_entropy rows", n)?;
        positive("cross_entropy vocab", v)?;
        let es = self.elem.size();
        need("cross_entropy logits", logits, n * v, es)?;
        need("cross_entropy d_logits", d_logits, n * v, es)?;
        need("cross_entropy targets", targets, n, 4)?;
        need("cross_entropy loss", loss, 1, 4)?;
        let scratch = gpu.alloc(n * 4 + 4)?;
        let n_valid = scratch.ptr() + (n * 4) as u64;
        let (ni, vi) = (
            int("cross_entropy rows", n)?,
            int("cross_entropy vocab", v)?,
        );
        // The register-resident kernel: rows of whole 16-byte vectors, at most CE_K (16) per
        // thread (v ≤ 32768 bf16 / 16384 f32), 16-byte aligned.
        let width = 16 / es;
        let vec = v.is_multiple_of(width)
            && v <= CE_K * BLOCK as usize * width
            && [logits.ptr(), d_logits.ptr()]
                .iter()
                .all(|p| p.is_multiple_of(16));
        unsafe {
            gpu.launch(
                self.k.ce_count_valid,
                1,
                BLOCK,
                &mut [
                    arg(&targets.ptr()),
                    arg(&ni),
                    arg(&ignore_index),
                    arg(&n_valid),
                ],
            )?;
            gpu.launch(
                if vec {
                    self.k.ce_fwd_bwd_vec
                } else {
                    self.k.ce_fwd_bwd
                },
                ni as u32,
                BLOCK,
                &mut [
                    arg(&logits.ptr()),
                    arg(&d_logits.ptr()),
                    arg(&targets.ptr()),
                    arg(&n_valid),
                    arg(&scratch.ptr()),
                    arg(&vi),
                    arg(&ignore_index),
                    arg(&err),
                ],
            )?;
            gpu.launch(
                self.k.ce_mean,
                1,
                BLOCK,
                &mut [
                    arg(&scratch.ptr()),
                    arg(&n_valid),
                    arg(&ni),
                    arg(&loss.ptr()),
                ],
            )
        }
    }

    /// Embedding lookup: `out[r] = table[ids[r]]` for `table [rows, h]`, `ids [n]` (i32),
    /// storage type. An id outside `0..rows` gives a NaN row (ids are checked on the host).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        &self,
        gpu: &Gpu,
        table: &impl DeviceMem,
        ids: &impl DeviceMem,
        out: &impl DeviceMem,
        (n, rows, h): (usize, usize, usize),
    ) -> Result<()> {
        positive("embedding ids", n)?;
        positive("embedding rows", rows)?;
        positive("embedding h", h)?;
        let es = self.elem.size();
        need("embedding table", table, rows * h, es)?;
        need("embedding ids", ids, n, 4)?;
        need("embedding out", out, n * h, es)?;
        let (ni, hi, ri) = (
            int("embedding ids", n)?,
            int("embedding h", h)?,
            int("embedding rows", rows)?,
        );
        unsafe {
            gpu.launch(
                self.k.embed_gather,
                ni as u32,
                BLOCK,
                &mut [
                    arg(&table.ptr()),
                    arg(&ids.ptr()),
                    arg(&out.ptr()),
                    arg(&ni),
                    arg(&hi),
                    arg(&ri),
                ],
            )
        }
    }

    /// Embedding backward: `d_table[ids[r]] += d_out[r]` (`d_table [rows, h]` f32, `d_out`
    /// storage type), each table row adding its sources in increasing `r` (a counting sort
    /// on the device, no float atomics: deterministic). Without `accumulate`, `d_table` is
    /// written fresh (rows with no source become 0).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_backward(
        &self,
        gpu: &Gpu,
        d_out: &impl DeviceMem,
        ids: &impl DeviceMem,
        d_table: &impl DeviceMem,
        (n, rows, h): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        positive("embedding ids", n)?;
        positive("embedding rows", rows)?;
        positive("embedding h", h)?;
        need("embedding d_out", d_out, n * h, self.elem.size())?;
        need("embedding ids", ids, n, 4)?;
        need("embedding d_table", d_table, rows * h, 4)?;
        let (ni, hi, ri) = (
            int("embedding ids", n)?,
            int("embedding h", h)?,
            int("embedding rows", rows)?,
        );
        // scratch: rank [n], order [n], offset [rows]; count [rows] zeroed on its own
        let scratch = gpu.alloc((2 * n + rows) * 4)?;
        let counts = gpu.alloc(rows * 4)?;
        gpu.memset(&counts, 0)?;
        let rank = scratch.ptr();
        let order = rank + (n * 4) as u64;
        let offset = order + (n * 4) as u64;
        let count = counts.ptr();
        let acc = i32::from(accumulate);
        let blocks = n.div_ceil(BLOCK as usize) as u32;
        unsafe {
            gpu.launch(
                self.k.embed_rank,
                blocks,
                BLOCK,
                &mut [arg(&ids.ptr()), arg(&rank), arg(&count), arg(&ni), arg(&ri)],
            )?;
            gpu.launch(
                self.k.exclusive_scan,
                1,
                BLOCK,
                &mut [arg(&count), arg(&offset), arg(&ri)],
            )?;
            gpu.launch(
                self.k.embed_place,
                blocks,
                BLOCK,
                &mut [
                    arg(&ids.ptr()),
                    arg(&rank),
                    arg(&offset),
                    arg(&order),
                    arg(&ni),
                    arg(&ri),
                ],
            )?;
            gpu.launch(
                self.k.embed_scatter_add,
                ri as u32,
                BLOCK,
                &mut [
                    arg(&d_out.ptr()),
                    arg(&order),
                    arg(&offset),
                    arg(&count),
                    arg(&d_table.ptr()),
                    arg(&hi),
                    arg(&acc),
                ],
            )
        }
    }
}
