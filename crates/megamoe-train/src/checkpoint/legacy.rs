//! Checkpoints of the layout before the fused expert bank. A swiglu expert bank was saved as
//! two tensors `…experts.gate_proj` and `…experts.up_proj`, `[E, F, H]` each (the parameter
//! and each of its optimizer moments alike); this version holds ONE `…experts.gate_up_proj
//! [E, 2F, H]`, each expert's gate rows followed by its up rows. Loading such a checkpoint
//! fuses every pair into the expected tensor: the values a fused run would hold (AdamW
//! moments and Muon momentum are per element, so they fuse like the weights). A pair that
//! does not fit (shapes) is left alone, and the load then fails naming the missing fused
//! tensor.

use std::collections::BTreeMap;

use super::{NamedTensor, TensorSpec};

const FUSED: &str = "experts.gate_up_proj";
const GATE: &str = "experts.gate_proj";
const UP: &str = "experts.up_proj";

/// Replaces, in `by_name`, each split gate/up pair by the fused tensor `expected` names.
pub(super) fn fuse_split_gate_up(
    by_name: &mut BTreeMap<String, NamedTensor>,
    expected: &[TensorSpec],
) {
    for spec in expected {
        if !spec.name.contains(FUSED) || by_name.contains_key(&spec.name) {
            continue;
        }
        let &[e, rows, h] = spec.shape.as_slice() else {
            continue;
        };
        let (gate, up) = (
            spec.name.replacen(FUSED, GATE, 1),
            spec.name.replacen(FUSED, UP, 1),
        );
        let half = [e, rows / 2, h];
        let fits = |n: &str| by_name.get(n).is_some_and(|t| t.shape == half);
        let block = rows / 2 * h;
        if rows % 2 != 0 || block == 0 || !fits(&gate) || !fits(&up) {
            continue;
        }
        let (Some(g), Some(u)) = (by_name.remove(&gate), by_name.remove(&up)) else {
            continue;
        };
        let mut data = Vec::with_capacity(g.data.len() + u.data.len());
        for (gb, ub) in g.data.chunks(block).zip(u.data.chunks(block)) {
            data.extend_from_slice(gb);
            data.extend_from_slice(ub);
        }
        by_name.insert(
            spec.name.clone(),
            NamedTensor::new(spec.name.clone(), spec.shape.clone(), data),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: Vec<usize>, data: Vec<f32>) -> (String, NamedTensor) {
        (name.to_string(), NamedTensor::new(name, shape, data))
    }

    #[test]
    fn a_split_pair_fuses_per_expert_and_a_misfit_stays() {
        let fused = "model.layers.1.mlp.experts.gate_up_proj";
        let moment = format!("exp_avg.{fused}");
        // 2 experts, F = 1, H = 2: gate [[1, 2]], [[3, 4]]; up [[5, 6]], [[7, 8]].
        let mut by_name: BTreeMap<String, NamedTensor> = [
            t(
                "model.layers.1.mlp.experts.gate_proj",
                vec![2, 1, 2],
                vec![1., 2., 3., 4.],
            ),
            t(
                "model.layers.1.mlp.experts.up_proj",
                vec![2, 1, 2],
                vec![5., 6., 7., 8.],
            ),
            t(
                "exp_avg.model.layers.1.mlp.experts.gate_proj",
                vec![2, 1, 2],
                vec![0.; 4],
            ),
            t(
                "exp_avg.model.layers.1.mlp.experts.up_proj",
                vec![2, 1, 3],
                vec![0.; 6],
            ),
        ]
        .into_iter()
        .collect();
        let spec = |name: &str| TensorSpec {
            name: name.to_string(),
            shape: vec![2, 2, 2],
        };
        fuse_split_gate_up(&mut by_name, &[spec(fused), spec(&moment)]);
        assert_eq!(
            by_name[fused].data,
            vec![1., 2., 5., 6., 3., 4., 7., 8.],
            "expert 0's gate and up rows, then expert 1's"
        );
        assert_eq!(by_name[fused].shape, vec![2, 2, 2]);
        assert!(!by_name.contains_key("model.layers.1.mlp.experts.gate_proj"));
        // The moment pair does not fit ([2, 1, 3] up): left for the named missing-tensor error.
        assert!(!by_name.contains_key(&moment));
        assert!(by_name.contains_key("exp_avg.model.layers.1.mlp.experts.up_proj"));
    }
}
