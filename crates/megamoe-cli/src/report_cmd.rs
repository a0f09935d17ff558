//! `megamoe report RUN_DIR`: render the run's plots (SVG) and print its summary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use megamoe_train::render_report;

/// Flags of `megamoe report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// The run directory (holds metrics.jsonl); plots go to RUN_DIR/report/.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
}

/// Runs `megamoe report`.
pub fn run(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let summary = render_report(&args.run_dir)
        .with_context(|| format!("report {}", args.run_dir.display()))?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}
