use clap::Parser as _;
use datalab_guard::{commands, input};

fn main() {
    let args = commands::Cli::parse();
    if let Err(err) = commands::run(args) {
        // One line: the whole cause chain, outermost first.
        // One line, whatever the causes print: an operator greps for it, and a multi-line
        // parser diagnostic (YAML, kubeconfig) would be cut apart by log collectors.
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
