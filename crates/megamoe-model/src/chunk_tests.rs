//! Model chunks: the model run as 2 and 4 chunks in sequence (forward carry, split I/W
//! backward per micro-batch) gives bit-identical losses and gradients to the whole model;
//! global names; shared parameters; named errors for out-of-contract calls.

use megamoe_plan::Plan;
use megamoe_tensor::Tensor;

use super::*;
use crate::chunk_params::{shared_params, Shared, SharedParam};
use crate::model::tests::batch;
use crate::{Model, ModelConfig, ModelParams};

/// 4 layers (2 MoE, 2 FlexiDepth-adaptive), GateSkip, MTP, tied or untied head.
fn plan(tie: bool, extra: &str) -> Plan {
    let text = format!(
        "[model]\nvocab_size = 13\nd_model = 8\nn_layers = 4\nn_heads = 2\nn_kv_heads = 1\n\
         ffn_hidden = 32\nseq_len = 6\ntie_embeddings = {tie}\n\
         [train]\nglobal_batch = 2\nseed = 7\n{extra}"
    );
    Plan::from_toml_str(&text, &[], Some(1)).unwrap()
}

const EVERYTHING: &str = "[moe]\nrouted_experts = 4\ntop_k = 2\nexpert_hidden = 8\n\
    shared_experts = 1\nshared_expert_hidden = 8\nshared_expert_gate = true\n\
    aux_loss = \"aux\"\naux_loss_weight = 0.5\nz_loss_weight = 0.1\nfirst_dense_layers = 1\n\
    capacity_factor = 1.0\n\
    [gateskip]\nbudget_start = 0.34\nbudget_end = 0.34\nbudget_warmup_steps = 0\n\
    init_bias = 0.0\ninit_std = 0.5\nsparsity_weight = 0.5\n\
    [flexidepth]\nadaptive_layers = 2\nreduction = 2\nskip_loss_weight = 0.5\n\
    threshold = 0.045\n[mtp]\ndepth = 2\nloss_weight = 0.5\n";

/// (loss-part bits, logits bits, named gradient bits).
type RunBits = (Vec<u32>, Vec<u32>, Vec<(String, Vec<u32>)>);

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_host_f32()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn named_bits(p: &ModelParams) -> Vec<(String, Vec<u32>)> {
    let mut v = Vec::new();
    p.visit(&mut |n, t, _| v.push((n.to_string(), bits(t))));
    v
}

/// (loss-part bits, logits bits, gradient bits) of the whole model.
fn whole(model: &Model, p: &ModelParams, ids: &Tensor, tg: &Tensor) -> RunBits {
    let out = model.forward(p, ids, tg, 3).unwrap();
    let l = loss_bits(&out.losses);
    let logits = bits(&out.logits);
    let mut g = p.zeros_like().unwrap();
    model.backward(p, out.saved, &mut g, 0.5).unwrap();
    (l, logits, named_bits(&g))
}

fn loss_bits(l: &crate::LossParts) -> Vec<u32> {
    let v = l.to_host().unwrap();
    let mut out = vec![v.lm_loss, v.aux, v.z, v.gate_skip, v.flexi_depth, v.total];
    out.extend(v.mtp_losses);
    out.into_iter().map(f32::to_bits).collect()
}

/// The same through `chunks` chunks: forward in order, all `backward_input`s last chunk
/// first, then the `backward_weight`s. One process holds every chunk, so the shared
/// embedding's gradient buffer is handed from the head chunk to the input chunk (as the
/// whole model accumulates into one buffer); across ranks it is summed instead.
fn chunked(model: &Model, p: &ModelParams, ids: &Tensor, tg: &Tensor, chunks: usize) -> RunBits {
    let specs = ChunkSpec::even(model.blocks.len(), chunks).unwrap();
    let cps = p.split(&specs).unwrap();
    let mut gs = p.zeros_like().unwrap().split(&specs).unwrap();
    let stages: Vec<_> = specs
        .iter()
        .map(|s| model.chunk(s.clone()).unwrap())
        .collect();
    let mut stores: Vec<ActivationStore> = (0..chunks).map(|_| ActivationStore::new()).collect();
    let mb = 7; // any micro-batch id
    let mut carry = None;
    let mut result = None;
    for (c, stage) in stages.iter().enumerate() {
        let f = stage
            .forward_micro_batch(&mut stores[c], mb, &cps[c], ids, tg, carry.take(), 3)
            .unwrap();
        assert_eq!(
            f.stats.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            specs[c].layers.clone().collect::<Vec<_>>(),
            "stats carry global layer indices"
        );
        carry = f.carry;
        if let (Some(l), Some(lg)) = (f.losses, f.logits) {
            result = Some((loss_bits(&l), bits(&lg)));
        }
    }
    let mut d = None;
    for c in (0..chunks).rev() {
        assert_eq!(stores[c].awaiting_input_grad(), vec![mb]);
        d = stages[c]
            .backward_input_micro_batch(&mut stores[c], mb, &cps[c], d.take(), 0.5)
            .unwrap();
    }
    assert!(d.is_none(), "the input chunk hands nothing back");
    for c in (0..chunks).rev() {
        assert_eq!(stores[c].awaiting_weight_grad(), vec![mb]);
        stages[c]
            .backward_weight_micro_batch(&mut stores[c], mb, &mut gs[c])
            .unwrap();
        assert!(stores[c].is_empty());
        if c + 1 == chunks && c > 0 {
            let shared = gs[c].embed_tokens.take();
            if shared.is_some() {
                gs[0].embed_tokens = shared;
            }
        }
    }
    let g = ModelParams::join(gs, Shared::First).unwrap();
    let (l, lg) = result.unwrap();
    (l, lg, named_bits(&g))
}

