//! Causal self-attention with RoPE and grouped-query heads (GQA), PyTorch layout `[out, in]`.
//!
//! Shapes: `x [N, H]` with `N = B·T`; `q_proj [NH·D, H]`, `k_proj, v_proj [NKV·D, H]`,
//! `o_proj [H, NH·D]`; `D` = head_dim, `NH` query heads, `NKV` KV heads (`NH % NKV = 0`,
//! query head `h` reads KV head `h / (NH/NKV)`).
//!
//! ```text
//! q = rope(x W_qᵀ), k = rope(x W_kᵀ), v = x W_vᵀ          (rotate-half RoPE, positions 0..T)
//! o = causal_softmax(q kᵀ / √D) v   per (b, h): `Tensor::causal_attention` over B·NH
//! y = o W_oᵀ
//! ```
//! The three projections are one product, `qkv = x · [W_q; W_k; W_v]ᵀ`
//! (`Tensor::matmul_stacked`: `[N, (NH + 2·NKV)·D]`, each row the position's q heads, then
//! its k heads, then its v heads), RoPE rotates the q and k heads of it in place
//! (`Tensor::rope_leading_in_place`), and attention reads q, k, v out of it
//! (`Tensor::causal_attention_qkv`, grouped-query): on a GPU in bf16 cuDNN's fused attention
//! reads them there through strides and writes the gradients into one `d_qkv` of the same
//! layout, so no copy surrounds it; the input gradient is then one product `d_qkv · [W_q;
//! W_k; W_v]` and the weight gradients one `d_qkvᵀ · x` where the gradients lie back to
//! back (the flat gradient buffer: q, k, v are visited in that order). Elsewhere the ops
//! copy q, k, v out and run per projection (on the CPU the KV heads are repeated by a row
//! gather, then `bmm` + causal softmax + `bmm`, the backward summing the repeats with the
//! deterministic `index_add_rows`) — the same values, bit for bit, as three projections.
//! The parameters stay three tensors (checkpoints, tensor-parallel shards, the optimizer).
//! Forward saves `x`, `qkv` (q, k rotated), the attention op's saved state (`P` on the
//! CPU), and `o`; `backward_input` returns `d_x` (fresh), `backward_weight` accumulates
//! (+=).

use megamoe_optim::ParamRole;
use megamoe_plan::{OffloadTarget, OffloadTargets};
use megamoe_tensor::Tensor;

use crate::error::{Error, Result};
use crate::init::Init;

/// Attention shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// H.
    pub d_model: usize,
    /// NH.
    pub n_heads: usize,
    /// NKV (divides NH).
    pub n_kv_heads: usize,
    /// D (even, for RoPE).
    pub head_dim: usize,
    /// RoPE base θ.
    pub rope_theta: f32,
}

/// Projection weights.
#[derive(Debug, Clone)]
pub struct AttentionParams {
    /// `[NH·D, H]`.
    pub q_proj: Tensor,
    /// `[NKV·D, H]`.
    pub k_proj: Tensor,
    /// `[NKV·D, H]`.
    pub v_proj: Tensor,
    /// `[H, NH·D]`.
    pub o_proj: Tensor,
}

impl AttentionParams {
    /// `q/k/v ~ N(0, std)`, `o ~ N(0, out_std)`, keyed by `{prefix}.{q,k,v,o}_proj.weight`.
    pub fn init(
        c: &AttentionConfig,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<Self> {
        let (h, q, kv) = (c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        Ok(AttentionParams {
            q_proj: init.randn(&format!("{prefix}.q_proj.weight"), &[q, h], std)?,
            k_proj: init.randn(&format!("{prefix}.k_proj.weight"), &[kv, h], std)?,
            v_proj: init.randn(&format!("{prefix}.v_proj.weight"), &[kv, h], std)?,
            o_proj: init.randn(&format!("{prefix}.o_proj.weight"), &[h, q], out_std)?,
        })
    }

    /// Enumerates `{prefix}.{q,k,v,o}_proj.weight` (all [`ParamRole::Matrix`]).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        f(
            &format!("{prefix}.q_proj.weight"),
            &self.q_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.k_proj.weight"),
            &self.k_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.v_proj.weight"),
            &self.v_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.o_proj.weight"),
            &self.o_proj,
            ParamRole::Matrix,
        );
    }

    /// Mutable twin of [`AttentionParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        f(
            &format!("{prefix}.q_proj.weight"),
            &mut self.q_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.k_proj.weight"),
            &mut self.k_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.v_proj.weight"),
            &mut self.v_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.o_proj.weight"),
            &mut self.o_proj,
            ParamRole::Matrix,
        );
    }
}

/// What `backward_input` needs.
#[derive(Debug)]
pub struct AttentionSaved {
    b: usize,
    t: usize,
    /// `[N, H]`.
    x: Tensor,
    /// Rotated queries, rotated keys and values `[B, T, NH + 2·NKV, D]`.
    qkv: Tensor,
    /// The attention op's saved state (see [`Tensor::causal_attention`]).
    attn: Tensor,
    /// Heads output before `o_proj` `[N, NH·D]`.
    o: Tensor,
}

