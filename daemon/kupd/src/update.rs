//! One update: the `org.kup.Update1` object and the task that runs the engine behind it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kup_dbus::{ACTION_UPDATE, KupError};
use kup_dbus::{FinishedUpdate, phase};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use zbus::message::Header;
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::{Connection, OwnedObjectPath, interface};

use crate::engine::{EngineError, Plan};
use crate::manager::Shared;

/// The state of one update, served at `/org/kup/Manager1/update/N`.
#[derive(Clone)]
pub struct UpdateObject {
    phase: String,
    percentage: u32,
    target: String,
    message: String,
    /// Set by `Cancel`; the engine stops at its next stage boundary before the switch.
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl fmt::Debug for UpdateObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateObject")
            .field("phase", &self.phase)
            .field("percentage", &self.percentage)
            .field("target", &self.target)
            .field("message", &self.message)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl UpdateObject {
    /// A freshly planned update to `target`.
    #[must_use]
    pub(crate) fn new(target: &str, shared: Arc<Shared>) -> Self {
        Self {
            phase: phase::PLANNED.to_owned(),
            percentage: 0,
            target: target.to_owned(),
            message: String::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            shared,
        }
    }
}

#[interface(name = "org.kup.Update1")]
impl UpdateObject {
    /// Current phase: planned, then the engine's stages, then done or failed.
    #[zbus(property)]
    fn phase(&self) -> String {
        self.phase.clone()
    }

    /// Progress of the whole update, 0 to 100.
    #[zbus(property)]
    fn percentage(&self) -> u32 {
        self.percentage
    }

    /// Target kernel release.
    #[zbus(property)]
    fn target(&self) -> String {
        self.target.clone()
    }

    /// Empty while running; the result once finished.
    #[zbus(property)]
    fn message(&self) -> String {
        self.message.clone()
    }

    /// Stops the update at its next stage boundary before the switch; it then finishes with
    /// Finished(false, ...) in phase "cancelled" and every service runs on. Refused once the
    /// update is in phase "switch" or has finished. Needs polkit action org.kup.update.
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), KupError> {
        self.shared.authorize(conn, &header, ACTION_UPDATE).await?;
        if phase::is_terminal(&self.phase) {
            return Err(KupError::Refused(format!(
                "kupd: the update to kernel {} has already ended ({}): there is nothing to cancel",
                self.target, self.phase
            )));
        }
        if self.phase == phase::SWITCH {
            return Err(KupError::Refused(format!(
                "kupd: the update to kernel {} is in phase switch: the machine is already \
                 switching kernel and it can no longer be cancelled; wait for it (kupctl status)",
                self.target
            )));
        }
        self.cancel.store(true, Ordering::SeqCst);
        info!(kup_target = %self.target, kup_phase = %self.phase, "update cancellation requested");
        Ok(())
    }

    /// Emitted on each progress report of the engine.
    #[zbus(signal)]
    async fn progress(
        emitter: &SignalEmitter<'_>,
        phase: &str,
        percentage: u32,
    ) -> zbus::Result<()>;

    /// Emitted once when the update ends.
    #[zbus(signal)]
    async fn finished(
        emitter: &SignalEmitter<'_>,
        success: bool,
        message: &str,
    ) -> zbus::Result<()>;
}

/// The number N of an update object `/org/kup/Manager1/update/N` (journal field KUP_UPDATE_ID).
pub(crate) fn update_id(path: &OwnedObjectPath) -> &str {
    path.as_str().rsplit('/').next().unwrap_or_default()
}

