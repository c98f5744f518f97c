#![no_std]
// This library target exists so `datalab-guard` can list this crate as a build-dependency
// (cargo then rebuilds the agent when the programs change). The programs are the `bin`.
