//! Muon (KellerJordan/Muon, Moonlight): momentum, then the update orthogonalised by five
//! quintic Newton–Schulz iterations (NS5), scaled per matrix.
//!
//! For a matrix `W [m, n]` with gradient `G`:
//!
//! ```text
//! M ← βM + (1−β)G                              (β = optim.muon_momentum, 0.95)
//! U = nesterov ? (1−β)G + βM : M
//! O = NS5(U)
//! W ← W(1 − ηλ) − η · scale(m, n) · O
//! NS5(U): X = U (bf16 option); transpose if m > n; X /= (‖X‖_F + 1e-7);
//!         5×: A = X Xᵀ; B = bA + cA²; X = aX + BX   with (a, b, c) = (3.4445, −4.7750, 2.0315);
//!         transpose back
//! scale:  keller = max(1, m/n)^½,  moonlight = 0.2·√max(m, n)
//! ```
//!
//! An `ExpertBank` parameter `[E, out, in]` is E independent matrices; a fused projection
//! (QKV) declared with row blocks is split into those blocks before NS, each block
//! orthogonalised and scaled with its own shape. A bank whose experts split into equal row
//! blocks (the fused SwiGLU gate‖up bank `[E, 2F, H]`) runs as ONE batched NS5 over the
//! `E·blocks` matrices (a free reshape), with the bits of the per-block path.

use megamoe_plan::{MuonPlan, MuonScale, OptimPlan};
use megamoe_tensor::{DType, Tensor};

use crate::error::{OptimError, Result};

/// The NS5 coefficients `(a, b, c)` (KellerJordan/Muon `zeropower_via_newtonschulz5`).
pub const NS5_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);
/// Newton–Schulz iterations.
pub const NS5_STEPS: usize = 5;
/// ε in `X /= (‖X‖_F + ε)`.
pub const NS5_EPS: f32 = 1e-7;

/// Element type of the Newton–Schulz iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NsPrecision {
    /// f32 throughout (the CPU default).
    #[default]
    F32,
    /// Every intermediate (X, A, B, A², BX) rounded to bf16, products accumulated in f32 —
    /// what the GPU recipe does with bf16 tensor-core GEMMs.
    Bf16,
}

/// Muon hyper-parameters (the learning rate comes per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonConfig {
    /// Momentum β.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Update scale rule.
    pub scale: MuonScale,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// NS5 element type.
    pub ns_precision: NsPrecision,
}

impl MuonConfig {
    /// The Muon settings of a resolved `[optim]` section (weight decay = optim.weight_decay).
    pub fn from_plan(plan: &OptimPlan, muon: &MuonPlan) -> MuonConfig {
        MuonConfig {
            momentum: muon.momentum,
            nesterov: muon.nesterov,
            scale: muon.scale,
            weight_decay: plan.weight_decay,
            ns_precision: NsPrecision::F32,
        }
    }
}

/// The per-matrix update scale for a block of `m` rows and `n` columns.
pub fn muon_scale(scale: MuonScale, m: usize, n: usize) -> f64 {
    let (m, n) = (m as f64, n as f64);
    match scale {
        MuonScale::Keller => (m / n).max(1.0).sqrt(),
        MuonScale::Moonlight => 0.2 * m.max(n).sqrt(),
    }
}

fn round(x: Tensor, p: NsPrecision) -> Result<Tensor> {
    Ok(match p {
        NsPrecision::F32 => x,
        NsPrecision::Bf16 => x.to_dtype(DType::BF16)?,
    })
}

/// NS5 of a 2-D matrix (formula in the module docs). Returns f32, same shape as `g`.
/// An empty matrix is returned as zeros. No host read (the norm stays on the device).
pub fn newton_schulz5(g: &Tensor, precision: NsPrecision) -> Result<Tensor> {
    let (m, n) = g.dims2()?;
    let o = newton_schulz5_batched(&g.reshape([1, m, n])?, precision)?;
    Ok(o.reshape([m, n])?)
}

/// NS5 of each matrix of a stack `g [B, m, n]`, all B at once with batched GEMMs (`bmm`)
/// and per-matrix norms on the device: the same bits as [`newton_schulz5`] on each
/// `[m, n]` slice. Returns f32 `[B, m, n]`; empty matrices give zeros.
pub fn newton_schulz5_batched(g: &Tensor, precision: NsPrecision) -> Result<Tensor> {
    let (batch, m, n) = g.dims3()?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(Tensor::zeros([batch, m, n], DType::F32, g.device())?);
    }
    let (a, b, c) = NS5_COEFFS;
    let transposed = m > n;
    let mut x = if transposed {
        g.permute(&[0, 2, 1])?
    } else {
        g.clone()
    };
    x = round(x, precision)?;
    // X /= (‖X‖_F + ε) per matrix, on the device (no host read).
    let inv = x.norm_rows()?.add_scalar(NS5_EPS)?.recip()?;
    x = round(x.mul_col(&inv)?, precision)?;
    for _ in 0..NS5_STEPS {
        let a_mat = round(x.bmm(&x, false, true)?, precision)?; // A = X Xᵀ
        let a2 = round(a_mat.bmm(&a_mat, false, false)?, precision)?; // A²
        let mut b_mat = a_mat.scale(b)?; // B = bA + cA²
        b_mat.axpy(c, &a2)?;
        let b_mat = round(b_mat, precision)?;
        let bx = round(b_mat.bmm(&x, false, false)?, precision)?;
        let mut xn = x.scale(a)?; // X = aX + BX
        xn.add_assign(&bx)?;
        x = round(xn, precision)?;
    }
    let x = x.to_dtype(DType::F32)?;
    Ok(if transposed {
        x.permute(&[0, 2, 1])?
    } else {
        x
    })
}

