//! [`LocalDispatcher`]: one rank owns every expert; the exchanges are identities.

use std::ops::Range;

use megamoe_tensor::{Device, RowGroups, Tensor};

use super::{Assignments, BufferOrder, DispatchLayout, ExpertLayout, SourceRows, TokenDispatcher};
use crate::error::{Error, Result};

/// The variable choosing how a GPU lays out unpadded (dropless) expert rows: `packed`
/// (the default: sorted rows `[R, H]`, per-expert GEMMs on host group sizes) or `bucket`
/// (static-capacity buffers `[E·C, H]` with C the largest expert's kept rows rounded up
/// to a bucket: nothing dropped, one strided-batched GEMM per expert matrix).
pub const DROPLESS_LAYOUT_VAR: &str = "MEGAMOE_CUDA_DROPLESS";

/// Whether unpadded layers on a GPU use the bucketed capacity layout ([`DROPLESS_LAYOUT_VAR`],
/// read once per process; a bad value is a named error).
fn bucketed() -> Result<bool> {
    static MODE: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    MODE.get_or_init(|| match std::env::var(DROPLESS_LAYOUT_VAR) {
        Err(_) => Ok(false),
        Ok(v) => match v.as_str() {
            "" | "packed" => Ok(false),
            "bucket" => Ok(true),
            _ => Err(v),
        },
    })
    .clone()
    .map_err(|value| Error::Config {
        field: DROPLESS_LAYOUT_VAR,
        value,
        rule: "must be packed or bucket",
    })
}

/// Most buffer rows per kept row the bucketed layout may use (`E·C ≤ 5/4 · kept`, the
/// padding a capacity factor of 1.25 costs); a more skewed layer stays packed.
const BUCKET_WASTE: (usize, usize) = (5, 4);

/// A capacity that keeps every kept assignment: the largest expert's count (SYNC: one
/// read of the `[E]` counts) rounded up to a multiple of `2^(⌊log2 max⌋ − 4)` (at least
/// 8), at most 1/16 above it, so few distinct shapes; `None` when `E·C` rows would exceed
/// [`BUCKET_WASTE`] of the kept rows (skewed routing: the buffers would grow toward
/// `E × T·k` rows).
fn dropless_capacity(a: Assignments<'_>, e: usize) -> Result<Option<usize>> {
    let (n, k) = a.slots.dims2()?;
    // capacity n·k cannot drop anything: one count per expert, written on the device
    let counts = a
        .slots
        .capacity_permutation(a.keep, e, (n * k).max(1))?
        .counts
        .to_host_i32()?;
    let kept: usize = counts.iter().map(|&c| c.max(0) as usize).sum();
    let max = counts.iter().map(|&c| c.max(0) as usize).max().unwrap_or(0);
    let log2 = usize::BITS - 1 - max.max(1).leading_zeros();
    let q = 1usize << log2.saturating_sub(4).max(3);
    let cap = max.div_ceil(q).max(1) * q;
    Ok((e * cap * BUCKET_WASTE.1 <= kept * BUCKET_WASTE.0).then_some(cap))
}

/// Single-rank dispatcher: every expert is local.
#[derive(Debug, Clone, Copy)]
pub struct LocalDispatcher {
    /// E.
    pub num_routed_experts: usize,
}

impl LocalDispatcher {
    /// A dispatcher for a layer of `num_routed_experts` experts, all on this rank.
    pub fn new(num_routed_experts: usize) -> LocalDispatcher {
        LocalDispatcher { num_routed_experts }
    }
}

impl TokenDispatcher for LocalDispatcher {
    fn num_experts(&self) -> usize {
        self.num_routed_experts
    }

    fn local_experts(&self) -> Range<usize> {
        0..self.num_routed_experts
    }

    /// Unpadded layers on a GPU take the bucketed capacity layout when
    /// [`DROPLESS_LAYOUT_VAR`] asks for it (same kept rows and combine order; one counts
    /// read instead of the sort's and the grouped GEMMs').
    fn permute(
        &self,
        x: &Tensor,
        a: Assignments<'_>,
        pad_to: Option<usize>,
        fused: bool,
    ) -> Result<(Tensor, DispatchLayout)> {
        let e = self.num_routed_experts;
        let pad_to = match pad_to {
            None if x.device() != Device::Cpu && bucketed()? => dropless_capacity(a, e)?,
            p => p,
        };
        super::permute(x, a, e, pad_to, fused)
    }

    fn exchange_layout(&self, layout: &DispatchLayout) -> Result<ExpertLayout> {
        let e = layout.num_experts;
        // Static capacity: no host read (the grouped GEMM takes the counts as a device
        // tensor); the buffers' pad rows are zero (permute, combine backward, and the
        // expert bank keeps zero rows zero), which spares the GEMMs their masking passes.
        // Packed: a device backend's sort read the counts to size the rows; its GEMMs plan
        // from that copy (one counts read per layer), or read them here if there is none.
        let (groups, rows) = match &layout.rows {
            SourceRows::Capacity { capacity, .. } => (
                RowGroups::strided(&layout.counts, *capacity)?.with_zero_pad_rows(),
                e * capacity,
            ),
            SourceRows::Packed { token, .. } => {
                let groups = match &layout.host_counts {
                    Some(host) => RowGroups::packed_known(&layout.counts, host)?,
                    None => RowGroups::packed_read(&layout.counts)?,
                };
                (groups, token.numel())
            }
        };
        Ok(ExpertLayout {
            experts: 0..e,
            groups,
            counts: Some(layout.counts.clone()),
            send_rows: vec![rows],
            recv_rows: vec![rows],
            order: BufferOrder::Identity,
        })
    }

    fn dispatch_exchange(&self, rows: Tensor, _el: &ExpertLayout) -> Result<Tensor> {
        Ok(rows)
    }

    fn combine_exchange(&self, rows: Tensor, _el: &ExpertLayout) -> Result<Tensor> {
        Ok(rows)
    }
}
