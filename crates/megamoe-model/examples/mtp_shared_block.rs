//! MTP with one shared block reused for K = 3 depths: the seed's decay weights, per-depth
//! CE on rolled targets, L_MTP = λ Σ w_k CE_k, shared vs sequential parameter counts, and
//! a few SGD steps that lower every depth's loss.
//!
//! `cargo run -p megamoe-model --example mtp_shared_block`

use megamoe_model::{Model, ModelConfig};
use megamoe_plan::{mtp_step_weights, Plan};
use megamoe_tensor::{Device, Tensor};

fn config(mode: &str) -> Result<ModelConfig, Box<dyn std::error::Error>> {
    let toml = format!(
        "[model]\nvocab_size = 32\nd_model = 32\nn_layers = 2\nn_heads = 2\nffn_hidden = 64\n\
         seq_len = 16\n[train]\nglobal_batch = 4\n[mtp]\ndepth = 3\ndecay = 0.6\n\
         loss_weight = 0.3\nmode = \"{mode}\"\n"
    );
    Ok(ModelConfig::from_plan(&Plan::from_toml_str(
        &toml,
        &[],
        Some(1),
    )?)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let w = mtp_step_weights(3, 0.6);
    println!(
        "step weights (K=3, β=0.6): {:?}",
        w.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>()
    );
    for (got, want) in w.iter().zip([0.5102, 0.3061, 0.1837]) {
        assert!((got - want).abs() < 5e-5);
    }

    let shared = Model::new(config("shared")?)?;
    let sequential = Model::new(config("sequential")?)?;
    let mut p = shared.init_params()?;
    let count = |p: &megamoe_model::ModelParams| {
        let mut n = 0;
        p.visit(&mut |name, t, _| {
            if name.starts_with("mtp.") {
                n += t.numel()
            }
        });
        n
    };
    let (ns, nq) = (count(&p), count(&sequential.init_params()?));
    println!("MTP parameters: shared {ns}, sequential (D = 3 modules) {nq}");
    assert_eq!(nq, 3 * ns);

    // A periodic sequence: token t+k is predictable from t, so every depth can learn.
    let (b, t) = (4, 16);
    let seq: Vec<i32> = (0..b * t).map(|i| ((i % t) * 5 % 32) as i32).collect();
    let ids = Tensor::from_vec_i32(seq.clone(), [b, t], Device::Cpu)?;
    let targets: Vec<i32> = (0..b * t)
        .map(|i| (((i % t) + 1) * 5 % 32) as i32)
        .collect();
    let targets = Tensor::from_vec_i32(targets, [b, t], Device::Cpu)?;

    let mut first = None;
    let mut last = None;
    for step in 0..40 {
        let out = shared.forward(&p, &ids, &targets, step)?;
        let v = out.losses.to_host()?;
        // total = lm + λ Σ w_k CE_k (no other losses are on).
        let l_mtp: f64 = v
            .mtp_losses
            .iter()
            .zip(&w)
            .map(|(c, w)| 0.3 * w * *c as f64)
            .sum();
        assert!(((v.total - v.lm_loss) as f64 - l_mtp).abs() < 1e-4);
        if step % 10 == 0 || step == 39 {
            println!(
                "step {step:>2}: lm {:.4} | CE_1..3 {:?} | L_MTP {l_mtp:.4}",
                v.lm_loss,
                v.mtp_losses
                    .iter()
                    .map(|c| format!("{c:.3}"))
                    .collect::<Vec<_>>()
            );
        }
        if first.is_none() {
            first = Some(v.mtp_losses.clone());
        }
        last = Some(v.mtp_losses.clone());
        let mut g = p.zeros_like()?;
        shared.backward(&p, out.saved, &mut g, 1.0)?;
        let mut grads = Vec::new();
        g.visit(&mut |_, t, _| grads.push(t.clone()));
        let mut i = 0;
        let mut err = None;
        p.visit_mut(&mut |_, t, _| {
            if let Err(e) = t.axpy(-1.0, &grads[i]) {
                err = Some(e);
            }
            i += 1;
        });
        if let Some(e) = err {
            return Err(e.into());
        }
    }
    let (first, last) = (first.ok_or("no step")?, last.ok_or("no step")?);
    for k in 0..3 {
        assert!(
            last[k] < 0.7 * first[k],
            "depth {}: {} → {}",
            k + 1,
            first[k],
            last[k]
        );
    }
    println!("every depth's CE fell by more than 30% with one shared block");
    Ok(())
}
