//! JSON payloads of `Manager1.Status` and `Manager1.Units`.
//!
//! Every field has a default, so a client reads a payload from a newer kupd that added fields,
//! and one from an older kupd that lacked some.

use serde::{Deserialize, Serialize};

use crate::error::PayloadError;

/// What `Manager1.Status` returns (as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// Version of the kupd that answered (filled in by kupd).
    pub daemon_version: String,
    /// Release of the running kernel (`uname -r`).
    pub running_kernel: String,
    /// Kernel release an `Update` with an empty target would switch to, if any.
    pub default_target: Option<String>,
    /// Number of units marked in the configuration.
    pub marked_units: usize,
    /// Handoff id restored on this boot, if this boot came from a kup update.
    pub restored_handoff: Option<String>,
    /// Free-form remarks of the engine (e.g. a configuration problem), one sentence each.
    pub notes: Vec<String>,
    /// The update running now (filled in by kupd).
    pub active_update: Option<ActiveUpdate>,
    /// The last update that finished since kupd started (filled in by kupd).
    pub last_update: Option<FinishedUpdate>,
    /// How the last restoring boot ended (restored, fell back, ...), from /var/lib/kup/last-handoff.json.
    pub last_handoff: Option<HandoffOutcome>,
}

/// What `Manager1.DryRun` returns (as JSON): per marked unit, whether it was checkpointed whole
/// while it kept running and restored on the target kernel in a throwaway VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DryRunReport {
    /// The kernel an update would switch to.
    pub target: String,
    /// "" when `Update` would be accepted now, else the refusal.
    pub refusal: String,
    pub units: Vec<DryRunUnit>,
    /// What the dry-run does not check.
    pub not_checked: String,
    /// What the throwaway VM did (the target kernel restoring the trial checkpoints), or why there
    /// was none (`none: ...`).
    pub vm: String,
}

/// One unit of a [`DryRunReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DryRunUnit {
    pub name: String,
    /// Checkpointed whole while it kept running.
    pub restorable: bool,
    /// Why not (thing, reason, fix), or what was measured.
    pub reason: String,
    /// Seconds the unit was paused for its trial checkpoint.
    pub dump_seconds: f64,
    /// Size of the checkpoint, MiB.
    pub image_mib: u64,
    /// Whether the throwaway VM restored it on the target kernel (absent: not tried).
    pub restored_in_vm: Option<bool>,
}

impl DryRunReport {
    /// Serialises to pretty JSON.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Decodes the JSON of `Manager1.DryRun`.
    ///
    /// # Errors
    /// When the text is not a dry-run report.
    pub fn from_json(json: &str) -> Result<Self, PayloadError> {
        serde_json::from_str(json).map_err(|error| PayloadError {
            what: "DryRun",
            error,
        })
    }
}

/// How a restoring boot ended, as kup-restore recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HandoffOutcome {
    /// The handoff restored on that boot.
    pub id: String,
    /// `uname -r` of that boot.
    pub kernel: String,
    /// `restored`, `falling-back`, `fell-back`, `resumed` (a boot kup did not make restored the
    /// unfinished handoff) or `failed`.
    pub result: String,
    /// What happened and what to do, in one sentence.
    pub message: String,
    /// Units that failed on that boot.
    pub failures: Vec<UnitFailure>,
    /// On a fallback boot: the kernel the units came back from, and why.
    pub fallback_of: Option<FallbackOf>,
    /// Unix seconds.
    pub time: u64,
}

/// A unit that failed on a restoring boot, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnitFailure {
    pub unit: String,
    pub reason: String,
}

/// The failed handoff a fallback came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FallbackOf {
    /// The failed handoff's id.
    pub id: String,
    /// The kernel the restore failed on.
    pub kernel: String,
    pub failures: Vec<UnitFailure>,
}

/// An update in progress, as `StatusReport::active_update` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActiveUpdate {
    /// Its object path, `/org/kup/Manager1/update/N`.
    pub path: String,
    /// Target kernel release.
    pub target: String,
    /// Current phase (see [`crate::phase`]).
    pub phase: String,
    /// Progress of the whole update, 0 to 100.
    pub percentage: u32,
}

/// A finished update, as `StatusReport::last_update` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FinishedUpdate {
    /// Its object path, `/org/kup/Manager1/update/N`.
    pub path: String,
    /// Target kernel release.
    pub target: String,
    /// Whether it succeeded.
    pub success: bool,
    /// kupd's final message (the failure reason when it failed).
    pub message: String,
}

/// One marked unit, as `Manager1.Units` lists them (a JSON array of these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnitReport {
    /// Unit name, e.g. `memcached.service`.
    pub name: String,
    /// Whether kup can checkpoint it now.
    pub checkpointable: bool,
    /// Why not (or a short note when it can), one sentence naming the fix.
    pub reason: String,
}

impl StatusReport {
    /// Decodes the JSON of `Manager1.Status`.
    ///
    /// # Errors
    /// When the text is not a status report.
    pub fn from_json(json: &str) -> Result<Self, PayloadError> {
        serde_json::from_str(json).map_err(|error| PayloadError {
            what: "Status",
            error,
        })
    }

    /// Encodes it as the JSON `Manager1.Status` returns.
    #[must_use]
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings, numbers and options cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

impl UnitReport {
    /// Decodes the JSON array of `Manager1.Units`.
    ///
    /// # Errors
    /// When the text is not a list of unit reports.
    pub fn list_from_json(json: &str) -> Result<Vec<Self>, PayloadError> {
        serde_json::from_str(json).map_err(|error| PayloadError {
            what: "Units",
            error,
        })
    }

    /// Encodes a list as the JSON array `Manager1.Units` returns.
    #[must_use]
    pub fn list_to_json(units: &[Self]) -> String {
        serde_json::to_string(units).unwrap_or_else(|_| String::from("[]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        let status = StatusReport {
            daemon_version: "0.1.0".into(),
            running_kernel: "6.12.107+deb13-cloud-amd64".into(),
            default_target: Some("7.3.4".into()),
            marked_units: 2,
            active_update: Some(ActiveUpdate {
                path: "/org/kup/Manager1/update/1".into(),
                target: "7.3.4".into(),
                phase: "dump".into(),
                percentage: 40,
            }),
            ..StatusReport::default()
        };
        let back = StatusReport::from_json(&status.to_json()).expect("decodes");
        assert_eq!(back, status);
    }

    #[test]
    fn missing_and_unknown_fields_are_tolerated() {
        let status = StatusReport::from_json(r#"{"running_kernel":"6.12","added_later":1}"#)
            .expect("decodes");
        assert_eq!(status.running_kernel, "6.12");
        assert_eq!(status.active_update, None);
    }

    #[test]
    fn units_round_trip() {
        let units = vec![UnitReport {
            name: "memcached.service".into(),
            checkpointable: false,
            reason: "memcached.service is not running: systemctl start memcached".into(),
        }];
        let back = UnitReport::list_from_json(&UnitReport::list_to_json(&units)).expect("decodes");
        assert_eq!(back, units);
    }

    #[test]
    fn a_bad_payload_names_itself_and_the_fix() {
        let err = UnitReport::list_from_json("{}").expect_err("not a list");
        let text = err.to_string();
        assert!(text.contains("Units"), "{text}");
        assert!(text.contains("reinstall"), "{text}");
    }
}
