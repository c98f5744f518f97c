use clap::Parser as _;
use datalab_guard::{cli, input};

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        // One line: the whole cause chain, outermost first.
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("datalab-guard: error: {}", chain.join(": "));
        std::process::exit(input::exit_code(&err));
    }
}
