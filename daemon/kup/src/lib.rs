//! kup: kernel updates that running services do not notice. The library with every stage's logic;
//! the binaries (kupd, kupctl, kup-restore) are shims over it.

pub mod config;
pub mod criu;
pub mod kexec;
pub mod manifest;
pub mod restore;
pub mod stage;
pub mod systemd;
pub mod update;
