//! The `megamoe` command-line tool: parse, run, map errors to exit codes
//! (0 ok, 1 stopped by a guard, 2 error). One module per subcommand.

mod args;
mod config_cmd;
mod plan_cmd;
mod probe_cmd;
mod report_cmd;
mod schedule_cmd;
mod train_cmd;
mod train_header;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// megamoe: plan, schedule and train Mixture-of-Experts transformers across devices.
///
/// Every command that takes --config also takes repeated --set section.key=value
/// overrides. Exit codes: 0 ok, 1 stopped by a guard (NaN, divergence), 2 error.
#[derive(Parser)]
#[command(name = "megamoe", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config and print the parallel layout, MoE capacity, FSDP
    /// shards and per-rank memory, before any device is used.
    Plan(plan_cmd::PlanArgs),
    /// Generate, validate and simulate a pipeline schedule (GPipe .. DualPipeV),
    /// print its actions, bubble and memory, or compare every kind.
    Schedule(schedule_cmd::ScheduleArgs),
    /// Run one layer forward and backward on named tensors (safetensors) and write
    /// every output and gradient, to check megamoe against a PyTorch layer.
    Probe(probe_cmd::ProbeArgs),
    /// Train on this machine's CPU (default: the built-in tiny MoE on built-in
    /// synthetic data), writing metrics, checkpoints and a summary to a run directory.
    Train(train_cmd::TrainArgs),
    /// Render a run directory's plots (SVG) and print its text summary.
    Report(report_cmd::ReportArgs),
    /// Print the effective run config (file + --set, defaults filled in), or
    /// with --defaults every key with its default and meaning.
    Config(config_cmd::ConfigCmdArgs),
}

/// Prints an error as one line (the context chain joined by ": ") and returns exit code 2.
fn fail(err: anyhow::Error) -> ExitCode {
    let msg = err
        .chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ");
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan_cmd::run(&args),
        Command::Schedule(args) => schedule_cmd::run(&args),
        Command::Probe(args) => probe_cmd::run(&args),
        Command::Train(args) => train_cmd::run(&args),
        Command::Report(args) => report_cmd::run(&args),
        Command::Config(args) => config_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => fail(err),
    }
}
