//! The per-layer gradient hook of data-parallel training: a [`GradReady`] installed with
//! [`Model::set_grad_ready`] hears, during the backward, that a block's weight gradients
//! of the micro-batch are complete (right after the block's weight half), so a
//! data-parallel trainer can start reducing them while the backward goes on with the
//! blocks before it.

use std::sync::Arc;

use crate::block::BlockParams;
use crate::error::Result;
use crate::model::Model;

/// Told when backward has finished a block's weight gradients.
pub trait GradReady: Send + Sync + std::fmt::Debug {
    /// Block `layer`'s weight gradients (accumulated in `grads`) are complete for this
    /// micro-batch.
    fn block_grads_done(&self, layer: usize, grads: &BlockParams) -> Result<()>;
}

impl Model {
    /// Installs `hook` (see the module docs); `None` removes it.
    pub fn set_grad_ready(&mut self, hook: Option<Arc<dyn GradReady>>) {
        self.grad_ready = hook;
    }

    /// Tells the hook, if any, that block `layer`'s gradients are complete.
    pub(crate) fn block_grads_done(&self, layer: usize, grads: &BlockParams) -> Result<()> {
        match &self.grad_ready {
            Some(h) => h.block_grads_done(layer, grads),
            None => Ok(()),
        }
    }
}
