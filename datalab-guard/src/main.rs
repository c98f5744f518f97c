//! The `datalab-guard` binary: parse, start logging, run the command, and turn an error into
//! one line on stderr and an exit code (2 for bad input, 1 otherwise).

// Functions of at most ~120 lines (clippy.toml), checked by `cargo xtask lint`.
#![warn(clippy::too_many_lines)]

use clap::Parser as _;
use datalab_guard::{
    commands::{self, check, controller, local, node, status, uninstall, Cli, Command},
    input,
};

fn main() {
    datalab_guard::memory::limit_arenas();
    let Cli { command, shared } = Cli::parse();
    commands::init_logging(shared.log_format);
    let result = match command {
        Command::Node(args) => node::run(&shared, &args),
        Command::Controller(args) => controller::run(&shared, &args),
        Command::Local(args) => local::run(&shared, &args),
        Command::Status(args) => status::run(&shared, &args),
        Command::Check => check::run(&shared),
        Command::Uninstall => uninstall::run(&shared),
    };
    if let Err(err) = result {
        // One line, whatever the causes print: an operator greps for it, and a multi-line
        // parser diagnostic (YAML, kubeconfig) would be cut apart by log collectors. The
        // whole cause chain, outermost first.
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        let line = chain
            .join(": ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("datalab-guard: error: {line}");
        std::process::exit(input::exit_code(&err));
    }
}
