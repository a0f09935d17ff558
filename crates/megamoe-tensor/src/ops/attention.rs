//! Causal scaled-dot-product attention over heads: `o = softmax(scale · q kᵀ, causal) · v`
//! for `q, k, v [BH, T, D]` (keys and values already repeated to the query heads), and its
//! backward. One op, so a backend can fuse it (the CUDA backend's tensor-core kernel keeps
//! no `[T, T]` matrix in memory); the CPU backend runs it as `bmm` + causal softmax +
//! `bmm`, exactly the ops the model used before, with the same bits.

use crate::{Error, Result, Tensor};

/// The attention kernel family of a [`Backend`](crate::backend::Backend).
pub trait AttentionKernels {
    /// `(o [BH, T, D], saved)`: the output and what the backward needs besides q, k, v
    /// and o — backend-specific (the probabilities `[BH, T, T]` on the CPU, the per-row
    /// log-sum-exp `[BH, T]` in a fused kernel). Pass it back unchanged.
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)>;
    /// `(dq, dk, dv)`, each `[BH, T, D]`, from the forward's inputs, output, saved state
    /// and `d_o [BH, T, D]`.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)>;
}

/// Checks `q, k, v` (and more) are `[BH, T, D]` of one shape on one device.
fn check(op: &'static str, q: &Tensor, rest: &[&Tensor]) -> Result<()> {
    q.expect_rank(op, "q", 3)?;
    for t in rest {
        q.same_device(op, t)?;
        if t.dims() != q.dims() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: q.dims().to_vec(),
                rhs: t.dims().to_vec(),
                rule: "q, k, v, o and d_o must all be [B·heads, T, head_dim]",
            });
        }
    }
    Ok(())
}

impl Tensor {
    /// Causal attention of `q` over `k`, `v` (all `[BH, T, D]`): `(o [BH, T, D], saved)`,
    /// `o[b, t] = Σ_{s ≤ t} softmax_s(scale · q[b, t]·k[b, s]) v[b, s]`. `saved` is for
    /// [`Tensor::causal_attention_backward`] only.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        check("causal_attention", q, &[k, v])?;
        q.backend().causal_attention(q, k, v, scale)
    }

    /// Backward of [`Tensor::causal_attention`]: `(dq, dk, dv)` from its inputs, output
    /// `o`, `saved` and the output gradient `d_o`.
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "causal_attention_backward";
        check(OP, q, &[k, v, o, d_o])?;
        q.same_device(OP, saved)?;
        q.backend()
            .causal_attention_backward(q, k, v, o, saved, d_o, scale)
    }
}

/// The unfused attention (any backend's ops): `bmm`, causal softmax, `bmm`; `saved` is
/// the probabilities `[BH, T, T]`.
pub(crate) fn unfused_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let p = q.bmm(k, false, true)?.causal_softmax(scale)?;
    let o = p.bmm(v, false, false)?;
    Ok((o, p))
}

/// Backward of [`unfused_forward`] from the probabilities `p`.
pub(crate) fn unfused_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d_p = d_o.bmm(v, false, true)?;
    let d_v = p.bmm(d_o, true, false)?;
    let d_s = p.causal_softmax_backward(&d_p, scale)?;
    let d_q = d_s.bmm(k, false, false)?;
    let d_k = d_s.bmm(q, true, false)?;
    Ok((d_q, d_k, d_v))
}
