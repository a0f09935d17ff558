//! [`ExpertParallelDispatcher`]: the E experts are split evenly over the P ranks of an
//! expert-parallel group (rank p owns experts `[p·E/P, (p+1)·E/P)`); token rows travel by
//! all-to-all (spec "Dispatch", expert parallel; Megatron `MoEAlltoAllTokenDispatcher`).
//!
//! Packed mode: (1) counts exchange — an all-to-all of each rank's `[E]` kept counts with
//! fixed splits of E/P, then ONE host read of (own counts, received counts) to size the
//! payload; (2) `all_to_all_v` of the rows; (3) received rows, source-major, are gathered
//! expert-major. Static-capacity mode: every (source, expert) block is C rows, so the splits
//! are fixed (`E/P · C` rows per rank), there is no counts exchange and no host read, and
//! the reorder is a block transpose `[P, El, C, H] → [El, P, C, H]`.
//!
//! Static-capacity mode assumes every rank of the group has the same tokens per call (the
//! plan's fixed micro-batch size), hence the same C; a mismatch fails in the exchange.
//!
//! The collective itself is a [`RowExchange`], the one operation expert parallelism needs
//! from a communicator; the backward runs the same two exchanges in the other direction.
//! Every [`Communicator`] of the expert-parallel group is one, held as
//! `Arc<dyn Communicator>` (or `Arc` of a concrete engine): its `all_to_all_v`, with
//! communicator errors (a failed peer, a timeout) surfacing as [`Error::Exchange`].

use std::ops::Range;
use std::sync::Arc;

use megamoe_comm::Communicator;
use megamoe_tensor::{RowGroups, Tensor};

use super::{BufferOrder, DispatchLayout, ExpertLayout, SourceRows, TokenDispatcher};
use crate::error::{Error, Result};

/// An all-to-all of rows with per-rank splits over the ranks of an expert-parallel group —
/// what a communicator provides as `all_to_all_v`.
pub trait RowExchange: Send + Sync {
    /// This rank's index in the group, `0..world`.
    fn rank(&self) -> usize;

    /// P: ranks in the group.
    fn world(&self) -> usize;

    /// Collective (every rank calls it, with matching splits): the `p`-th consecutive block
    /// of `send_rows[p]` rows (dim 0) of `send` goes to rank `p`; returns the blocks received
    /// from every rank concatenated in rank order, `[Σ recv_rows, ..]`, same dtype.
    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor>;
}

/// The expert-parallel group's communicator is the exchange: rank and size are the
/// group's, the rows move by [`Communicator::all_to_all_v`].
impl<C: Communicator + ?Sized> RowExchange for Arc<C> {
    fn rank(&self) -> usize {
        Communicator::rank(&**self)
    }

    fn world(&self) -> usize {
        self.size()
    }

    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor> {
        Communicator::all_to_all_v(&**self, send, send_rows, recv_rows)
            .map_err(|e| Error::Exchange(Box::new(e)))
    }
}

/// Experts sharded evenly over the ranks of a [`RowExchange`].
pub struct ExpertParallelDispatcher<X: RowExchange> {
    exchange: X,
    num_experts: usize,
}

impl<X: RowExchange> std::fmt::Debug for ExpertParallelDispatcher<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertParallelDispatcher")
            .field("rank", &self.exchange.rank())
            .field("world", &self.exchange.world())
            .field("num_experts", &self.num_experts)
            .finish()
    }
}

impl<X: RowExchange> ExpertParallelDispatcher<X> {
    /// `num_experts` experts over the ranks of `exchange` (E must be a multiple of P).
    pub fn new(exchange: X, num_experts: usize) -> Result<Self> {
        let p = exchange.world();
        if p == 0 || num_experts == 0 || !num_experts.is_multiple_of(p) {
            return Err(Error::Config {
                field: "moe.routed_experts",
                value: format!("{num_experts} over {p} expert-parallel ranks"),
                rule: "must be a positive multiple of the expert-parallel size",
            });
        }
        if exchange.rank() >= p {
            return Err(Error::Config {
                field: "parallel.ep",
                value: format!("rank {} of {p}", exchange.rank()),
                rule: "rank must be < the expert-parallel size",
            });
        }
        Ok(ExpertParallelDispatcher {
            exchange,
            num_experts,
        })
    }

