//! Attention on the CPU: the unfused `bmm` + causal softmax + `bmm` (the probabilities are
//! the saved state), bit for bit the model's earlier sequence of ops.

use crate::backend::CpuBackend;
use crate::ops::attention::{unfused_backward, unfused_forward, AttentionKernels};
use crate::{Result, Tensor};

impl AttentionKernels for CpuBackend {
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        unfused_forward(q, k, v, scale)
    }

    fn causal_attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        unfused_backward(q, k, v, saved, d_o, scale)
    }
}
