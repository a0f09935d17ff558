//! Deferred zeroing of write-through buffers: a model's flat gradient buffer is not filled
//! with zeros at the start of a step; its ranges are *deferred* instead
//! ([`Tensor::defer_zero`]), and a deferred range stands for zeros until it is written:
//! - the first accumulating GEMM into exactly one deferred range (`matmul_acc`,
//!   `grouped_matmul_wgrad_acc`) overwrites it (beta 0: the product, without reading the
//!   stale elements) and the range is written from then on;
//! - any other in-place write that touches a deferred range (an `add_assign`, a narrow
//!   view, a fill) first zeroes the deferred ranges it touches, then writes as usual;
//! - a read of a deferred range is an error ([`Error::InvalidArgument`], rule
//!   [`READ_DEFERRED`]), on every backend alike: whoever reads the buffer settles it first
//!   ([`Tensor::settle_deferred`], which zeroes what is still deferred, one fill per run
//!   of adjacent ranges).
//!
//! So the values are those of zeroing first and accumulating (`0 + x` is `x`, except that
//! `0 + (-0)` is `+0` where the overwrite keeps `-0`), and the zeros that are overwritten
//! anyway are never written. The host logic depends only on the order of the ops, so a
//! captured CUDA graph replays the same launches every step.
//!
//! Kernels that take a buffer's address once and write or read it later (the flat
//! optimizer's segment table) see stale elements: settle the buffer before them.

use std::ops::Range;

use super::{Layout, Tensor};
use crate::{Error, Result, Shape};

/// The rule of the error of a read of a deferred range.
pub const READ_DEFERRED: &str =
    "no read of elements whose zeroing is deferred: settle the buffer first (Tensor::settle_deferred)";

impl Tensor {
    /// Defers the zeroing of the element ranges `ranges` of this write-through buffer (buffer
    /// element indices, whatever view `self` is): see the module doc. Ranges already deferred
    /// may be given again; others must not overlap them or each other, nor leave the buffer.
    pub fn defer_zero(&self, ranges: impl IntoIterator<Item = Range<usize>>) -> Result<()> {
        const OP: &str = "defer_zero";
        if !self.is_write_through() {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "self",
                value: format!("{:?} {:?}", self.dtype(), self.dims()),
                rule: "only a write-through buffer defers its zeroing",
            });
        }
        let len = self.buffer.storage.len();
        let mut list = self.deferred_list();
        let mut all: Vec<Range<usize>> = list.iter().cloned().collect();
        all.extend(ranges.into_iter().filter(|r| !r.is_empty()));
        all.sort_by_key(|r| (r.start, r.end));
        all.dedup();
        for (i, r) in all.iter().enumerate() {
            let overlaps = all.get(i + 1).is_some_and(|next| next.start < r.end);
            if r.end > len || overlaps {
                return Err(Error::InvalidArgument {
                    op: OP,
                    arg: "ranges",
                    value: format!("{r:?} of a buffer of {len} elements"),
                    rule: "inside the buffer, disjoint from every other deferred range",
                });
            }
        }
        *list = all;
        Ok(())
    }

    /// Elements of this tensor whose zeroing is still deferred.
    pub fn deferred_elems(&self) -> usize {
        if !self.is_write_through() {
            return 0;
        }
        let r = self.layout.range();
        self.deferred_list()
            .iter()
            .map(|d| d.end.min(r.end).saturating_sub(d.start.max(r.start)))
            .sum()
    }

    /// Zeroes every deferred range that overlaps this tensor's elements (whole ranges, one
    /// fill per run of adjacent ones) and ends their deferral. Nothing to do on a buffer that
    /// is not write-through or has nothing deferred there.
    pub fn settle_deferred(&self) -> Result<()> {
        if !self.is_write_through() {
            return Ok(());
        }
        let r = self.layout.range();
        let taken: Vec<Range<usize>> = {
            let mut list = self.deferred_list();
            if list.is_empty() {
                return Ok(());
            }
            let touches = |d: &Range<usize>| d.start < r.end && r.start < d.end;
            let taken = list.iter().filter(|d| touches(d)).cloned().collect();
            list.retain(|d| !touches(d));
            taken
        };
        let mut runs: Vec<Range<usize>> = Vec::new();
        for d in taken {
            match runs.last_mut() {
                Some(run) if run.end == d.start => run.end = d.end,
                _ => runs.push(d),
            }
        }
        for run in runs {
            let mut v = Tensor {
                buffer: self.buffer.clone(),
                layout: Layout {
                    shape: Shape::from(vec![run.len()]),
                    offset: run.start,
                },
            };
            v.fill_in_place(0.0)?;
        }
        Ok(())
    }

    /// True (and the ranges are no longer deferred) if this tensor's elements are exactly
    /// one deferred range or a run of adjacent ones (a [`Tensor::joined`] view of several
    /// gradients): the caller overwrites all of them now.
    pub(crate) fn take_deferred(&self) -> bool {
        if !self.is_write_through() {
            return false;
        }
        let r = self.layout.range();
        if r.is_empty() {
            return false;
        }
        let mut list = self.deferred_list();
        let Ok(first) = list.binary_search_by_key(&r.start, |d| d.start) else {
            return false;
        };
        let mut end = r.start;
        let mut last = first;
        while last < list.len() && list[last].start == end && list[last].end <= r.end {
            end = list[last].end;
            last += 1;
        }
        if end != r.end {
            return false;
        }
        list.drain(first..last);
        true
    }

    /// An error (named `op`) if this tensor's elements touch a deferred range.
    pub(crate) fn check_not_deferred(&self, op: &'static str) -> Result<()> {
        match self.deferred_elems() {
            0 => Ok(()),
            n => Err(Error::InvalidArgument {
                op,
                arg: "tensor",
                value: format!(
                    "elements {:?} of a write-through buffer, {n} of them deferred zeros",
                    self.layout.range()
                ),
                rule: READ_DEFERRED,
            }),
        }
    }

    fn deferred_list(&self) -> std::sync::MutexGuard<'_, Vec<Range<usize>>> {
        self.buffer
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