    /// El: experts per rank.
    fn per_rank(&self) -> usize {
        self.num_experts / self.exchange.world()
    }
}

impl<X: RowExchange> TokenDispatcher for ExpertParallelDispatcher<X> {
    fn num_experts(&self) -> usize {
        self.num_experts
    }

    fn local_experts(&self) -> Range<usize> {
        let el = self.per_rank();
        let r = self.exchange.rank();
        r * el..(r + 1) * el
    }

    fn exchange_layout(&self, layout: &DispatchLayout) -> Result<ExpertLayout> {
        let (p, el) = (self.exchange.world(), self.per_rank());
        if layout.num_experts != self.num_experts {
            return Err(Error::ParamShape {
                what: "dispatch layout experts",
                expected: vec![self.num_experts],
                got: vec![layout.num_experts],
            });
        }
        let experts = self.local_experts();
        if let SourceRows::Capacity { capacity: c, .. } = layout.rows {
            return Ok(ExpertLayout {
                experts,
                groups: RowGroups::from_sizes(&vec![p * c; el], layout.counts.device())?,
                counts: None,
                send_rows: vec![el * c; p],
                recv_rows: vec![el * c; p],
                order: if p == 1 {
                    BufferOrder::Identity
                } else {
                    BufferOrder::Blocks {
                        sources: p,
                        experts: el,
                        capacity: c,
                    }
                },
            });
        }
        // Counts exchange: received [P·El] = counts of my experts from each source rank.
        let recv = self
            .exchange
            .all_to_all_v(&layout.counts, &vec![el; p], &vec![el; p])?;
        // SYNC: one read of (own [E], received [P·El]) counts per call sizes the payload
        // all-to-all (packed mode only).
        let host = Tensor::cat(&[&layout.counts, &recv], 0)?.to_host_i32()?;
        let (own, got) = host.split_at(self.num_experts);
        let own: Vec<usize> = own.iter().map(|&c| c as usize).collect();
        let got: Vec<usize> = got.iter().map(|&c| c as usize).collect();
        let send_rows = (0..p)
            .map(|q| own[q * el..(q + 1) * el].iter().sum())
            .collect();
        let recv_rows = (0..p)
            .map(|q| got[q * el..(q + 1) * el].iter().sum())
            .collect();
        let group_sizes: Vec<usize> = (0..el)
            .map(|e| (0..p).map(|q| got[q * el + e]).sum())
            .collect();
        // Received rows are (source, expert)-major; buffers are (expert, source)-major.
        let mut start = vec![0usize; p * el];
        let mut acc = 0;
        for (s, &n) in start.iter_mut().zip(&got) {
            *s = acc;
            acc += n;
        }
        let mut to_experts = Vec::with_capacity(acc);
        for e in 0..el {
            for q in 0..p {
                let s = start[q * el + e];
                to_experts.extend((s..s + got[q * el + e]).map(|i| i as i32));
            }
        }
        let mut to_sources = vec![0i32; acc];
        for (b, &r) in to_experts.iter().enumerate() {
            to_sources[r as usize] = b as i32;
        }
        let device = layout.counts.device();
        let order = if p == 1 {
            BufferOrder::Identity
        } else {
            BufferOrder::Gather {
                to_experts: Tensor::from_vec_i32(to_experts, [acc], device)?,
                to_sources: Tensor::from_vec_i32(to_sources, [acc], device)?,
            }
        };
        let counts = group_sizes.iter().map(|&c| c as i32).collect();
        let counts = Tensor::from_vec_i32(counts, [el], device)?;
        Ok(ExpertLayout {
            experts,
            groups: RowGroups::packed(&counts)?,
            counts: Some(counts),
            send_rows,
            recv_rows,
            order,
        })
    }

    fn dispatch_exchange(&self, rows: Tensor, el: &ExpertLayout) -> Result<Tensor> {
        self.exchange
            .all_to_all_v(&rows, &el.send_rows, &el.recv_rows)
    }

    fn combine_exchange(&self, rows: Tensor, el: &ExpertLayout) -> Result<Tensor> {
        self.exchange
            .all_to_all_v(&rows, &el.recv_rows, &el.send_rows)
    }
}