#[test]
fn two_and_four_chunks_give_bit_identical_losses_and_gradients() {
    for tie in [false, true] {
        let model = Model::new(ModelConfig::from_plan(&plan(tie, EVERYTHING)).unwrap()).unwrap();
        let p = model.init_params().unwrap();
        let (ids, tg) = batch(2, 6, 13, 4);
        let (wl, wlogits, wg) = whole(&model, &p, &ids, &tg);
        assert!(wg.iter().any(|(n, _)| n.contains("layers.3.depth_router")));
        for chunks in [1, 2, 4] {
            let (cl, clogits, cg) = chunked(&model, &p, &ids, &tg, chunks);
            assert_eq!(wl, cl, "loss parts, {chunks} chunks, tie {tie}");
            assert_eq!(wlogits, clogits, "logits, {chunks} chunks");
            assert_eq!(wg.len(), cg.len());
            for ((wn, wv), (cn, cv)) in wg.iter().zip(&cg) {
                assert_eq!(wn, cn);
                assert!(
                    wv == cv,
                    "{wn}: gradient differs with {chunks} chunks (tie {tie})"
                );
            }
        }
    }
}

#[test]
fn chunk_params_use_global_names_and_list_shared_parameters() {
    let model = Model::new(ModelConfig::from_plan(&plan(true, EVERYTHING)).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let specs = ChunkSpec::even(4, 2).unwrap();
    let cps = p.split(&specs).unwrap();
    let second = cps[1].names();
    assert!(second
        .iter()
        .any(|n| n == "model.layers.2.input_layernorm.weight"));
    assert!(!second.iter().any(|n| n.starts_with("model.layers.0.")));
    assert!(second.iter().any(|n| n.starts_with("mtp.layers.0.")));
    // Tied head and MTP read the embedding on the head chunk too.
    assert_eq!(
        shared_params(&cps),
        vec![SharedParam {
            name: "model.embed_tokens.weight".into(),
            chunks: vec![0, 1]
        }]
    );
    // Every name exactly once across the chunks, besides the shared one.
    let mut all: Vec<String> = cps.iter().flat_map(|c| c.names()).collect();
    all.sort();
    all.dedup();
    let mut want = Vec::new();
    p.visit(&mut |n, _, _| want.push(n.to_string()));
    want.sort();
    assert_eq!(all, want);
    // Untied without MTP: nothing is shared.
    let plain = Model::new(ModelConfig::from_plan(&plan(false, "")).unwrap()).unwrap();
    let pp = plain.init_params().unwrap();
    assert!(shared_params(&pp.split(&ChunkSpec::even(4, 4).unwrap()).unwrap()).is_empty());
    // Summing shared gradients: join(Sum) adds the copies.
    let g = ModelParams::join(cps.clone(), Shared::Sum).unwrap();
    let twice = p.embed_tokens.scale(2.0).unwrap();
    assert_eq!(bits(&g.embed_tokens), bits(&twice));
}

#[test]
fn out_of_contract_chunk_calls_are_named_errors() {
    let model = Model::new(ModelConfig::from_plan(&plan(false, EVERYTHING)).unwrap()).unwrap();
    let p = model.init_params().unwrap();
    let (ids, tg) = batch(2, 6, 13, 4);
    let specs = ChunkSpec::even(4, 2).unwrap();
    let cps = p.split(&specs).unwrap();
    let first = model.chunk(specs[0].clone()).unwrap();
    let second = model.chunk(specs[1].clone()).unwrap();
    let mut store = ActivationStore::new();
    let mut g = cps[0].clone();
    let e = first
        .backward_weight_micro_batch(&mut store, 2, &mut g)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("micro-batch 2") && e.contains("backward_weight"),
        "{e}"
    );
    let e = second
        .forward(&cps[1], &ids, &tg, None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("carry"), "{e}");
    let e = second
        .forward(&cps[0], &ids, &tg, None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers"), "{e}");
    first
        .forward_micro_batch(&mut store, 1, &cps[0], &ids, &tg, None, 0)
        .unwrap();
    let e = first
        .forward_micro_batch(&mut store, 1, &cps[0], &ids, &tg, None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("micro-batch 1"), "{e}");
    for bad in [
        ChunkSpec {
            layers: 1..4,
            embed: true,
            head: true,
        },
        ChunkSpec {
            layers: 0..3,
            embed: true,
            head: true,
        },
        ChunkSpec {
            layers: 0..5,
            embed: false,
            head: false,
        },
    ] {
        assert!(model.chunk(bad).is_err());
    }
    assert!(ChunkSpec::even(4, 5).is_err());
    assert!(ChunkSpec::even(4, 0).is_err());
    let mut gaps = ChunkSpec::even(4, 2).unwrap();
    gaps[1].layers = 3..4;
    assert!(p.split(&gaps).is_err());
}
