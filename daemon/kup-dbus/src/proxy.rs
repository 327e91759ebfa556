//! Client proxies of `org.kup.Manager1` and `org.kup.Update1`.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, Variant, proxy};

/// The manager object `/org/kup/Manager1` of kupd.
#[proxy(
    interface = "org.kup.Manager1",
    default_service = "org.kup.Manager1",
    default_path = "/org/kup/Manager1"
)]
pub trait Manager1 {
    /// Starts an update to kernel release `target` (`""`: the newest installed or staged one)
    /// and returns its `org.kup.Update1` object. Options: see [`crate::options`].
    ///
    /// Fails with `org.kup.Error.NotAuthorized`, `Busy`, `Refused` or `InvalidArgs`.
    #[zbus(allow_interactive_auth)]
    fn update(
        &self,
        target: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;

    /// Whether an update to `target` would be accepted now, without authorization and without
    /// touching anything: (can, resolved target, reason when it cannot).
    fn can_update(&self, target: &str) -> zbus::Result<(bool, String, String)>;

    /// A dry-run of an update to `target` (`""`: the newest installed or staged one): each marked
    /// unit checkpointed whole while it keeps running, nothing switched; a
    /// [`crate::DryRunReport`] as JSON. Takes as long as the checkpoints (seconds per GiB).
    ///
    /// Fails with `org.kup.Error.NotAuthorized`, `Busy` or `Refused`.
    #[zbus(allow_interactive_auth)]
    fn dry_run(&self, target: &str) -> zbus::Result<String>;

    /// A [`crate::StatusReport`] as JSON.
    fn status(&self) -> zbus::Result<String>;

    /// The marked units as a JSON array of [`crate::UnitReport`].
    fn units(&self) -> zbus::Result<String>;
}

/// One update, `/org/kup/Manager1/update/N`; build it with `Update1Proxy::builder(..).path(..)`.
#[proxy(interface = "org.kup.Update1", default_service = "org.kup.Manager1")]
pub trait Update1 {
    /// Current phase (see [`crate::phase`]).
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;

    /// Progress of the whole update, 0 to 100.
    #[zbus(property)]
    fn percentage(&self) -> zbus::Result<u32>;

    /// Target kernel release (resolved: never empty).
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;

    /// Last message: empty while running, the result once finished.
    #[zbus(property)]
    fn message(&self) -> zbus::Result<String>;

    /// Stops the update before the switch (phase `cancelled`); refused in phase `switch`.
    #[zbus(allow_interactive_auth)]
    fn cancel(&self) -> zbus::Result<()>;

    /// Emitted on every progress report of the engine.
    #[zbus(signal)]
    fn progress(&self, phase: &str, percentage: u32) -> zbus::Result<()>;

    /// Emitted once, when the update ends (before the switch for a failure).
    #[zbus(signal)]
    fn finished(&self, success: bool, message: &str) -> zbus::Result<()>;
}