/// The momentum step: updates `buf` ← βM + (1−β)G in place and returns the Muon input
/// `U` (Nesterov `(1−β)G + βM`, else `M`).
pub fn momentum_step(buf: &mut Tensor, grad: &Tensor, beta: f64, nesterov: bool) -> Result<Tensor> {
    // In place (a flat momentum view stays in its buffer); `scale_by_assign` has the bits of
    // `scale`.
    buf.scale_by_assign(&Tensor::scalar(beta as f32, buf.device())?)?;
    buf.axpy((1.0 - beta) as f32, grad)?;
    if nesterov {
        let mut u = grad.scale((1.0 - beta) as f32)?;
        u.axpy(beta as f32, buf)?;
        Ok(u)
    } else {
        Ok(buf.clone())
    }
}

/// `scale(block) · NS5(block)` for each row block of a 2-D matrix `u [m, n]`, concatenated
/// back to `[m, n]`. `blocks` empty means one block of all rows.
pub fn orthogonalize_matrix(
    u: &Tensor,
    blocks: &[usize],
    scale: MuonScale,
    precision: NsPrecision,
) -> Result<Tensor> {
    let (m, n) = u.dims2()?;
    let whole = [m];
    let blocks = if blocks.is_empty() {
        &whole[..]
    } else {
        blocks
    };
    let mut outs = Vec::with_capacity(blocks.len());
    for part in u.split(0, blocks)? {
        let rows = part.dims()[0];
        let o = newton_schulz5(&part, precision)?;
        outs.push(o.scale(muon_scale(scale, rows, n) as f32)?);
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    Ok(Tensor::cat(&refs, 0)?)
}

/// [`orthogonalize_matrix`] for a Muon parameter: a 2-D matrix, or a 3-D expert bank
/// `[E, out, in]` whose E matrices are orthogonalised independently (same `blocks` each).
pub fn orthogonalize(
    u: &Tensor,
    blocks: &[usize],
    scale: MuonScale,
    precision: NsPrecision,
) -> Result<Tensor> {
    match *u.dims() {
        [_, _] => orthogonalize_matrix(u, blocks, scale, precision),
        [_, out, inp] if blocks.is_empty() || blocks == [out] => {
            // One batched NS5 over the expert dimension.
            let o = newton_schulz5_batched(u, precision)?;
            Ok(o.scale(muon_scale(scale, out, inp) as f32)?)
        }
        [e, out, inp]
            if blocks.iter().all(|&b| b == blocks[0]) && blocks.iter().sum::<usize>() == out =>
        {
            // Equal row blocks: each block of each expert is one matrix of [E·blocks, b, in].
            let b = blocks[0];
            let o = newton_schulz5_batched(&u.reshape([e * blocks.len(), b, inp])?, precision)?;
            Ok(o.scale(muon_scale(scale, b, inp) as f32)?
                .reshape([e, out, inp])?)
        }
        [e, out, inp] => {
            let mut outs = Vec::with_capacity(e);
            for i in 0..e {
                let slice = u.narrow(0, i, 1)?.reshape([out, inp])?;
                let o = orthogonalize_matrix(&slice, blocks, scale, precision)?;
                outs.push(o.reshape([1, out, inp])?);
            }
            if outs.is_empty() {
                return Ok(Tensor::zeros([0, out, inp], DType::F32, u.device())?);
            }
            let refs: Vec<&Tensor> = outs.iter().collect();
            Ok(Tensor::cat(&refs, 0)?)
        }
        _ => Err(OptimError::InvalidArgument {
            field: "muon input rank",
            value: format!("{:?}", u.dims()),
            rule: "Muon needs a 2-D matrix or a 3-D expert bank [E, out, in]",
        }),
    }
}

/// Applies `W ← W(1 − ηλ) − η·O` where `O` already carries the Muon scale. Returns the new
/// f32 parameter.
pub fn apply_update(param: &Tensor, o: &Tensor, lr: f64, weight_decay: f64) -> Result<Tensor> {
    let mut p = if weight_decay != 0.0 {
        param.scale((1.0 - lr * weight_decay) as f32)?
    } else {
        param.to_dtype(DType::F32)? // axpy copies on write: `param` is never modified
    };
    p.axpy(-lr as f32, o)?;
    Ok(p)
}

/// One full Muon update of `param` (2-D or expert bank) with gradient `grad`: momentum on
/// `momentum_buf`, NS5 per matrix / row block, scaled update with decoupled decay
/// (`decay = false` turns λ off). Returns the new f32 parameter.
pub fn muon_update(
    param: &Tensor,
    grad: &Tensor,
    momentum_buf: &mut Tensor,
    cfg: &MuonConfig,
    lr: f64,
    blocks: &[usize],
    decay: bool,
) -> Result<Tensor> {
    let u = momentum_step(momentum_buf, grad, cfg.momentum, cfg.nesterov)?;
    let o = orthogonalize(&u, blocks, cfg.scale, cfg.ns_precision)?;
    let wd = if decay { cfg.weight_decay } else { 0.0 };
    apply_update(param, &o, lr, wd)
}
