//! `megamoe probe moe`: one MoE layer forward and backward on named tensors from a
//! safetensors file, every output and gradient written to another — so anyone can check
//! megamoe against their PyTorch/Megatron layer (tensor names: docs/moe.md, "Probe interface").

use crate::args::ConfigArgs;
use anyhow::Context;
use clap::{Args, Subcommand};
use megamoe_moe::{run_probe, MoeConfig};
use megamoe_plan::{MemoryLimit, Plan};
use megamoe_tensor::{load_safetensors, save_safetensors};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Flags of `megamoe probe`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub target: ProbeTarget,
}

/// What to probe.
#[derive(Debug, Clone, Subcommand)]
pub enum ProbeTarget {
    /// One MoE layer: reads x, dy and the layer's weights, writes y, aux_loss, z_loss,
    /// tokens_per_expert, dropped, dx and grad.<param> for every parameter.
    #[command(after_long_help = MOE_LONG_HELP)]
    Moe(MoeProbeArgs),
}

/// Flags of `megamoe probe moe`.
#[derive(Debug, Clone, Args)]
pub struct MoeProbeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Input tensors (safetensors, f32): x [T, d], dy [T, d] and the layer's weights.
    #[arg(long, value_name = "IN.safetensors")]
    pub tensors: PathBuf,

    /// Where to write the outputs and gradients (safetensors, f32).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

/// Shown by `megamoe probe moe --help`.
const MOE_LONG_HELP: &str = "\
Inputs (PyTorch Linear layout, experts stacked on dim 0, all f32):
  x [T, d], dy [T, d], router.weight [E, d], router.null_weight [1, d] (null slots),
  router.expert_bias [E] (moe.expert_bias), experts.gate_proj [E, h, d] (swiglu),
  experts.up_proj [E, h, d], experts.down_proj [E, d, h],
  shared_experts.gate_proj/up_proj [hs, d], shared_experts.down_proj [d, hs],
  shared_expert_gate.weight [1, d].
Outputs: y, aux_loss [1], z_loss [1] (unweighted), tokens_per_expert [E], dropped [1],
  dx, grad.<param> of L = sum(y * dy) + aux_loss_weight*aux + z_loss_weight*z.
T must be a multiple of model.seq_len. A missing tensor or a wrong shape or dtype
prints `error: tensor `<name>`: expected .., got ..` and exits 2.

Example:
  megamoe probe moe --config C.toml --tensors IN.safetensors --out OUT.safetensors
  python3 tools/reference/moe_reference.py compare REF.safetensors OUT.safetensors";

/// Runs `megamoe probe <target>`.
pub fn run(args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    match &args.target {
        ProbeTarget::Moe(a) => run_moe(a),
    }
}

fn run_moe(a: &MoeProbeArgs) -> anyhow::Result<ExitCode> {
    check_out_is_not_input(&a.tensors, &a.out)?;
    let raw = a.config.load()?;
    let plan = match MemoryLimit::host_ram() {
        Some(ram) => Plan::resolve_within(&raw, None, &ram),
        None => Plan::resolve(&raw, None),
    }
    .with_context(|| format!("config {}", a.config.source_name()))?;
    let cfg = MoeConfig::from_plan(&plan)?;
    let inputs = load_safetensors(&a.tensors)?;
    let (_, unused) = megamoe_moe::check_probe_inputs(&cfg, &inputs)?;
    for name in unused {
        eprintln!("warning: input tensor `{name}` is not used by this config");
    }
    for warning in non_finite_inputs(&inputs)? {
        eprintln!("warning: {warning}");
    }
    let outputs = run_probe(&cfg, &inputs)?;
    let named: Vec<(&str, &megamoe_tensor::Tensor)> =
        outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&a.out, &named)?;
    println!("wrote {} tensors to {}", outputs.len(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Refuses `--out` naming the `--tensors` file (the same file after resolving
/// links and `..`, or a hard link to it): writing would destroy the input.
fn check_out_is_not_input(tensors: &Path, out: &Path) -> anyhow::Result<()> {
    let (Ok(input), Ok(output)) = (std::fs::metadata(tensors), std::fs::metadata(out)) else {
        return Ok(()); // --out does not exist yet (or --tensors is missing: load reports it)
    };
    let same_path = tensors.canonicalize().ok() == out.canonicalize().ok();
    #[cfg(unix)]
    let same_inode = {
        use std::os::unix::fs::MetadataExt;
        (input.dev(), input.ino()) == (output.dev(), output.ino())
    };
    #[cfg(not(unix))]
    let same_inode = {
        let _ = (input, output);
        false
    };
    anyhow::ensure!(
        !(same_path || same_inode),
        "--out {} is the --tensors input file; writing would overwrite it (choose another --out)",
        out.display()
    );
    Ok(())
}

/// One line per input tensor holding NaN or ±inf: its name, how many, and the first.
fn non_finite_inputs(inputs: &[(String, megamoe_tensor::Tensor)]) -> anyhow::Result<Vec<String>> {
    let tensors: Vec<&megamoe_tensor::Tensor> = inputs.iter().map(|(_, t)| t).collect();
    let values = megamoe_tensor::Tensor::to_host_batch_f32(&tensors)?;
    Ok(inputs
        .iter()
        .zip(values)
        .filter_map(|((name, _), v)| {
            let count = v.iter().filter(|x| !x.is_finite()).count();
            let (i, first) = v.iter().enumerate().find(|(_, x)| !x.is_finite())?;
            Some(format!(
                "input tensor `{name}` has {count} non-finite values (first at flat index {i}: {first}); outputs and gradients will not be finite"
            ))
        })
        .collect())
}
