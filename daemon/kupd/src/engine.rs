//! The seam between the D-Bus service and the update engine that does the work.
//!
//! kupd only speaks D-Bus, checks polkit and keeps one update at a time; everything that touches
//! kernels and services sits behind [`Engine`], so the real engine (crate `kup`) plugs in here
//! and the service is tested with a fake one.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use kup_dbus::options;
use kup_dbus::{DryRunReport, StatusReport, UnitReport};
use zbus::{OwnedVariant, Variant};

/// What kupd needs from the update engine.
pub trait Engine: Send + Sync + 'static {
    /// Resolves the target ("" = newest installed/staged) and checks everything that can be checked before touching a service. Err = refusal message shown to the caller.
    fn plan(&self, target: &str, options: &UpdateOptions) -> Result<Plan, EngineError>;
    /// Runs the update; calls progress(phase, percent) as it goes. Returns only on failure before the switch (on success the machine kexecs away).
    fn run(&self, plan: Plan, progress: &dyn Fn(&str, u32)) -> Result<(), EngineError>;
    /// [`Engine::run`] that stops with [`EngineError::Cancelled`] when `cancelled()` is true at a
    /// stage boundary before the switch (every service then runs on). The default checks once,
    /// before anything runs; engines with more boundaries override it.
    fn run_cancellable(
        &self,
        plan: Plan,
        progress: &dyn Fn(&str, u32),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), EngineError> {
        if cancelled() {
            return Err(EngineError::cancelled(&plan.target));
        }
        self.run(plan, progress)
    }
    /// The engine's part of `Manager1.Status` (kupd fills in its own fields).
    fn status(&self) -> StatusReport;
    /// The marked units and whether each can be checkpointed now (`Manager1.Units`).
    fn units(&self) -> Vec<UnitReport>;
    /// A dry-run of an update to `target` (`Manager1.DryRun`): every marked unit checkpointed
    /// while it keeps running, nothing switched. Err = refusal (nothing marked, no such kernel).
    fn dry_run(&self, target: &str) -> Result<DryRunReport, EngineError>;
}

/// An accepted update, handed from [`Engine::plan`] to [`Engine::run`].
///
/// `target` is what clients see (the `Target` property); `data` is the engine's own, opaque to
/// kupd (e.g. the staged kernel, the resolved command line, the units to checkpoint).
pub struct Plan {
    /// Resolved target kernel release; never empty.
    pub target: String,
    /// Engine-private data; read it back with [`Plan::data`] or [`Plan::into_data`].
    pub data: Box<dyn Any + Send>,
}

impl Plan {
    /// A plan with no engine data.
    #[must_use]
    pub fn new(target: impl Into<String>) -> Self {
        Self::with_data(target, ())
    }

    /// A plan carrying the engine's `data` to [`Engine::run`].
    #[must_use]
    pub fn with_data<T: Any + Send>(target: impl Into<String>, data: T) -> Self {
        Self {
            target: target.into(),
            data: Box::new(data),
        }
    }

    /// The engine data, if it is a `T`.
    #[must_use]
    pub fn data<T: Any>(&self) -> Option<&T> {
        self.data.downcast_ref()
    }

    /// Takes the engine data out, if it is a `T`; gives the plan back otherwise.
    ///
    /// # Errors
    /// The plan itself, when its data is not a `T`.
    pub fn into_data<T: Any>(self) -> Result<T, Self> {
        let Self { target, data } = self;
        match data.downcast::<T>() {
            Ok(data) => Ok(*data),
            Err(data) => Err(Self { target, data }),
        }
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The `options` of `Manager1.Update`, decoded (keys: [`kup_dbus::options`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateOptions {
    /// Extra kernel command line arguments for the target kernel (`"append"`).
    pub append: Option<String>,
}

impl UpdateOptions {
    /// Decodes the `a{sv}` of `Manager1.Update`, refusing unknown keys and mistyped values.
    ///
    /// # Errors
    /// [`OptionsError`] naming the key and what is expected instead.
    pub fn from_dbus(map: &HashMap<String, OwnedVariant>) -> Result<Self, OptionsError> {
        let mut opts = Self::default();
        for (key, value) in map {
            match key.as_str() {
                options::APPEND => {
                    let Variant::Str(s) = strip(value) else {
                        return Err(OptionsError::WrongType {
                            key: key.clone(),
                            expected: "s",
                            found: strip(value).value_signature().to_string(),
                        });
                    };
                    let s = s.as_str().trim();
                    opts.append = (!s.is_empty()).then(|| s.to_owned());
                }
                _ => return Err(OptionsError::UnknownKey { key: key.clone() }),
            }
        }
        Ok(opts)
    }
}

/// A variant nested in a variant (`v` holding `v`) reads as the inner one.
fn strip<'a>(value: &'a Variant<'a>) -> &'a Variant<'a> {
    match value {
        Variant::Variant(inner) => strip(inner),
        other => other,
    }
}

/// An `Update` options dictionary kupd does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A key kupd does not know.
    #[error(
        "kupd: unknown Update option '{key}': the known options are {}; remove '{key}' or update kup",
        options::describe_known()
    )]
    UnknownKey {
        /// The key as sent.
        key: String,
    },
    /// A known key with a value of another D-Bus type.
    #[error(
        "kupd: Update option '{key}' must have type '{expected}', not '{found}': send it as '{expected}'"
    )]
    WrongType {
        /// The key as sent.
        key: String,
        /// Its D-Bus signature.
        expected: &'static str,
        /// The signature that came.
        found: String,
    },
}

