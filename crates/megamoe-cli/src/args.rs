//! Flags shared by every command that takes a config: `--config` and repeated
//! `--set section.key=value`, turned into a [`RawConfig`].

use anyhow::Context;
use clap::Args;
use megamoe_plan::{RawConfig, TINY_CONFIG};
use std::path::PathBuf;

/// `--config F [--set section.key=value]...`
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Run config (TOML). Default: the built-in tiny CPU config (configs/tiny.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Override one key, e.g. `--set parallel.ep=2 --set moe.activation=gelu`.
    /// The value is parsed as TOML (a bare word that is not TOML is a string)
    /// and checked exactly like the file. Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The config name for headers: the path, or `tiny (built-in)`.
    pub fn source_name(&self) -> String {
        self.config.as_ref().map_or_else(
            || "tiny (built-in)".to_string(),
            |p| p.display().to_string(),
        )
    }

    /// Reads the config and applies the overrides.
    pub fn load(&self) -> anyhow::Result<RawConfig> {
        match &self.config {
            Some(path) => Ok(RawConfig::from_path(path, &self.set)?),
            None => RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &self.set)
                .context("built-in tiny config"),
        }
    }
}
