//! The `org.kup.Manager1` object: authorization, one update at a time, status.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kup_dbus::{
    ACTION_UPDATE, ActiveUpdate, FinishedUpdate, KupError, UnitReport, phase, update_path,
};
use tracing::{info, warn};
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};
use zbus_polkit::policykit1::Subject;

use crate::authority::{Authority, Decision};
use crate::engine::{Engine, UpdateOptions};
use crate::update::{UpdateObject, drive, update_id};

/// State shared by the manager object and the running update.
pub(crate) struct Shared {
    pub(crate) engine: Arc<dyn Engine>,
    authority: Arc<dyn Authority>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Number of the last update started (the first is 1).
    last_id: u64,
    active: Option<ActiveUpdate>,
    last: Option<FinishedUpdate>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one ever did, the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the single update slot, or says which update holds it.
    fn claim(self: &Arc<Self>, target: &str) -> Result<Slot, KupError> {
        let mut state = self.state();
        if let Some(active) = &state.active {
            return Err(KupError::Busy(format!(
                "kupd: an update is already running ({}, target {}, phase {}): wait for it to \
                 finish (kupctl status) and try again",
                active.path,
                display_target(&active.target),
                active.phase
            )));
        }
        state.last_id += 1;
        let id = state.last_id;
        let path = update_path(id);
        state.active = Some(ActiveUpdate {
            path: path.to_string(),
            target: target.to_owned(),
            phase: phase::PLANNED.to_owned(),
            percentage: 0,
        });
        Ok(Slot {
            shared: Arc::clone(self),
            path,
            armed: true,
        })
    }

    /// Records a progress report of the running update.
    pub(crate) fn progress(&self, phase: &str, percentage: u32) {
        if let Some(active) = &mut self.state().active {
            phase.clone_into(&mut active.phase);
            active.percentage = percentage;
        }
    }

    /// Checks polkit `action` for the sender of `header`.
    pub(crate) async fn authorize(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        action: &str,
    ) -> Result<(), KupError> {
        let subject = Subject::new_for_message_header(header).map_err(|err| {
            KupError::Failed(format!(
                "kupd cannot tell who is calling ({err}); call kupd over the system bus"
            ))
        })?;
        let decision = self
            .authority
            .check(&subject, action)
            .await
            .map_err(|err| KupError::Failed(err.to_string()))?;
        if decision == Decision::Allowed {
            return Ok(());
        }
        let who = describe_caller(conn, header).await;
        warn!(kup_caller = %who, kup_action = action, kup_decision = ?decision, "refused an unauthorized caller");
        let why = match decision {
            Decision::NotAuthenticated => {
                " (authentication was required and did not succeed; run it as root, or from a \
                 session with a polkit agent, e.g. under pkttyagent)"
            }
            Decision::Allowed | Decision::Denied => "",
        };
        Err(KupError::NotAuthorized(format!(
            "kupd: {who} is not authorized to use {action}{why}: ask an administrator to grant \
             {action} (polkit rule)"
        )))
    }

    /// Frees the slot and remembers how the update ended.
    pub(crate) fn finish(&self, finished: FinishedUpdate) {
        let mut state = self.state();
        state.active = None;
        state.last = Some(finished);
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("state", &*self.state())
            .finish_non_exhaustive()
    }
}

/// The update slot while an `Update` call plans; frees itself unless the update starts.
struct Slot {
    shared: Arc<Shared>,
    path: OwnedObjectPath,
    armed: bool,
}

impl Slot {
    /// The update started: the slot now belongs to its task, which frees it at the end.
    fn started(mut self, target: &str) {
        if let Some(active) = &mut self.shared.state().active {
            target.clone_into(&mut active.target);
        }
        self.armed = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.shared.state().active = None;
        }
    }
}

fn display_target(target: &str) -> &str {
    if target.is_empty() {
        "the newest installed kernel"
    } else {
        target
    }
}

/// The manager object served at `/org/kup/Manager1`.
pub struct Manager {
    shared: Arc<Shared>,
}

