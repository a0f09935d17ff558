//! Activation offload of one block's saved state (`train.offload`): after the block's
//! forward its saved activations of the configured targets move to pinned host memory
//! ([`megamoe_tensor::Tensor::park`]: a copy stream, events, no host synchronisation); the
//! backward of the block above starts copying them back ([`ParkedBlock::prefetch`]) and
//! the block's own backward puts them back in place ([`ParkedBlock::restore`]). The bytes
//! come back unchanged, so losses and gradients are bit-identical to a run without
//! offload. A tensor whose buffer another handle shares stays on the device (nothing
//! would be freed).

use megamoe_plan::OffloadTargets;
use megamoe_tensor::{FetchedTensor, ParkedTensor};

use crate::block::BlockSaved;
use crate::error::{Error, Result};

/// One visited tensor of a block's saved state.
#[derive(Debug)]
enum Slot {
    /// Left on the device.
    Kept,
    /// In host memory.
    Host(ParkedTensor),
    /// Coming back (the host copy is held until the block is restored).
    Coming(FetchedTensor),
}

/// A block's parked activations, in the order [`BlockSaved::visit_offload`] visits them.
#[derive(Debug)]
pub(crate) struct ParkedBlock {
    slots: Vec<Slot>,
}

impl ParkedBlock {
    /// Parks the activations of `targets` in `saved` (each replaced by a placeholder).
    pub(crate) fn park(saved: &mut BlockSaved, targets: OffloadTargets) -> Result<ParkedBlock> {
        let mut slots = Vec::new();
        saved.visit_offload(targets, &mut |t| {
            slots.push(match t.park()? {
                Some(p) => Slot::Host(p),
                None => Slot::Kept,
            });
            Ok(())
        })?;
        Ok(ParkedBlock { slots })
    }

    /// Queues the copies back to the device.
    pub(crate) fn prefetch(&mut self) -> Result<()> {
        for slot in &mut self.slots {
            if let Slot::Host(p) = slot {
                *slot = Slot::Coming(p.fetch()?);
            }
        }
        Ok(())
    }

    /// Puts every parked activation back into `saved` (fetching what was not prefetched).
    pub(crate) fn restore(mut self, saved: &mut BlockSaved, targets: OffloadTargets) -> Result<()> {
        self.prefetch()?;
        let mut slots = self.slots.into_iter();
        let mut missing = false;
        saved.visit_offload(targets, &mut |t| {
            match slots.next() {
                Some(Slot::Coming(f)) => *t = f.ready()?,
                Some(_) => {}
                None => missing = true,
            }
            Ok(())
        })?;
        if missing || slots.next().is_some() {
            return Err(Error::SavedMismatch {
                layer: "offload",
                rule: "the parked activations must be restored into the block they came from",
            });
        }
        Ok(())
    }
}
