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

    /// [`AttentionKernels::causal_attention`] in the sequence-major layout: `q [B, T, NH,
    /// D]`, `k, v [B, T, NKV, D]`, `o [B, T, NH, D]`. By default the heads are permuted to
    /// the heads-major layout and back around the heads-major op (exact copies: the same
    /// bits); a backend whose kernel reads strided rows overrides it and copies nothing.
    fn causal_attention_bshd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        bshd_via_heads_major(self, q, k, v, scale)
    }

    /// Backward of [`AttentionKernels::causal_attention_bshd`]: `(dq, dk, dv)` in the
    /// sequence-major layout of `q`, `k`, `v` (default: through the heads-major backward).
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_bshd_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        bshd_backward_via_heads_major(self, q, k, v, o, saved, d_o, scale)
    }

    /// [`AttentionKernels::causal_attention_bshd`] on the fused q|k|v projection `qkv [B,
    /// T, NH + 2·NKV, D]` (`heads` = `(NH, NKV)`): `(o [B, T, NH, D], saved)`. By default
    /// q, k and v are copied out of it and the sequence-major op runs on them (the same
    /// bits); a backend whose kernel reads strided rows overrides it and copies nothing.
    fn causal_attention_qkv(
        &self,
        qkv: &Tensor,
        heads: (usize, usize),
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = split_qkv(qkv, heads)?;
        self.causal_attention_bshd(&q, &k, &v, scale)
    }

    /// Backward of [`AttentionKernels::causal_attention_qkv`]: `d_qkv` shaped as `qkv`
    /// (default: the sequence-major backward on the copied-out q, k, v, its gradients
    /// concatenated).
    fn causal_attention_qkv_backward(
        &self,
        qkv: &Tensor,
        (o, saved, d_o): (&Tensor, &Tensor, &Tensor),
        heads: (usize, usize),
        scale: f32,
    ) -> Result<Tensor> {
        qkv_backward_via_split(self, qkv, (o, saved, d_o), heads, scale)
    }
}

/// q, k, v copied out of the fused `qkv [B, T, NH + 2·NKV, D]` (`heads` = `(NH, NKV)`).
pub(crate) fn split_qkv(
    qkv: &Tensor,
    (nh, nkv): (usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        qkv.narrow(2, 0, nh)?,
        qkv.narrow(2, nh, nkv)?,
        qkv.narrow(2, nh + nkv, nkv)?,
    ))
}

/// The default fused-q|k|v backward: the sequence-major backward on the split operands.
pub(crate) fn qkv_backward_via_split<B: AttentionKernels + ?Sized>(
    be: &B,
    qkv: &Tensor,
    (o, saved, d_o): (&Tensor, &Tensor, &Tensor),
    heads: (usize, usize),
    scale: f32,
) -> Result<Tensor> {
    let (q, k, v) = split_qkv(qkv, heads)?;
    let (dq, dk, dv) = be.causal_attention_bshd_backward(&q, &k, &v, o, saved, d_o, scale)?;
    Tensor::cat(&[&dq, &dk, &dv], 2)
}

/// The sequence-major forward through `be`'s heads-major op: heads permuted there and back.
pub(crate) fn bshd_via_heads_major<B: AttentionKernels + ?Sized>(
    be: &B,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (o, saved) =
        be.causal_attention(&heads_major(q)?, &heads_major(k)?, &heads_major(v)?, scale)?;
    Ok((seq_major(&o, q.dims())?, saved))
}

/// The sequence-major backward through `be`'s heads-major backward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bshd_backward_via_heads_major<B: AttentionKernels + ?Sized>(
    be: &B,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    saved: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dq, dk, dv) = be.causal_attention_backward(
        &heads_major(q)?,
        &heads_major(k)?,
        &heads_major(v)?,
        &heads_major(o)?,
        saved,
        &heads_major(d_o)?,
        scale,
    )?;
    Ok((
        seq_major(&dq, q.dims())?,
        seq_major(&dk, k.dims())?,
        seq_major(&dv, v.dims())?,
    ))
}

