//! The real update engine: kupd's [`Engine`] over the `kup` library's stages.

use std::path::Path;

use kup::config::Settings;
use kup::update::{self, Request};
use kup_dbus::{DryRunReport, DryRunUnit, StatusReport, UnitReport};

use crate::engine::{Engine, EngineError, Plan, UpdateOptions, running_kernel};

/// Reads the configuration afresh for every request (an administrator may have just edited it).
#[derive(Debug, Default, Clone, Copy)]
pub struct KupEngine;

fn settings() -> Result<Settings, EngineError> {
    Settings::load().map_err(|e| EngineError::Refused(e.to_string()))
}

impl Engine for KupEngine {
    fn plan(&self, target: &str, options: &UpdateOptions) -> Result<Plan, EngineError> {
        let s = settings()?;
        let req = Request {
            kernel: (!target.is_empty()).then(|| target.to_owned()),
            append: options.append.clone().unwrap_or_default(),
        };
        let plan = update::plan(&s, &req).map_err(|e| EngineError::Refused(e.to_string()))?;
        Ok(Plan::with_data(plan.target.version.clone(), plan))
    }

    fn run(&self, plan: Plan, progress: &dyn Fn(&str, u32)) -> Result<(), EngineError> {
        let plan: update::Plan = plan.into_data().map_err(|_| {
            EngineError::Failed("kupd: internal error: a plan of another engine".into())
        })?;
        update::run(&plan, progress).map_err(|e| EngineError::Failed(e.to_string()))?;
        progress("switch", 100);
        Ok(())
    }

    fn run_cancellable(
        &self,
        plan: Plan,
        progress: &dyn Fn(&str, u32),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), EngineError> {
        // The stages before the first dump (stage, preflight) ran in `plan`; the library's run
        // dumps and switches in one go, so the last boundary kupd sees is this one.
        if cancelled() {
            return Err(EngineError::cancelled(&plan.target));
        }
        self.run(plan, progress)
    }

    fn status(&self) -> StatusReport {
        let mut notes = Vec::new();
        let marked = match Settings::load() {
            Ok(s) => s.units.len(),
            Err(e) => {
                notes.push(e.to_string());
                0
            }
        };
        let default_target = kup::stage::installed_kernels(Path::new(kup::stage::BOOT_DIR))
            .ok()
            .and_then(|k| kup::stage::newest(&k).map(|e| e.version.clone()));
        let restored_handoff = std::fs::read_to_string("/var/lib/kup/handoff.done/id")
            .ok()
            .map(|s| s.trim().to_owned());
        let last_handoff = std::fs::read(kup::fallback::OUTCOME_FILE)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        StatusReport {
            last_handoff,
            running_kernel: running_kernel(),
            default_target,
            marked_units: marked,
            restored_handoff,
            notes,
            ..StatusReport::default()
        }
    }

    fn dry_run(&self, target: &str) -> Result<DryRunReport, EngineError> {
        let s = settings()?;
        let wanted = (!target.is_empty()).then_some(target);
        let r = kup::dryrun::run(&s, wanted).map_err(|e| EngineError::Refused(e.to_string()))?;
        Ok(DryRunReport {
            target: r.target,
            refusal: r.refusal,
            not_checked: r.not_checked,
            vm: r.vm,
            units: r
                .units
                .into_iter()
                .map(|u| DryRunUnit {
                    name: u.name,
                    restorable: u.restorable,
                    reason: u.reason,
                    dump_seconds: u.dump_seconds,
                    image_mib: u.image_mib,
                    restored_in_vm: u.restored_in_vm,
                })
                .collect(),
        })
    }

    fn units(&self) -> Vec<UnitReport> {
        let Ok(s) = Settings::load() else {
            return Vec::new();
        };
        s.units
            .iter()
            .map(|u| match update::preflight_unit(&u.name) {
                Ok(()) => UnitReport {
                    name: u.name.clone(),
                    checkpointable: true,
                    reason: "running; can be checkpointed".into(),
                },
                Err(e) => UnitReport {
                    name: u.name.clone(),
                    checkpointable: false,
                    reason: e.to_string(),
                },
            })
            .collect()
    }
}
