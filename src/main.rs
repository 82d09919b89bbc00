//! The `axcompress` binary: parse the command line and dispatch. Errors are printed on one line
//! and exit with status 1; a run that wrote its output but cannot vouch for `max_drop` exits with
//! status 3.

use clap::Parser;

use axcompress::cli::{Cli, Command};
use axcompress::commands;
use axcompress::pipeline::{FloorMissed, EXIT_FLOOR_MISSED};

fn main() {
    let cli = Cli::parse();
    if let Err(err) = axcompress::interrupt::install() {
        eprintln!("warning: {err:#}; Ctrl-C will stop without cleaning up");
    }
    axcompress::threads::configure(cli.threads);
    axcompress::memory::configure(cli.memory_limit);
    let result = axcompress::threads::on_pool(|| dispatch(&cli));
    axcompress::interrupt::yield_to_stop();
    if let Err(err) = result {
        // One line: the context chain; a backtrace some libraries append goes on later lines.
        let text = format!("{err:#}");
        eprintln!("error: {}", text.lines().next().unwrap_or_default());
        let missed = err.downcast_ref::<FloorMissed>().is_some();
        std::process::exit(if missed { EXIT_FLOOR_MISSED } else { 1 });
    }
}

/// Runs the command.
fn dispatch(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Eval(args) => commands::eval::run(args, cli),
        Command::Inspect(args) => commands::inspect::run(args, cli),
        Command::Analyze(args) => commands::analyze::run(args, cli),
        Command::Export(args) => commands::export::run(args, cli),
        Command::Prune(args) => commands::prune::run(args, cli),
        Command::Quantize(args) => commands::quantize::run(args, cli),
        Command::Attention(args) => commands::attention::run(args, cli),
        Command::Compress(args) => commands::compress::run(args, cli),
        Command::Bench(args) => commands::bench::run(args, cli),
    }
}
