//! FlexiDepth: router shape, full/skip mixing with static shapes, layers used per token,
//! and the seed's skip loss recomputed by hand from the router scores.
//!
//! `cargo run -p megamoe-model --example flexidepth_skip_router`

use megamoe_model::{Model, ModelConfig};
use megamoe_plan::{flexidepth_router_hidden, Plan};
use megamoe_tensor::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Router bottleneck (seed `flexidepth_router_shape`): hidden = max(1, d // 16).
    for d in [8, 64, 4096] {
        println!(
            "d_model {d:>4} → router hidden {}",
            flexidepth_router_hidden(d, 16)
        );
    }
    assert_eq!(flexidepth_router_hidden(4096, 16), 256);
    assert_eq!(flexidepth_router_hidden(8, 16), 1);

    let toml = "[model]\nvocab_size = 64\nd_model = 64\nn_layers = 4\nn_heads = 4\n\
        ffn_hidden = 128\nseq_len = 32\n[train]\nglobal_batch = 4\n\
        [flexidepth]\nadaptive_layers = 2\nskip_loss_weight = 0.001\n";
    let plan = Plan::from_toml_str(toml, &[], Some(1))?;
    let fd = plan.flexi_depth.ok_or("flexidepth")?;
    println!(
        "adaptive layers {}..4, router hidden {}, adapter hidden {}, τ {}",
        fd.first_adaptive_layer, fd.router_hidden, fd.adapter_hidden, fd.threshold
    );
    let model = Model::new(ModelConfig::from_plan(&plan)?)?;
    let mut params = model.init_params()?;
    // Spread the router scores (a freshly initialised router sits at σ(≈0) = 0.5).
    params.visit_mut(&mut |n, t, _| {
        if n.contains("depth_router.head") {
            *t = t.scale(200.0).expect("scale");
        }
    });
    let (b, t) = (4, 32);
    let ids: Vec<i32> = (0..(b * t) as i32).map(|i| (i * 29 + 3) % 64).collect();
    let targets: Vec<i32> = ids.iter().map(|x| (x * 3 + 1) % 64).collect();
    let ids = Tensor::from_vec_i32(ids, [b, t], Device::Cpu)?;
    let targets = Tensor::from_vec_i32(targets, [b, t], Device::Cpu)?;
    let out = model.forward(&params, &ids, &targets, 0)?;
    let losses = out.losses.to_host()?;
    let stats = out.stats.to_host(4)?;

    // Hand computation of L_skip = mean_t (Σ_l g_{l,t})² / n_layers from the scores.
    let mut scores = Vec::new();
    for l in &out.stats.layers {
        if let (Some(g), Some(m)) = (&l.block.depth_score, &l.block.full_path) {
            let (g, m) = (g.to_host_f32()?, m.to_host_f32()?);
            let full = m.iter().filter(|&&v| v == 1.0).count();
            let mean = g.iter().sum::<f32>() / g.len() as f32;
            println!(
                "layer {}: mean score {mean:.3}, full path {full}/{} tokens",
                l.layer,
                g.len()
            );
            // The mask is exactly g > τ.
            assert!(g.iter().zip(&m).all(|(&gi, &mi)| (gi > 0.5) == (mi == 1.0)));
            scores.push(g);
        }
    }
    let n = scores[0].len();
    let hand: f64 = (0..n)
        .map(|i| scores.iter().map(|g| g[i] as f64).sum::<f64>().powi(2))
        .sum::<f64>()
        / n as f64
        / scores.len() as f64;
    println!(
        "skip loss: model {:.6}, by hand {hand:.6}",
        losses.flexi_depth
    );
    assert!((losses.flexi_depth as f64 - hand).abs() < 1e-5 * hand.max(1.0));

    let hist = stats.layers_used_hist.ok_or("hist")?;
    let mean = stats.layers_used_mean.ok_or("mean")?;
    println!("layers used per token: mean {mean:.3}, histogram {hist:?} (index = layers)");
    // Two non-adaptive layers always run; each token uses 2..=4 layers.
    assert_eq!(hist[..2].iter().sum::<usize>(), 0);
    assert_eq!(hist.iter().sum::<usize>(), b * t);
    assert!((2.0..=4.0).contains(&mean));

    // Backward runs through both paths (router, adapter, mixing) and reaches every weight.
    let mut grads = params.zeros_like()?;
    model.backward(&params, out.saved, &mut grads, 1.0)?;
    let mut touched = 0;
    grads.visit(&mut |n, g, _| {
        if n.contains("depth_router") || n.contains("adapter") {
            let s = g
                .sum_squares()
                .and_then(|s| s.to_scalar_f32())
                .unwrap_or(0.0);
            println!("  grad ‖{n}‖² = {s:.3e}");
            if s > 0.0 {
                touched += 1;
            }
        }
    });
    assert_eq!(
        touched, 16,
        "every router and adapter weight of both layers gets a gradient"
    );
    Ok(())
}
