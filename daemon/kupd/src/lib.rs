//! kupd: the kup system service, `org.kup.Manager1` on the system bus.
//!
//! It authorizes each caller with polkit, keeps one update at a time, publishes each update as
//! an `org.kup.Update1` object with progress signals, and leaves the work to an [`Engine`].

pub mod authority;
pub mod cli;
pub mod daemon;
pub mod engine;
pub mod kup_engine;
pub mod manager;
pub mod service;
pub mod update;

pub use authority::{Authority, AuthorityError, BoxFuture, Decision, PolkitAuthority};
pub use engine::{
    Engine, EngineError, OptionsError, Plan, UNLINKED_MESSAGE, UnlinkedEngine, UpdateOptions,
    default_engine,
};
pub use manager::Manager;
pub use service::{ServeError, serve};
pub use update::UpdateObject;
