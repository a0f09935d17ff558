//! Sequence parallelism on thread ranks against the replicated tensor-parallel layout of
//! the same model: the same losses and gradients, and the residual-stream activations a
//! rank keeps per micro-batch divided by tp.

use std::sync::Arc;

use megamoe_comm::ThreadWorld;
use megamoe_moe::TensorParallel;
use megamoe_plan::Plan;

use crate::model::tests::batch;
use crate::{ActivationStore, ChunkSpec, Model, ModelConfig};

/// 3 layers (a dense first layer, MoE with a shared expert), 4 query and 2 KV heads, an
/// MTP head, `seq_len` tokens.
fn plan(seq_len: usize) -> Plan {
    let text = format!(
        "[model]\nvocab_size = 13\nd_model = 8\nn_layers = 3\nn_heads = 4\n\
        n_kv_heads = 2\nffn_hidden = 32\nseq_len = {seq_len}\ntie_embeddings = false\n\
        [moe]\nrouted_experts = 4\ntop_k = 2\nexpert_hidden = 8\nshared_experts = 1\n\
        shared_expert_hidden = 8\nfirst_dense_layers = 1\n\
        [mtp]\ndepth = 1\n\
        [train]\nglobal_batch = 3\nseed = 7\n"
    );
    Plan::from_toml_str(&text, &[], Some(1)).unwrap()
}

/// Per rank of a tp-rank group (sequence-parallel or not): the total loss, the residual
/// stream bytes of one stored micro-batch of 3 sequences, and every gradient.
type RankRun = (f32, u64, Vec<(String, Vec<f32>)>);

fn run(tp: usize, sp: bool) -> Vec<RankRun> {
    let plan = plan(8);
    ThreadWorld::new(tp)
        .unwrap()
        .run(|comm| -> crate::Result<RankRun> {
            let mut model = Model::new(ModelConfig::from_plan(&plan)?)?;
            model.set_tensor_parallel(TensorParallel::new(Arc::new(comm)))?;
            if sp {
                model.set_sequence_parallel()?;
                assert!(model.sequence_parallel());
            }
            let params = model.init_params()?;
            let (ids, tg) = batch(3, 8, 13, 1);
            let spec = ChunkSpec::whole(model.blocks.len());
            let chunk = model.chunk(spec.clone())?;
            let cp = params.split(std::slice::from_ref(&spec))?.remove(0);
            let mut store = ActivationStore::new();
            chunk.forward_micro_batch(&mut store, 0, &cp, &ids, &tg, None, 0)?;
            let bytes = store.residual_stream_bytes();
            let out = model.forward(&params, &ids, &tg, 0)?;
            let loss = out.losses.total.to_host_f32()?[0];
            let mut g = params.zeros_like()?;
            model.backward(&params, out.saved, &mut g, 1.0)?;
            let mut grads = Vec::new();
            g.visit(&mut |n, t, _| grads.push((n.to_string(), t.to_host_f32().unwrap())));
            Ok((loss, bytes, grads))
        })
        .unwrap()
}

#[test]
fn sequence_parallel_matches_tp_and_keeps_a_tp_th_of_the_residual_stream() {
    let tp = 2;
    let whole = run(tp, false);
    let sp = run(tp, true);
    for (r, ((l0, b0, g0), (l1, b1, g1))) in whole.iter().zip(&sp).enumerate() {
        assert!(
            (l0 - l1).abs() <= 1e-5 * l0.abs(),
            "rank {r}: loss {l1} vs {l0}"
        );
        // f32 norm inputs [N, H] and 1/rms [N]: two per block (3 blocks) and the final
        // norm, N = B·T = 3·8 replicated and B·T/tp under sp
        let (n, h) = (3 * 8, 8);
        assert_eq!(
            *b0,
            7 * 4 * (n * h + n) as u64,
            "rank {r}: replicated bytes"
        );
        assert_eq!(*b1 * tp as u64, *b0, "rank {r}: sequence-parallel bytes");
        assert_eq!(g0.len(), g1.len());
        for ((name, a), (name1, b)) in g0.iter().zip(g1) {
            assert_eq!(name, name1);
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale.max(1e-6),
                "rank {r} {name}: max diff {diff:e} (scale {scale:e})"
            );
        }
    }
}

#[test]
fn sequence_parallel_refuses_a_sequence_tp_does_not_divide() {
    let plan = plan(9);
    let failures = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> crate::Result<()> {
            let mut model = Model::new(ModelConfig::from_plan(&plan)?)?;
            model.set_tensor_parallel(TensorParallel::new(Arc::new(comm)))?;
            model.set_sequence_parallel()
        })
        .unwrap_err();
    assert!(failures.first.1.contains("model.seq_len"), "{failures}");
}