impl AttentionSaved {
    /// Visits the saved activations of `targets` for offload, always in the same order.
    pub(crate) fn visit_offload(
        &mut self,
        targets: OffloadTargets,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        if targets.contains(OffloadTarget::QkvLinear) {
            f(&mut self.x)?;
        }
        if targets.contains(OffloadTarget::CoreAttn) {
            f(&mut self.qkv)?;
            f(&mut self.attn)?;
        }
        if targets.contains(OffloadTarget::AttnProj) {
            f(&mut self.o)?;
        }
        Ok(())
    }
}

/// What `backward_weight` needs.
#[derive(Debug)]
pub struct AttentionDeferredW {
    x: Tensor,
    o: Tensor,
    d_y: Tensor,
    /// `[N, (NH + 2·NKV)·D]`.
    d_qkv: Tensor,
}

/// Causal RoPE GQA attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Shape.
    pub cfg: AttentionConfig,
}

impl Attention {
    /// Checks the head layout.
    pub fn new(cfg: AttentionConfig) -> Result<Attention> {
        if cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
            return Err(Error::Config {
                field: "model.n_kv_heads",
                value: cfg.n_kv_heads.to_string(),
                rule: "must be >= 1 and divide model.n_heads",
            });
        }
        if !cfg.head_dim.is_multiple_of(2) {
            return Err(Error::Config {
                field: "model.head_dim",
                value: cfg.head_dim.to_string(),
                rule: "must be even (rotate-half RoPE)",
            });
        }
        Ok(Attention { cfg })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// `[N, heads·D]` → `[B, T, heads, D]` (a view).
    fn heads(&self, x: Tensor, b: usize, t: usize, heads: usize) -> Result<Tensor> {
        Ok(x.reshape([b, t, heads, self.cfg.head_dim])?)
    }

    /// `[B, T, heads, D]` → `[N, heads·D]` (a view).
    fn merged(&self, x: Tensor) -> Result<Tensor> {
        let &[b, t, heads, d] = x.dims() else {
            return Err(Error::Input {
                arg: "attention heads",
                got: x.dims().to_vec(),
                rule: "must be [B, T, heads, head_dim]",
            });
        };
        Ok(x.reshape([b * t, heads * d])?)
    }

    /// `x [N, H]` of `b` sequences of length `t` → `y [N, H]`.
    pub fn forward(
        &self,
        p: &AttentionParams,
        x: &Tensor,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, AttentionSaved)> {
        self.forward_impl(p, x, b, t, None)
    }

    /// [`Attention::forward`] with the block's residual stream added by the output
    /// projection: `y = residual + o W_oᵀ` ([`Tensor::matmul_add`]: one GEMM on a GPU in
    /// bf16; on the CPU the bits of `residual.add(&forward(..).0)`). Same saved state.
    pub fn forward_residual(
        &self,
        p: &AttentionParams,
        x: &Tensor,
        (b, t): (usize, usize),
        residual: &Tensor,
    ) -> Result<(Tensor, AttentionSaved)> {
        self.forward_impl(p, x, b, t, Some(residual))
    }

    fn forward_impl(
        &self,
        p: &AttentionParams,
        x: &Tensor,
        b: usize,
        t: usize,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, AttentionSaved)> {
        if x.dims() != [b * t, self.cfg.d_model] {
            return Err(Error::Input {
                arg: "attention x",
                got: x.dims().to_vec(),
                rule: "must be [B·T, d_model]",
            });
        }
        let (nh, nkv) = (self.cfg.n_heads, self.cfg.n_kv_heads);
        let mut qkv = self.heads(
            x.matmul_stacked(&[&p.q_proj, &p.k_proj, &p.v_proj])?,
            b,
            t,
            nh + 2 * nkv,
        )?;
        qkv.rope_leading_in_place(self.cfg.rope_theta, nh + nkv, false)?;
        let (o_heads, attn) = Tensor::causal_attention_qkv(&qkv, nh, nkv, self.scale())?;
        let o = self.merged(o_heads)?;
        let y = match residual {
            Some(r) => r.matmul_add(&o, &p.o_proj, true)?,
            None => o.matmul(&p.o_proj, false, true)?,
        };
        Ok((
            y,
            AttentionSaved {
                b,
                t,
                x: x.clone(),
                qkv,
                attn,
                o,
            },
        ))
    }