/// Runs `plan` on a blocking thread and mirrors its progress onto the object at `path`.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    conn: Connection,
    path: OwnedObjectPath,
    plan: Plan,
) {
    let target = plan.target.clone();
    let iface = match conn
        .object_server()
        .interface::<_, UpdateObject>(&path)
        .await
    {
        Ok(iface) => iface,
        Err(err) => {
            error!(kup_update = %path, kup_update_id = update_id(&path), kup_error = %err, "update object vanished before the engine started");
            shared.finish(FinishedUpdate {
                path: path.to_string(),
                target,
                success: false,
                message: format!(
                    "kupd lost its own update object {path} ({err}); nothing was touched: \
                     report this bug with journalctl -u kupd"
                ),
            });
            return;
        }
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u32)>();
    let engine = Arc::clone(&shared.engine);
    let cancel = Arc::clone(&iface.get().await.cancel);
    // What the engine logs (per unit: `unit` -> UNIT=, `kup_phase` -> KUP_PHASE=) carries the
    // update's id and target too: `journalctl -u kupd KUP_UPDATE_ID=1 UNIT=memcached.service`.
    let span = tracing::info_span!(
        "update",
        kup_update_id = update_id(&path),
        kup_target = %target
    );
    let job = tokio::task::spawn_blocking(move || {
        let _in_update = span.enter();
        let progress = move |phase: &str, percentage: u32| {
            // The receiver lives until this closure is dropped; a send cannot fail before.
            let _ = tx.send((phase.to_owned(), percentage.min(100)));
        };
        let cancelled = move || cancel.load(Ordering::SeqCst);
        engine.run_cancellable(plan, &progress, &cancelled)
    });

    while let Some((phase, percentage)) = rx.recv().await {
        info!(kup_update = %path, kup_update_id = update_id(&path), kup_phase = %phase, kup_percentage = percentage, "update progress");
        shared.progress(&phase, percentage);
        report(&iface, &phase, percentage).await;
    }

    let mut cancelled = false;
    let (success, message) = match job.await {
        Ok(Ok(())) => (
            true,
            format!("kupd: the update to kernel {target} is done; the machine switches to it"),
        ),
        Ok(Err(err @ EngineError::Cancelled(_))) => {
            cancelled = true;
            (false, err.to_string())
        }
        Ok(Err(err @ (EngineError::Refused(_) | EngineError::Failed(_)))) => {
            (false, err.to_string())
        }
        Err(err) => (
            false,
            format!(
                "kupd: the update engine crashed ({err}); the update to {target} stopped before \
                 the switch: see journalctl -u kupd and report the bug"
            ),
        ),
    };
    if success {
        info!(kup_update = %path, kup_update_id = update_id(&path), kup_target = %target, "update finished");
    } else {
        warn!(kup_update = %path, kup_update_id = update_id(&path), kup_target = %target, kup_reason = %message, "update failed");
    }
    shared.finish(FinishedUpdate {
        path: path.to_string(),
        target,
        success,
        message: message.clone(),
    });
    conclude(&iface, success, cancelled, &message).await;
}

/// Sets Phase and Percentage, signals the changes, then emits Progress.
async fn report(iface: &InterfaceRef<UpdateObject>, phase: &str, percentage: u32) {
    let (phase_changed, percentage_changed) = {
        let mut obj = iface.get_mut().await;
        let changed = (obj.phase != phase, obj.percentage != percentage);
        phase.clone_into(&mut obj.phase);
        obj.percentage = percentage;
        changed
    };
    let emitter = iface.signal_emitter();
    let obj = iface.get().await;
    let mut result = Ok(());
    if phase_changed {
        result = result.and(obj.phase_changed(emitter).await);
    }
    if percentage_changed {
        result = result.and(obj.percentage_changed(emitter).await);
    }
    drop(obj);
    result = result.and(UpdateObject::progress(emitter, phase, percentage).await);
    if let Err(err) = result {
        warn!(kup_update = %emitter.path(), kup_error = %err, "could not signal update progress");
    }
}

/// Moves the object to its terminal phase and emits Finished.
async fn conclude(
    iface: &InterfaceRef<UpdateObject>,
    success: bool,
    cancelled: bool,
    message: &str,
) {
    {
        let mut obj = iface.get_mut().await;
        obj.phase = if success {
            phase::DONE
        } else if cancelled {
            phase::CANCELLED
        } else {
            phase::FAILED
        }
        .to_owned();
        if success {
            obj.percentage = 100;
        }
        message.clone_into(&mut obj.message);
    }
    let emitter = iface.signal_emitter();
    let obj = iface.get().await;
    let result = async {
        obj.message_changed(emitter).await?;
        obj.percentage_changed(emitter).await?;
        obj.phase_changed(emitter).await?;
        UpdateObject::finished(emitter, success, message).await
    }
    .await;
    if let Err(err) = result {
        warn!(kup_update = %emitter.path(), kup_error = %err, "could not signal the end of the update");
    }
}