impl Manager {
    /// A manager that runs updates with `engine` and checks callers with `authority`.
    #[must_use]
    pub fn new(engine: Arc<dyn Engine>, authority: Arc<dyn Authority>) -> Self {
        Self {
            shared: Arc::new(Shared {
                engine,
                authority,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("shared", &self.shared)
            .finish()
    }
}

/// "caller :1.42 (uid 1000)", as far as the bus tells.
async fn describe_caller(conn: &Connection, header: &Header<'_>) -> String {
    let Some(sender) = header.sender() else {
        return String::from("a caller without a bus name");
    };
    let uid = match zbus::fdo::DBusProxy::new(conn).await {
        Ok(bus) => bus
            .get_connection_unix_user(sender.clone().into())
            .await
            .ok(),
        Err(_) => None,
    };
    match uid {
        Some(uid) => format!("caller {sender} (uid {uid})"),
        None => format!("caller {sender}"),
    }
}

#[interface(name = "org.kup.Manager1")]
impl Manager {
    /// Starts an update to kernel release `target` ("" = the newest installed or staged one)
    /// and returns its org.kup.Update1 object. Needs polkit action org.kup.update.
    async fn update(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        target: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, KupError> {
        let caller = header.sender().map(ToString::to_string).unwrap_or_default();
        info!(kup_caller = %caller, kup_target = %target, "Update requested");
        self.shared.authorize(conn, &header, ACTION_UPDATE).await?;
        let options = UpdateOptions::from_dbus(&options)
            .map_err(|err| KupError::InvalidArgs(err.to_string()))?;
        let slot = self.shared.claim(&target)?;

        let engine = Arc::clone(&self.shared.engine);
        let planned_target = target.clone();
        let plan = tokio::task::spawn_blocking(move || engine.plan(&planned_target, &options))
            .await
            .map_err(|err| {
                KupError::Failed(format!(
                    "kupd: the update engine crashed while planning the update to {} ({err}); \
                     nothing was touched: see journalctl -u kupd and report the bug",
                    display_target(&target)
                ))
            })?
            .map_err(|err| {
                warn!(kup_caller = %caller, kup_target = %target, kup_reason = %err, "Update refused");
                KupError::Refused(err.to_string())
            })?;

        let path = slot.path.clone();
        conn.object_server()
            .at(
                &path,
                UpdateObject::new(&plan.target, Arc::clone(&self.shared)),
            )
            .await
            .map_err(|err| {
                KupError::Failed(format!(
                    "kupd could not publish the update object {path} ({err}); nothing was \
                     touched: restart kupd (systemctl restart kupd) and try again"
                ))
            })?;
        slot.started(&plan.target);
        info!(kup_caller = %caller, kup_target = %plan.target, kup_update = %path, kup_update_id = update_id(&path), "update started");
        tokio::spawn(drive(
            Arc::clone(&self.shared),
            conn.clone(),
            path.clone(),
            plan,
        ));
        Ok(path)
    }

    /// Whether an update to `target` ("" = the newest installed or staged kernel) would be
    /// accepted now: (can, the resolved target, the reason when it cannot). Runs the checks of
    /// `Update` (stage, preflight) without touching anything and without authorization, so an
    /// updater can decide what to offer before it asks for a password.
    #[zbus(out_args("can", "target", "reason"))]
    async fn can_update(&self, target: String) -> Result<(bool, String, String), KupError> {
        if let Some(active) = &self.shared.state().active {
            return Ok((
                false,
                target,
                format!(
                    "kupd: an update is already running ({}, target {}, phase {}): wait for it \
                     to finish (kupctl status)",
                    active.path,
                    display_target(&active.target),
                    active.phase
                ),
            ));
        }
        let engine = Arc::clone(&self.shared.engine);
        let wanted = target.clone();
        let planned = tokio::task::spawn_blocking(move || {
            engine.plan(&wanted, &UpdateOptions::default())
        })
        .await
        .map_err(|err| {
            KupError::Failed(format!(
                "kupd: the update engine crashed while checking an update to {} ({err}): see \
                 journalctl -u kupd and report the bug",
                display_target(&target)
            ))
        })?;
        Ok(match planned {
            Ok(plan) => (true, plan.target, String::new()),
            Err(err) => (false, target, err.to_string()),
        })
    }

    /// A dry-run of an update to `target` ("" = the newest installed or staged kernel): each marked
    /// unit is checkpointed whole while it keeps running (it pauses for its dump), nothing is
    /// switched; returns a JSON DryRunReport. Needs polkit action org.kup.update; refused while an
    /// update runs.
    async fn dry_run(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        target: String,
    ) -> Result<String, KupError> {
        let caller = header.sender().map(ToString::to_string).unwrap_or_default();
        info!(kup_caller = %caller, kup_target = %target, "DryRun requested");
        self.shared.authorize(conn, &header, ACTION_UPDATE).await?;
        if let Some(active) = &self.shared.state().active {
            return Err(KupError::Busy(format!(
                "kupd: an update is already running ({}, target {}): a dry-run waits until it has finished (kupctl status)",
                active.path,
                display_target(&active.target)
            )));
        }
        let engine = Arc::clone(&self.shared.engine);
        let wanted = target.clone();
        let report = tokio::task::spawn_blocking(move || engine.dry_run(&wanted))
            .await
            .map_err(|err| {
                KupError::Failed(format!(
                    "kupd: the update engine crashed during the dry-run to {} ({err}): see \
                     journalctl -u kupd and report the bug",
                    display_target(&target)
                ))
            })?
            .map_err(|err| KupError::Refused(err.to_string()))?;
        Ok(report.to_json())
    }

    /// A JSON StatusReport: running kernel, default target, the running and the last update.
    async fn status(&self) -> Result<String, KupError> {
        let engine = Arc::clone(&self.shared.engine);
        let mut report = tokio::task::spawn_blocking(move || engine.status())
            .await
            .map_err(|err| {
                KupError::Failed(format!(
                    "kupd: the update engine crashed while reporting its status ({err}): see \
                     journalctl -u kupd and report the bug"
                ))
            })?;
        env!("CARGO_PKG_VERSION").clone_into(&mut report.daemon_version);
        let state = self.shared.state();
        report.active_update.clone_from(&state.active);
        report.last_update.clone_from(&state.last);
        Ok(report.to_json())
    }

    /// A JSON array of UnitReport: each marked unit and whether it can be checkpointed now.
    async fn units(&self) -> Result<String, KupError> {
        let engine = Arc::clone(&self.shared.engine);
        let units = tokio::task::spawn_blocking(move || engine.units())
            .await
            .map_err(|err| {
                KupError::Failed(format!(
                    "kupd: the update engine crashed while listing the marked units ({err}): see \
                     journalctl -u kupd and report the bug"
                ))
            })?;
        Ok(UnitReport::list_to_json(&units))
    }
}
