//! `datalab-guard uninstall`: detach every program and remove every pin this tool made
//! under `--bpffs`. The only command that ends enforcement.

use std::path::Path;

use super::Shared;
use crate::bpf::{install::remove_all_pins, PinLayout};

pub fn run(shared: &Shared) -> anyhow::Result<()> {
    let bpffs: &Path = &shared.bpffs;
    let layout = PinLayout::new(bpffs);
    if !layout.root().exists() {
        println!("nothing installed under {}", bpffs.display());
        return Ok(());
    }
    let removed = remove_all_pins(&layout);
    for path in &removed {
        println!("removed {}", path.display());
    }
    if layout.root().exists() {
        anyhow::bail!(
            "{} still exists: something else is pinned there; left it in place",
            bpffs.display()
        );
    }
    println!(
        "uninstalled: {} pins removed, enforcement ended",
        removed.len()
    );
    Ok(())
}
