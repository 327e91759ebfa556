//! The kup lab: builds a cached Debian guest image, boots it under QEMU/TCG and drives it through an
//! agent, so tests can kexec real kernels and check the result from the host.
//!
//! Stages: [`recipe`] (pinned versions and the cache key) -> [`image`] (build or reuse the cached
//! image) -> [`vm`] (boot a copy-on-write overlay with the project's build, wait, stop; directly or
//! through UEFI firmware and systemd-boot, [`firmware`]) -> [`client`] (talk to the guest's [`agent`]
//! over the [`proto`] framing), with [`console`] watching for panics.

pub mod agent;
pub mod client;
pub mod console;
pub mod firmware;
pub mod image;
pub mod proto;
pub mod recipe;
pub mod vm;

/// The TCP port the agent listens on inside the guest (reached through a forwarded host port).
pub const AGENT_PORT: u16 = 7300;

/// Where the agent reads the shared secret the host put into the payload.
pub const GUEST_TOKEN_PATH: &str = "/etc/kup-lab/token";