/// Why the engine would not, or could not, update.
///
/// Each message is the whole sentence the caller sees: the thing, the reason and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Refused before anything was touched (from [`Engine::plan`], or early in [`Engine::run`]).
    #[error("{0}")]
    Refused(String),
    /// Failed while running, before the switch; every service runs on, on this kernel.
    #[error("{0}")]
    Failed(String),
    /// Cancelled by a caller (`Update1.Cancel`) before the switch; every service runs on.
    #[error("{0}")]
    Cancelled(String),
}

impl EngineError {
    /// The cancellation of the update to `target`, in words.
    #[must_use]
    pub fn cancelled(target: &str) -> Self {
        Self::Cancelled(format!(
            "kupd: the update to kernel {target} was cancelled before the switch; every service \
             runs on, on this kernel"
        ))
    }
}

/// The engine kupd runs with when no real one is linked in: it refuses every update.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnlinkedEngine;

/// The refusal of [`UnlinkedEngine`].
pub const UNLINKED_MESSAGE: &str = "kupd: the update engine is not linked in this build";

impl Engine for UnlinkedEngine {
    fn plan(&self, _target: &str, _options: &UpdateOptions) -> Result<Plan, EngineError> {
        Err(EngineError::Refused(UNLINKED_MESSAGE.to_owned()))
    }

    fn run(&self, _plan: Plan, _progress: &dyn Fn(&str, u32)) -> Result<(), EngineError> {
        Err(EngineError::Refused(UNLINKED_MESSAGE.to_owned()))
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            running_kernel: running_kernel(),
            notes: vec![UNLINKED_MESSAGE.to_owned()],
            ..StatusReport::default()
        }
    }

    fn units(&self) -> Vec<UnitReport> {
        Vec::new()
    }

    fn dry_run(&self, _target: &str) -> Result<DryRunReport, EngineError> {
        Err(EngineError::Refused(UNLINKED_MESSAGE.to_owned()))
    }
}

/// The release of the running kernel (`uname -r`), or an empty string when /proc is not there.
#[must_use]
pub fn running_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The engine `kupd` runs with: the `kup` library's stages ([`crate::kup_engine::KupEngine`]).
#[must_use]
pub fn default_engine() -> std::sync::Arc<dyn Engine> {
    std::sync::Arc::new(crate::kup_engine::KupEngine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, Variant<'static>)]) -> HashMap<String, OwnedVariant> {
        entries
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    OwnedVariant::try_from(v.try_clone().expect("clone")).expect("owned"),
                )
            })
            .collect()
    }

    #[test]
    fn empty_options_are_the_defaults() {
        assert_eq!(
            UpdateOptions::from_dbus(&HashMap::new()),
            Ok(UpdateOptions::default())
        );
    }

    #[test]
    fn append_is_read_and_trimmed() {
        let opts =
            UpdateOptions::from_dbus(&map(&[("append", Variant::from(" quiet "))])).expect("valid");
        assert_eq!(opts.append.as_deref(), Some("quiet"));
        let opts =
            UpdateOptions::from_dbus(&map(&[("append", Variant::from("  "))])).expect("valid");
        assert_eq!(opts.append, None);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err =
            UpdateOptions::from_dbus(&map(&[("apend", Variant::from("quiet"))])).expect_err("typo");
        let text = err.to_string();
        assert!(text.contains("'apend'"), "{text}");
        assert!(text.contains("append (s)"), "{text}");
    }

    #[test]
    fn mistyped_values_are_refused_with_both_types() {
        let err = UpdateOptions::from_dbus(&map(&[("append", Variant::from(3u32))]))
            .expect_err("wrong type");
        assert_eq!(
            err,
            OptionsError::WrongType {
                key: "append".into(),
                expected: "s",
                found: "u".into()
            }
        );
    }

    #[test]
    fn plans_carry_engine_data() {
        let plan = Plan::with_data("7.3.4", vec![1u8, 2]);
        assert_eq!(plan.data::<Vec<u8>>(), Some(&vec![1, 2]));
        assert!(plan.data::<String>().is_none());
        let plan = plan.into_data::<String>().expect_err("not a String");
        assert_eq!(plan.into_data::<Vec<u8>>().ok(), Some(vec![1, 2]));
        assert!(format!("{:?}", Plan::new("x")).contains("\"x\""));
    }

    #[test]
    fn the_unlinked_engine_refuses_with_the_agreed_message() {
        let err = UnlinkedEngine
            .plan("", &UpdateOptions::default())
            .expect_err("refuses");
        assert_eq!(err.to_string(), UNLINKED_MESSAGE);
    }
}