/// `[B, T, H, D]` → `[B·H, T, D]` (a permute copy).
fn heads_major(x: &Tensor) -> Result<Tensor> {
    let &[b, t, h, d] = x.dims() else {
        return Err(x.rank_error("causal_attention_bshd", "x", 4));
    };
    x.permute(&[0, 2, 1, 3])?.reshape([b * h, t, d])
}

/// `[B·H, T, D]` → `[B, T, H, D]` for the sequence-major `dims` (a permute copy).
fn seq_major(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let &[b, t, h, d] = dims else {
        return Err(x.rank_error("causal_attention_bshd", "x", 4));
    };
    x.reshape([b, h, t, d])?.permute(&[0, 2, 1, 3])
}

/// Checks the sequence-major operands: `q` (and `rest`: o, d_o) `[B, T, NH, D]`, `k`, `v`
/// `[B, T, NKV, D]` with NKV dividing NH, all on one device.
fn check_bshd(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rest: &[&Tensor],
) -> Result<()> {
    q.expect_rank(op, "q", 4)?;
    for t in rest {
        q.same_device(op, t)?;
        if t.dims() != q.dims() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: q.dims().to_vec(),
                rhs: t.dims().to_vec(),
                rule: "q, o and d_o must all be [B, T, heads, head_dim]",
            });
        }
    }
    let qd = q.dims();
    for t in [k, v] {
        q.same_device(op, t)?;
        let kd = t.dims();
        let fits = kd.len() == 4
            && kd[0] == qd[0]
            && kd[1] == qd[1]
            && kd[3] == qd[3]
            && kd[2] > 0
            && qd[2].is_multiple_of(kd[2])
            && k.dims() == v.dims();
        if !fits {
            return Err(Error::ShapeMismatch {
                op,
                lhs: qd.to_vec(),
                rhs: kd.to_vec(),
                rule: "k and v must be [B, T, kv_heads, head_dim] with kv_heads dividing heads (q is [B, T, heads, head_dim])",
            });
        }
    }
    Ok(())
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

impl Tensor {
    /// [`Tensor::causal_attention`] in the sequence-major layout the q/k/v projections
    /// produce: `q [B, T, NH, D]`, `k`, `v` `[B, T, NKV, D]` (NKV dividing NH; query head
    /// `h` reads KV head `h / (NH / NKV)`) → `(o [B, T, NH, D], saved)`. Same values as the
    /// heads-major op on the permuted operands; a backend reading strided rows (cuDNN)
    /// copies nothing.
    pub fn causal_attention_bshd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        check_bshd("causal_attention_bshd", q, k, v, &[])?;
        q.backend().causal_attention_bshd(q, k, v, scale)
    }

    /// Backward of [`Tensor::causal_attention_bshd`]: `(dq, dk, dv)` shaped as `q`, `k`,
    /// `v` from its inputs, output `o`, `saved` and `d_o` (all sequence-major).
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_bshd_backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "causal_attention_bshd_backward";
        check_bshd(OP, q, k, v, &[o, d_o])?;
        q.same_device(OP, saved)?;
        q.backend()
            .causal_attention_bshd_backward(q, k, v, o, saved, d_o, scale)
    }
}

