//! The kernel side as the agent sees it: the embedded object, the bpffs pin layout, typed
//! access to the maps, installing (fresh, adopt, upgrade) and removing the programs, and the
//! session `local` and `node` run on top of an install.

pub mod edge;
pub mod install;
pub mod lsm;
pub mod maps;
pub mod object;
pub mod pins;
pub mod raw_paths;
pub mod session;
pub mod testrun;

pub use install::{install, InstallOutcome, InstallRequest, Installed};
pub use maps::GuardMaps;
pub use pins::PinLayout;
pub use session::{DatapathSettings, Session, StartRequest};
