//! The `megamoe` command-line tool: parse, run, map errors to exit codes
//! (0 ok, 1 stopped by a guard, 2 error). One module per subcommand.

mod args;
mod bench_attention;
mod bench_cmd;
mod bench_step;
mod config_cmd;
mod plan_cmd;
mod plan_tp;
mod probe_cmd;
mod report_cmd;
mod schedule_cmd;
mod train_cmd;
mod train_header;
mod train_mpi;
mod train_world;

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
    /// Time a layer on the GPU (build with --features cuda): `megamoe bench moe`.
    Bench(bench_cmd::BenchArgs),
}

/// Prints an error as one line and returns exit code 2: the context chain joined
/// by ": " (a cause whose text its parent already ends with is not repeated), line
/// breaks of any kind turned into spaces, and any word longer than
/// [`MAX_WORD_CHARS`] (a huge value echoed back) elided in the middle.
fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(&err));
    ExitCode::from(2)
}

/// Longest word of an error line printed whole.
const MAX_WORD_CHARS: usize = 120;

/// See [`fail`].
fn one_line(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain().map(|e| e.to_string()) {
        if msg.ends_with(&cause) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&cause);
    }
    msg.split(['\n', '\r'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .split(' ')
        .map(elide)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `word` itself, or its first and last characters around "…(N chars)…".
fn elide(word: &str) -> std::borrow::Cow<'_, str> {
    let n = word.chars().count();
    if n <= MAX_WORD_CHARS {
        return word.into();
    }
    let head: String = word.chars().take(60).collect();
    let tail: String = word.chars().skip(n - 30).collect();
    format!("{head}…({n} chars)…{tail}").into()
}

/// Tells glibc's allocator to keep freed memory for reuse instead of returning it to the
/// kernel. By default a freed buffer above the (adaptive) mmap threshold is unmapped and a
/// heap top above 2x that threshold is trimmed, so the next step's tensors of the same size
/// page-fault and get zeroed again: about a fifth of the CPU time of `megamoe train` went to
/// page faults. The process keeps its peak heap instead (what one step needs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan_cmd::run(&args),
        Command::Schedule(args) => schedule_cmd::run(&args),
        // CPU kernels called from a compute thread skip the pool hand-off per op.
        Command::Probe(args) => megamoe_tensor::on_compute_threads(|| probe_cmd::run(&args)),
        // Thread ranks (`--world N > 1`) are threads of their own: a pool thread
        // parked waiting for them would leave their kernels one pool thread fewer.
        Command::Train(args) if args.world > 1 => train_cmd::run(&args),
        Command::Train(args) => megamoe_tensor::on_compute_threads(|| train_cmd::run(&args)),
        Command::Report(args) => report_cmd::run(&args),
        Command::Config(args) => config_cmd::run(&args),
        Command::Bench(args) => bench_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => fail(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_drops_repeated_causes_line_breaks_and_huge_words() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left");
        let err = anyhow::Error::new(io).context("write a: No space left");
        assert_eq!(one_line(&err), "write a: No space left");

        let huge = "x".repeat(5000);
        let err = anyhow::anyhow!("bad value {huge}\rnext\r\nline");
        let line = one_line(&err);
        assert!(line.starts_with("bad value xxx"), "{line}");
        assert!(line.contains("…(5000 chars)…"), "{line}");
        assert!(line.ends_with("x next line"), "{line}");
        assert!(line.chars().count() < 200, "{line}");
    }
}
