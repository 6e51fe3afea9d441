//! The `ferry` binary: parses the command line and hands over to `ferry_host`.

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = ferry_host::cli::run(ferry_host::cli::Cli::parse()) {
        // One line with the whole cause chain; no backtrace for operators.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
