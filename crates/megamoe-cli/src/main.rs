//! The `megamoe` command-line tool: parse, run, map errors to exit codes
//! (0 ok, 1 stopped by a guard, 2 error).

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// megamoe: plan, schedule and train Mixture-of-Experts transformers across devices.
#[derive(Parser)]
#[command(name = "megamoe", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
