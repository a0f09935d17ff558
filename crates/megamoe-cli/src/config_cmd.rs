//! `megamoe config`: print the effective run config (file + `--set`, every
//! default filled in), or with `--defaults` the reference of every key.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use megamoe_plan::keys;

use crate::args::ConfigArgs;

/// Flags of `megamoe config`.
#[derive(Debug, Clone, Args)]
pub struct ConfigCmdArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Print every key of a run config with its default and meaning (as a
    /// commented TOML file you can start from) instead of the effective config.
    #[arg(long)]
    pub defaults: bool,
}

/// Runs `megamoe config`.
pub fn run(args: &ConfigCmdArgs) -> anyhow::Result<ExitCode> {
    if args.defaults {
        if args.config.config.is_some() || !args.config.set.is_empty() {
            anyhow::bail!(
                "--defaults takes no --config or --set (it lists the defaults of every key)"
            );
        }
        print!("{}", keys::reference_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let raw = args.config.load()?;
    let text = toml::to_string(&raw).context("writing the config as TOML")?;
    println!(
        "# effective config of {} (every key not shown has the default from \
         `megamoe config --defaults`)",
        args.config.source_name()
    );
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