    /// `d_y [N, H]` → `d_x [N, H]` (fresh).
    pub fn backward_input(
        &self,
        p: &AttentionParams,
        d_y: &Tensor,
        s: AttentionSaved,
    ) -> Result<(Tensor, AttentionDeferredW)> {
        let (b, t) = (s.b, s.t);
        let (nh, nkv) = (self.cfg.n_heads, self.cfg.n_kv_heads);
        let d_o = self.heads(d_y.matmul(&p.o_proj, false, false)?, b, t, nh)?;
        // The attention output per head, from the merged `o` kept for `o_proj`'s gradient.
        let o_heads = self.heads(s.o.clone(), b, t, nh)?;
        let mut d_qkv = Tensor::causal_attention_qkv_backward(
            &s.qkv,
            (&o_heads, &s.attn, &d_o),
            nh,
            nkv,
            self.scale(),
        )?;
        d_qkv.rope_leading_in_place(self.cfg.rope_theta, nh + nkv, true)?;
        let d_qkv = self.merged(d_qkv)?;
        let d_x = d_qkv.matmul_stacked_input_grad(&[&p.q_proj, &p.k_proj, &p.v_proj])?;
        Ok((
            d_x,
            AttentionDeferredW {
                x: s.x,
                o: s.o,
                d_y: d_y.clone(),
                d_qkv,
            },
        ))
    }

    /// Accumulates (+=) the projection gradients into `g`.
    pub fn backward_weight(&self, w: AttentionDeferredW, g: &mut AttentionParams) -> Result<()> {
        let qkv = [&mut g.q_proj, &mut g.k_proj, &mut g.v_proj];
        Tensor::matmul_stacked_wgrad_acc(&mut qkv.map(|t| t), &w.d_qkv, &w.x)?;
        g.o_proj.matmul_acc(&w.d_y, &w.o, true, false, 1.0)?;
        Ok(())
    }

    /// I then W.
    pub fn backward(
        &self,
        p: &AttentionParams,
        d_y: &Tensor,
        s: AttentionSaved,
        g: &mut AttentionParams,
    ) -> Result<Tensor> {
        let (d_x, w) = self.backward_input(p, d_y, s)?;
        self.backward_weight(w, g)?;
        Ok(d_x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};
    use crate::init::zeros_like_params;
    use megamoe_tensor::Device;

    fn setup(nh: usize, nkv: usize) -> (Attention, AttentionParams, Tensor) {
        let cfg = AttentionConfig {
            d_model: 8,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: 4,
            rope_theta: 10000.0,
        };
        let attn = Attention::new(cfg).unwrap();
        let p = AttentionParams::init(&cfg, &Init::new(3), "attn", 0.5, 0.5).unwrap();
        (attn, p, randn(5, &[2 * 5, 8], 1.0))
    }

    #[test]
    fn gqa_attention_backward_matches_finite_differences() {
        let (attn, p, x) = setup(4, 2);
        let probe = Probe::new(9, &[10, 8]);
        let (_, s) = attn.forward(&p, &x, 2, 5).unwrap();
        let mut g = p.clone();
        zeros_like_params(&mut |f| g.visit_mut("attn", f)).unwrap();
        let d_x = attn.backward(&p, &probe.r, s, &mut g).unwrap();
        let run =
            |q: &AttentionParams, x: &Tensor| probe.loss(&attn.forward(q, x, 2, 5).unwrap().0);
        check("d_x", &x, &d_x, |t| run(&p, t));
        let grads = [&g.q_proj, &g.k_proj, &g.v_proj, &g.o_proj];
        for (i, grad) in grads.into_iter().enumerate() {
            let base = [&p.q_proj, &p.k_proj, &p.v_proj, &p.o_proj][i];
            check(&format!("proj{i}"), base, grad, |t| {
                let mut q = p.clone();
                *[&mut q.q_proj, &mut q.k_proj, &mut q.v_proj, &mut q.o_proj][i] = t.clone();
                run(&q, &x)
            });
        }
    }

    #[test]
    fn attention_is_causal() {
        // Changing the last token of each sequence must not change any earlier output row.
        let (attn, p, x) = setup(2, 1);
        let (y0, _) = attn.forward(&p, &x, 2, 5).unwrap();
        let mut h = x.to_host_f32().unwrap();
        for v in &mut h[4 * 8..5 * 8] {
            *v += 1.0;
        }
        let x1 = Tensor::from_vec_f32(h, [10, 8], Device::Cpu).unwrap();
        let (y1, _) = attn.forward(&p, &x1, 2, 5).unwrap();
        let (a, b) = (y0.to_host_f32().unwrap(), y1.to_host_f32().unwrap());
        assert_eq!(a[..4 * 8], b[..4 * 8]);
        assert_ne!(a[4 * 8..5 * 8], b[4 * 8..5 * 8]);
        assert_eq!(a[5 * 8..], b[5 * 8..]);
    }

    #[test]
    fn n_kv_heads_not_dividing_n_heads_is_a_config_error() {
        let cfg = AttentionConfig {
            d_model: 8,
            n_heads: 4,
            n_kv_heads: 3,
            head_dim: 2,
            rope_theta: 1e4,
        };
        let e = Attention::new(cfg).unwrap_err().to_string();
        assert!(e.contains("model.n_kv_heads=3"), "{e}");
    }
}