/// Checks the fused `qkv [B, T, NH + 2·NKV, D]` for `heads` = `(NH, NKV)` (NKV ≥ 1 dividing
/// NH) and `rest` (o, d_o) `[B, T, NH, D]`, all on one device.
fn check_qkv(
    op: &'static str,
    qkv: &Tensor,
    (nh, nkv): (usize, usize),
    rest: &[&Tensor],
) -> Result<()> {
    let (b, t, w, d) = qkv.dims4().map_err(|_| qkv.rank_error(op, "qkv", 4))?;
    if nkv == 0 || !nh.is_multiple_of(nkv) || w != nh + 2 * nkv {
        return Err(Error::InvalidArgument {
            op,
            arg: "heads",
            value: format!("({nh}, {nkv}) for qkv {:?}", qkv.dims()),
            rule:
                "qkv must be [B, T, heads + 2·kv_heads, head_dim] with kv_heads >= 1 dividing heads",
        });
    }
    for x in rest {
        qkv.same_device(op, x)?;
        if x.dims() != [b, t, nh, d] {
            return Err(Error::ShapeMismatch {
                op,
                lhs: qkv.dims().to_vec(),
                rhs: x.dims().to_vec(),
                rule: "o and d_o must be [B, T, heads, head_dim] of qkv's B, T, head_dim",
            });
        }
    }
    Ok(())
}

impl Tensor {
    /// [`Tensor::causal_attention_bshd`] on the output of a fused q|k|v projection: `qkv
    /// [B, T, NH + 2·NKV, D]` holds each position's NH query heads, then its NKV keys, then
    /// its NKV values (the `[B·T, (NH + 2·NKV)·D]` product of `matmul_stacked` over
    /// `[W_q; W_k; W_v]`, reshaped) → `(o [B, T, NH, D], saved)`. Same values as the
    /// sequence-major op on q, k, v copied out; a backend reading strided rows (cuDNN)
    /// copies nothing.
    pub fn causal_attention_qkv(
        qkv: &Tensor,
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let heads = (n_heads, n_kv_heads);
        check_qkv("causal_attention_qkv", qkv, heads, &[])?;
        qkv.backend().causal_attention_qkv(qkv, heads, scale)
    }

