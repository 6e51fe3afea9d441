//! The `ferry` binary: parses the command line and hands over to `ferry_host`.

use clap::Parser;

fn main() {
    if let Err(e) = ferry_host::cli::run(ferry_host::cli::Cli::parse()) {
        // One line with the whole cause chain; no backtrace for operators.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
