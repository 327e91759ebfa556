//! kup: kernel updates that running services do not notice. The library with every stage's logic;
//! the binaries (kupd, kupctl, kup-restore) are shims over it.

pub mod bootloader;
pub mod config;
pub mod criu;
pub mod criu_image;
pub mod dryrun;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod fallback;
pub mod foam;
pub mod initrd;
pub mod install;
pub mod kexec;
pub mod lazy_pages;
pub mod logging;
pub mod luo;
pub mod luo_store;
pub mod manifest;
pub mod nft;
pub mod page_server;
pub mod qemu;
pub mod restore;
pub mod stage;
pub mod systemd;
pub mod tcp;
pub mod update;
pub mod watchdog;

/// An I/O failure with what kup was doing when it happened (shared by the stages' error types).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    pub what: String,
    pub source: std::io::Error,
}

/// `map_err` adapter: `std::fs::read(p).map_err(io(format!("reading {p}")))?`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoError {
    let what = what.into();
    move |source| IoError { what, source }
}