    /// Backward of [`Tensor::causal_attention_qkv`]: `d_qkv` shaped as `qkv` (dq, dk, dv in
    /// its head blocks) from its input, output `o`, `saved` and `d_o`.
    pub fn causal_attention_qkv_backward(
        qkv: &Tensor,
        (o, saved, d_o): (&Tensor, &Tensor, &Tensor),
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<Tensor> {
        const OP: &str = "causal_attention_qkv_backward";
        let heads = (n_heads, n_kv_heads);
        check_qkv(OP, qkv, heads, &[o, d_o])?;
        qkv.same_device(OP, saved)?;
        qkv.backend()
            .causal_attention_qkv_backward(qkv, (o, saved, d_o), heads, scale)
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

#[cfg(test)]
mod tests {
    use crate::ops::test_bits as bits;
    use crate::{Device, Tensor};

    /// `[B, T, H, D]` → `[B·H, T, D]` by hand (host loops).
    fn heads_major_host(x: &Tensor) -> Tensor {
        let &[b, t, h, d] = x.dims() else {
            panic!("rank")
        };
        let v = x.to_host_f32().unwrap();
        let mut out = vec![0f32; v.len()];
        for (i, o) in out.iter_mut().enumerate() {
            let (bh, rest) = (i / (t * d), i % (t * d));
            let (bi, hi, ti, di) = (bh / h, bh % h, rest / d, rest % d);
            *o = v[((bi * t + ti) * h + hi) * d + di];
        }
        Tensor::from_vec_f32(out, [b * h, t, d], Device::Cpu).unwrap()
    }

    #[test]
    fn sequence_major_attention_is_the_heads_major_op_on_permuted_heads_bitwise() {
        // B 2, T 5, 4 query heads over 2 KV heads, D 3
        let r = |seed, h| Tensor::randn_named(seed, "x", vec![2, 5, h, 3], 1.0, Device::Cpu);
        let (q, k, v, d_o) = (
            r(1, 4).unwrap(),
            r(2, 2).unwrap(),
            r(3, 2).unwrap(),
            r(4, 4).unwrap(),
        );
        let (o, saved) = Tensor::causal_attention_bshd(&q, &k, &v, 0.5).unwrap();
        let hm = |x: &Tensor| heads_major_host(x);
        let (o_ref, p_ref) = Tensor::causal_attention(&hm(&q), &hm(&k), &hm(&v), 0.5).unwrap();
        assert_eq!(o.dims(), q.dims());
        assert_eq!(bits(&hm(&o)), bits(&o_ref), "o");
        let (dq, dk, dv) =
            Tensor::causal_attention_bshd_backward(&q, &k, &v, &o, &saved, &d_o, 0.5).unwrap();
        let (dq_ref, dk_ref, dv_ref) = Tensor::causal_attention_backward(
            &hm(&q),
            &hm(&k),
            &hm(&v),
            &o_ref,
            &p_ref,
            &hm(&d_o),
            0.5,
        )
        .unwrap();
        assert_eq!(bits(&hm(&dq)), bits(&dq_ref), "dq");
        assert_eq!(bits(&hm(&dk)), bits(&dk_ref), "dk");
        assert_eq!(bits(&hm(&dv)), bits(&dv_ref), "dv");
    }

    #[test]
    fn fused_qkv_attention_is_the_sequence_major_op_on_its_head_blocks_bitwise() {
        // B 2, T 5, 4 query heads over 2 KV heads, D 4: qkv [2, 5, 8, 4]
        let r = |seed, h| Tensor::randn_named(seed, "x", vec![2, 5, h, 4], 1.0, Device::Cpu);
        let (qkv, d_o) = (r(1, 8).unwrap(), r(2, 4).unwrap());
        let (q, k, v) = (
            qkv.narrow(2, 0, 4).unwrap(),
            qkv.narrow(2, 4, 2).unwrap(),
            qkv.narrow(2, 6, 2).unwrap(),
        );
        let (o, saved) = Tensor::causal_attention_qkv(&qkv, 4, 2, 0.5).unwrap();
        let (o_ref, saved_ref) = Tensor::causal_attention_bshd(&q, &k, &v, 0.5).unwrap();
        assert_eq!(bits(&o), bits(&o_ref), "o");
        let d_qkv =
            Tensor::causal_attention_qkv_backward(&qkv, (&o, &saved, &d_o), 4, 2, 0.5).unwrap();
        let (dq, dk, dv) =
            Tensor::causal_attention_bshd_backward(&q, &k, &v, &o_ref, &saved_ref, &d_o, 0.5)
                .unwrap();
        assert_eq!(d_qkv.dims(), qkv.dims());
        assert_eq!(bits(&d_qkv.narrow(2, 0, 4).unwrap()), bits(&dq), "dq");
        assert_eq!(bits(&d_qkv.narrow(2, 4, 2).unwrap()), bits(&dk), "dk");
        assert_eq!(bits(&d_qkv.narrow(2, 6, 2).unwrap()), bits(&dv), "dv");
        let e = Tensor::causal_attention_qkv(&qkv, 4, 1, 0.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("heads + 2·kv_heads"), "{e}");
        let e = Tensor::causal_attention_qkv_backward(&qkv, (&o, &saved, &qkv), 4, 2, 0.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("o and d_o must be"), "{e}");
    }

    #[test]
    fn sequence_major_shape_errors_name_the_rule() {
        let z = |dims: &[usize]| Tensor::zeros(dims, crate::DType::F32, Device::Cpu).unwrap();
        let e = Tensor::causal_attention_bshd(
            &z(&[2, 5, 4, 3]),
            &z(&[2, 5, 3, 3]),
            &z(&[2, 5, 3, 3]),
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kv_heads dividing heads"), "{e}");
        let e =
            Tensor::causal_attention_bshd(&z(&[10, 4, 3]), &z(&[10, 4, 3]), &z(&[10, 4, 3]), 1.0)
                .unwrap_err()
                .to_string();
        assert!(e.contains("causal_attention_bshd"), "{e}");
    }
}
