//! [`LocalDispatcher`]: one rank owns every expert; the exchanges are identities.

use std::ops::Range;

use megamoe_tensor::{RowGroups, Tensor};

use super::{BufferOrder, DispatchLayout, ExpertLayout, SourceRows, TokenDispatcher};
use crate::error::Result;

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

    fn exchange_layout(&self, layout: &DispatchLayout) -> Result<ExpertLayout> {
        let e = layout.num_experts;
        // Static capacity: no host read (the grouped GEMM takes the counts as a device
        // tensor). Packed: a device backend reads the counts once here for its GEMMs.
        let (groups, rows) = match &layout.rows {
            SourceRows::Capacity { capacity, .. } => {
                (RowGroups::strided(&layout.counts, *capacity)?, e * capacity)
            }
            SourceRows::Packed { token, .. } => {
                (RowGroups::packed_read(&layout.counts)?, token.numel())
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
