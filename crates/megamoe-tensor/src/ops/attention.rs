//! Causal scaled-dot-product attention over heads: `o = softmax(scale · q kᵀ, causal) · v`
//! for `q [BH, T, D]` and `k, v [BH / G, T, D]` (grouped-query attention: query row `r`
//! reads key/value row `r / G`, which is query head `h` of a sequence reading KV head
//! `h / G` in the heads-major layout; `G = 1` is plain multi-head), and its backward. One op, so a backend can fuse it (the CUDA backend's tensor-core kernel keeps
//! no `[T, T]` matrix in memory); the CPU backend runs it as `bmm` + causal softmax +
//! `bmm`, exactly the ops the model used before, with the same bits.

use crate::{DType, Error, Result, Tensor};

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
    /// `(dq [BH, T, D], dk, dv [BH / G, T, D])` from the forward's inputs, output, saved
    /// state and `d_o [BH, T, D]`.
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

/// Checks `q` (and `rest`: o, d_o) are `[BH, T, D]` and `k`, `v` are `[BH / G, T, D]`, all
/// on one device; returns the group size `G`.
fn check(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, rest: &[&Tensor]) -> Result<usize> {
    q.expect_rank(op, "q", 3)?;
    for t in rest {
        q.same_device(op, t)?;
        if t.dims() != q.dims() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: q.dims().to_vec(),
                rhs: t.dims().to_vec(),
                rule: "q, o and d_o must all be [B·heads, T, head_dim]",
            });
        }
    }
    for t in [k, v] {
        q.same_device(op, t)?;
        let (qd, kd) = (q.dims(), t.dims());
        let fits = kd.len() == 3
            && kd[1..] == qd[1..]
            && kd[0] > 0
            && qd[0].is_multiple_of(kd[0])
            && k.dims() == v.dims();
        if !fits {
            return Err(Error::ShapeMismatch {
                op,
                lhs: qd.to_vec(),
                rhs: kd.to_vec(),
                rule: "k and v must be [B·kv_heads, T, head_dim] with kv_heads dividing heads (q is [B·heads, T, head_dim])",
            });
        }
    }
    Ok(q.dims()[0] / k.dims()[0].max(1))
}

/// The key/value row each of `bh` query rows reads: `r / group`.
fn kv_rows(bh: usize, group: usize, x: &Tensor) -> Result<Tensor> {
    let idx = (0..bh).map(|r| (r / group) as i32).collect();
    Tensor::from_vec_i32(idx, [bh], x.device())
}

/// Key/value rows `[BH / G, T, D]` repeated to the query rows `[BH, T, D]` (a row gather;
/// no copy when `G = 1`).
pub(crate) fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (rows, t, d) = x.dims3()?;
    let ids = kv_rows(rows * group, group, x)?;
    x.reshape([rows, t * d])?
        .index_select(&ids)?
        .reshape([rows * group, t, d])
}

/// Backward of [`repeat_kv`]: sums each group of query rows into its key/value row (f32,
/// the deterministic `index_add_rows`; `d` itself when `G = 1`).
pub(crate) fn sum_kv(d: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(d.clone());
    }
    let (bh, t, hd) = d.dims3()?;
    let ids = kv_rows(bh, group, d)?;
    Tensor::zeros([bh / group, t * hd], DType::F32, d.device())?
        .index_add_rows(&ids, &d.reshape([bh, t * hd])?, None)?
        .reshape([bh / group, t, hd])
}

impl Tensor {
    /// Causal attention of `q [BH, T, D]` over `k`, `v` (`[BH / G, T, D]`, `G` dividing
    /// `BH`): `(o [BH, T, D], saved)`, `o[r, t] = Σ_{s ≤ t} softmax_s(scale · q[r, t]·k[r/G,
    /// s]) v[r/G, s]`. `saved` is for [`Tensor::causal_attention_backward`] only.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        check("causal_attention", q, k, v, &[])?;
        q.backend().causal_attention(q, k, v, scale)
    }

    /// Backward of [`Tensor::causal_attention`]: `(dq, dk, dv)` (shaped as `q`, `k`, `v`;
    /// `dk`, `dv` summed over each KV row's query rows) from its inputs, output `o`, `saved`
    /// and the output gradient `d_o`.
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
        check(OP, q, k, v, &[o, d_o])?;
        q.same_device(OP, saved)?;
        q.backend()
            .causal_attention_backward(q, k, v, o, saved, d_o, scale)
    }
}

/// The unfused attention (any backend's ops): keys and values repeated to the query rows,
/// `bmm`, causal softmax, `bmm`; `saved` is the probabilities `[BH, T, T]`.
pub(crate) fn unfused_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let group = q.dims()[0] / k.dims()[0].max(1);
    let (k, v) = (repeat_kv(k, group)?, repeat_kv(v, group)?);
    let p = q.bmm(&k, false, true)?.causal_softmax(scale)?;
    let o = p.bmm(&v, false, false)?;
    Ok((o, p))
}

/// Backward of [`unfused_forward`] from the probabilities `p` (`dk`, `dv` summed over the
/// repeats).
pub(crate) fn unfused_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let group = q.dims()[0] / k.dims()[0].max(1);
    let (k, v) = (&repeat_kv(k, group)?, &repeat_kv(v, group)?);
    let d_p = d_o.bmm(v, false, true)?;
    let d_v = p.bmm(d_o, true, false)?;
    let d_s = p.causal_softmax_backward(&d_p, scale)?;
    let d_q = d_s.bmm(k, false, false)?;
    let d_k = d_s.bmm(q, true, false)?;
    Ok((d_q, sum_kv(&d_k, group)?, sum_kv(&d_v, group)?))
}
