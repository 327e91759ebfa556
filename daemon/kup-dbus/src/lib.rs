//! The D-Bus contract between kupd and its clients: names, client proxies and JSON payloads.
//!
//! kupd serves `org.kup.Manager1` on the system bus. Each update it starts is an object
//! `/org/kup/Manager1/update/N` with interface `org.kup.Update1`, the way rpm-ostree and
//! PackageKit expose transactions. This crate holds everything both ends must agree on, so
//! kupd, kupctl and the tests cannot drift apart.

pub mod error;
pub mod names;
pub mod options;
pub mod phase;
pub mod proxy;
pub mod types;

pub use error::{KupError, PayloadError};
pub use names::*;
pub use proxy::{Manager1Proxy, Update1Proxy};
pub use types::{
    ActiveUpdate, DryRunReport, DryRunUnit, FallbackOf, FinishedUpdate, HandoffOutcome,
    StatusReport, UnitFailure, UnitReport,
};
