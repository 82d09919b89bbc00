//! One module per subcommand, each with a `run` entry point.

pub mod eval;
pub mod inspect;

use crate::cli::Cli;

/// Prints a human log line on stderr unless `--quiet`.
pub fn log(cli: &Cli, line: &str) {
    if !cli.quiet {
        eprintln!("{line}");
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
