//! What the CPU trainer runs, checked before any work: a config key the
//! trainer would otherwise ignore is refused with a named error, never run as
//! something else.

use megamoe_plan::{Plan, Precision, Recompute};

use crate::error::{Error, Result};

/// [`check_cpu_trainer_support`] for a trainer on `device`. On a GPU `train.dtype = "bf16"`
/// is accepted and means mixed precision (see [`numerics`]): activations and their
/// gradients stored bf16, bf16 GEMM operands, f32 accumulation, reductions, norms,
/// softmax and losses, f32 master weights, gradient accumulators and moments; the other
/// checks are the CPU's.
pub fn check_trainer_support(plan: &Plan, device: megamoe_tensor::Device) -> Result<()> {
    match gpu_plan(plan, device)? {
        None => check_cpu_trainer_support(plan),
        Some(p) => check_cpu_trainer_support(&p),
    }
}

/// [`check_cpu_numerics`] for a trainer (or one rank of one) on `device`, as
/// [`check_trainer_support`] treats `train.dtype`.
pub fn check_numerics(plan: &Plan, device: megamoe_tensor::Device) -> Result<()> {
    match gpu_plan(plan, device)? {
        None => check_cpu_numerics(plan),
        Some(p) => check_cpu_numerics(&p),
    }
}

/// On a GPU: sets its precision from `train.dtype` and returns the plan with the dtype the
/// remaining checks see (f32); `None` on the CPU.
fn gpu_plan(plan: &Plan, device: megamoe_tensor::Device) -> Result<Option<Plan>> {
    if device == megamoe_tensor::Device::Cpu {
        return Ok(None);
    }
    set_matmul_precision(device, plan.train.precision == Precision::Bf16)?;
    let mut p = plan.clone();
    p.train.precision = Precision::F32;
    // Offload runs on the GPU (checked here, never on the CPU).
    p.train.offload = megamoe_plan::OffloadTargets::default();
    Ok(Some(p))
}

#[cfg(feature = "cuda")]
fn set_matmul_precision(device: megamoe_tensor::Device, bf16: bool) -> Result<()> {
    if let megamoe_tensor::Device::Cuda(i) = device {
        let backend = megamoe_tensor::cuda::cuda_backend(i)?;
        backend.set_bf16_matmul(bf16);
        backend.set_bf16_activations(bf16);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn set_matmul_precision(device: megamoe_tensor::Device, _bf16: bool) -> Result<()> {
    // Names the missing backend (feature `cuda`) as a DeviceNotAvailable error.
    device.check_available()?;
    Ok(())
}

/// What `train.dtype` means for a trainer of `plan` on `device`, in words (the console
/// header, the run record of metrics.jsonl and the run summary print it).
pub fn numerics(plan: &Plan, device: megamoe_tensor::Device) -> &'static str {
    match (plan.train.precision, device) {
        (Precision::Bf16, megamoe_tensor::Device::Cuda(_)) => {
            "bf16 activations, gradients and GEMM operands; f32 accumulation, norms, softmax, \
             losses, master weights and moments"
        }
        (_, megamoe_tensor::Device::Cuda(_)) => "f32 everywhere (GEMMs without TF32)",
        _ => "f32",
    }
}

/// Refuses settings the single-process CPU trainer does not implement: a mesh
/// of more than one rank,
/// `train.dtype = "bf16"` (the CPU backend computes in f32 only) and
/// `train.recompute = "selective"` (only `none` and `full` exist).
pub fn check_cpu_trainer_support(plan: &Plan) -> Result<()> {
    if plan.mesh.world() != 1 {
        return Err(Error::TrainConfig {
            field: "parallel",
            value: {
                let m = plan.mesh;
                format!(
                    "(pp {} x dp {} x ep {} x cp {} x tp {})",
                    m.pp, m.dp, m.ep, m.cp, m.tp
                )
            },
            rule: "the single-process CPU trainer needs world size 1: set parallel.pp, dp, \
                   ep, cp and tp to 1, or run the layout's ranks as threads with \
                   `megamoe train --world N` (`megamoe plan` lays out multi-rank configs)"
                .to_string(),
        });
    }
    check_cpu_numerics(plan)
}

/// The part of [`check_cpu_trainer_support`] every rank of a distributed run checks too:
/// `train.dtype` f32 and `train.recompute` `none` or `full`.
pub fn check_cpu_numerics(plan: &Plan) -> Result<()> {
    if plan.train.precision != Precision::F32 {
        return Err(Error::TrainConfig {
            field: "train.dtype",
            value: format!("\"{}\"", plan.train.precision.name()),
            rule: "the CPU trainer computes in f32 only; set train.dtype = \"f32\" \
                   (bf16 is accepted by `megamoe plan` for memory planning)"
                .to_string(),
        });
    }
    if !plan.train.offload.is_empty() {
        return Err(Error::TrainConfig {
            field: "train.offload",
            value: plan.train.offload.to_string(),
            rule: "activation offload moves saved activations from GPU memory to pinned host \
                   memory; it needs --device cuda (on the CPU they are in host memory already): \
                   set train.offload = []"
                .to_string(),
        });
    }
    if plan.train.recompute == Recompute::Selective {
        return Err(Error::TrainConfig {
            field: "train.recompute",
            value: "\"selective\"".to_string(),
            rule: "the CPU trainer implements \"none\" and \"full\" (keep each block's input, \
                   recompute the block in backward); selective recompute is not implemented"
                .to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_plan::{RawConfig, TINY_CONFIG};

    fn plan_with(set: &str) -> Plan {
        let raw = RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &[set.to_string()]).unwrap();
        Plan::resolve(&raw, Some(1)).unwrap()
    }

    #[test]
    fn bf16_is_refused_naming_train_dtype() {
        let err = check_cpu_trainer_support(&plan_with("train.dtype=\"bf16\"")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("train.dtype=\"bf16\" is not supported"),
            "{msg}"
        );
    }

    #[test]
    fn offload_is_refused_on_the_cpu_naming_train_offload() {
        let err = check_cpu_trainer_support(&plan_with("train.offload=[\"mlp\", \"moe\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("train.offload=[mlp, moe]"), "{err}");
        assert!(err.contains("--device cuda"), "{err}");
        // An unknown target is a config error naming the known ones.
        let raw = RawConfig::from_toml_str_with_overrides(
            TINY_CONFIG,
            &["train.offload=[\"attention\"]".to_string()],
        );
        let msg = format!("{:?}", raw.map(|_| ()));
        assert!(msg.contains("qkv_linear"), "{msg}");
    }

    #[test]
    fn selective_recompute_is_refused_naming_train_recompute() {
        let err =
            check_cpu_trainer_support(&plan_with("train.recompute=\"selective\"")).unwrap_err();
        assert!(
            err.to_string().starts_with("train.recompute=\"selective\""),
            "{err}"
        );
    }

    #[test]
    fn a_multi_rank_mesh_is_refused_naming_parallel_not_a_flag() {
        let raw =
            RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &["parallel.dp=2".to_string()])
                .unwrap();
        let plan = Plan::resolve(&raw, None).unwrap();
        let msg = check_cpu_trainer_support(&plan).unwrap_err().to_string();
        assert!(msg.starts_with("parallel="), "{msg}");
        assert!(msg.contains("world size 1"), "{msg}");
        assert!(!msg.contains("--devices"), "{msg}");
    }

    #[test]
    fn f32_with_no_or_full_recompute_is_accepted() {
        check_cpu_trainer_support(&plan_with("train.recompute=\"none\"")).unwrap();
        check_cpu_trainer_support(&plan_with("train.recompute=\"full\"")).unwrap();
    }
}
