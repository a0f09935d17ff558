//! The flat buffers change no number: a trainer whose gradients are views of one flat buffer
//! and whose optimizer moments are views of two flat buffers (the default) gives the same
//! bits as one with a separate buffer per gradient and per moment (the layout before the
//! flat buffers), over 10 steps: every loss, gradient norm, final parameter and moment.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_model::GradBuffers;
use megamoe_optim::Optimizer;
use megamoe_plan::RawConfig;

use super::{Trainer, TrainerOptions, GRAD_BUCKET_ELEMS};
use crate::{DataSource, Tokenizer};

/// The layout tests' tiny MoE model (a dense and an MoE layer, gated shared expert, aux and z
/// losses, expert bias), run with 2 micro-batches per step.
const CONFIG: &str = include_str!("../tests/fixtures/layout_moe.toml");

fn trainer(sets: &[&str]) -> Trainer {
    let sets: Vec<String> = std::iter::once("parallel.microbatches=2")
        .chain(sets.iter().copied())
        .map(str::to_string)
        .collect();
    let raw = RawConfig::from_toml_str_with_overrides(CONFIG, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let options = TrainerOptions {
        peak_flops: None,
        ..Default::default()
    };
    Trainer::new(&raw, data, options).unwrap()
}

/// Per step `(loss bits, grad-norm bits)`, then every parameter and state tensor as bits.
type Run = (Vec<(u64, u64)>, Vec<(String, Vec<u32>)>);

fn run(mut t: Trainer) -> Run {
    let steps = (0..10)
        .map(|_| {
            let m = t.step().unwrap();
            (m.loss.total.to_bits(), m.grad_norm.to_bits())
        })
        .collect();
    let bits = |x: &megamoe_tensor::Tensor| -> Vec<u32> {
        x.to_host_f32()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let mut tensors = Vec::new();
    t.params
        .visit(&mut |n, x, _| tensors.push((n.to_string(), bits(x))));
    t.optimizer
        .visit_state(&mut |k, x| tensors.push((k.to_string(), bits(x))));
    (steps, tensors)
}

fn flat_and_separate_give_the_same_bits(sets: &[&str]) {
    let flat = trainer(sets);
    assert!(flat.grads.flat().is_some(), "gradients in one flat buffer");
    let (first, second) = flat.optimizer.flat_state().expect("flat moments");
    assert!(first.is_write_through() && second.is_write_through());
    flat.optimizer.visit_state(&mut |k, x| {
        assert!(
            x.same_storage(first) || x.same_storage(second),
            "{k} is a view of a flat moment buffer"
        )
    });
    let mut separate = trainer(sets);
    separate.grads = GradBuffers::separate(&separate.params, GRAD_BUCKET_ELEMS).unwrap();
    let params = &separate.params;
    separate.optimizer = Optimizer::new(&separate.plan.optim, &mut |f| params.visit(f)).unwrap();
    assert!(separate.grads.flat().is_none() && separate.optimizer.flat_state().is_none());
    let (a, b) = (run(flat), run(separate));
    assert_eq!(a.0, b.0, "losses and gradient norms");
    assert_eq!(a.1.len(), b.1.len());
    for ((na, xa), (nb, xb)) in a.1.iter().zip(&b.1) {
        assert_eq!(na, nb);
        assert!(xa == xb, "{na}: bits differ after 10 steps");
    }
}

#[test]
fn flat_buffers_give_the_bits_of_separate_buffers_with_adamw() {
    flat_and_separate_give_the_same_bits(&["moe.capacity_factor=1.25"]);
}

#[test]
fn flat_buffers_give_the_bits_of_separate_buffers_with_muon() {
    flat_and_separate_give_the_same_bits(&["optim.name=\"muon\""]);
}
