//! The kernel side as the agent sees it: the embedded object, the bpffs pin layout, typed
//! access to the maps, and installing (fresh, adopt, upgrade) and removing the programs.

pub mod install;
pub mod maps;
pub mod object;
pub mod pins;
pub mod testrun;

pub use install::{install, InstallOutcome, InstallRequest, Installed};
pub use maps::GuardMaps;
pub use pins::PinLayout;
