//! Dry-run: what an update would do before the switch, with every service left running. Stage and
//! preflight as for an update, then a trial checkpoint of each marked unit (a whole CRIU dump that
//! leaves the tree running, into a scratch directory, and the image check), reported per unit.
//! The services pause for the time of their dump and go on; nothing is switched. Not checked yet:
//! the restore on the target kernel (a throwaway VM, docs/RELIABILITY.md).

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::update::{self, RUN_DIR, UpdateError};
use crate::{criu, stage, systemd};

/// The dry-run's findings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The kernel an update would switch to.
    pub target: String,
    /// Whether the update itself would be accepted: "" when it would, else the refusal.
    pub refusal: String,
    pub units: Vec<UnitVerdict>,
    /// What this dry-run does not check.
    pub not_checked: String,
}

/// One marked unit's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitVerdict {
    pub name: String,
    /// It was checkpointed whole while it kept running.
    pub restorable: bool,
    /// Why not, or what was measured.
    pub reason: String,
    /// Seconds the trial dump took (the unit was paused for about that long).
    pub dump_seconds: f64,
    /// Size of its checkpoint, MiB.
    pub image_mib: u64,
}

/// Runs the dry-run for `kernel` (`None`: the configured or newest installed one).
pub fn run(settings: &Settings, kernel: Option<&str>) -> Result<Report, UpdateError> {
    if settings.units.is_empty() {
        return Err(UpdateError::NothingMarked);
    }
    std::fs::create_dir_all(RUN_DIR).map_err(crate::io(format!("creating {RUN_DIR}")))?;
    let lock_path = format!("{RUN_DIR}/update.lock");
    let lock = File::create(&lock_path).map_err(crate::io(format!("creating {lock_path}")))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
        .map_err(|_| UpdateError::Busy(lock_path.clone()))?;

    let wanted = kernel
        .map(str::to_owned)
        .or_else(|| settings.update.kernel.clone());
    let target = stage::resolve_kernel(Path::new(stage::BOOT_DIR), wanted.as_deref())?;
    let req = update::Request {
        kernel: Some(target.version.clone()),
        append: String::new(),
    };
    let refusal = match update::plan(settings, &req) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let scratch = settings.update.image_dir.join("dry-run");
    let units = settings
        .units
        .iter()
        .map(|u| trial(&u.name, &scratch.join(&u.name)))
        .collect();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Report {
        not_checked: format!(
            "the restore on {} (a throwaway VM of the target kernel) is not tried by this dry-run; the update itself restores from its own fresh checkpoint",
            target.version
        ),
        target: target.version,
        refusal,
        units,
    })
}

/// The trial checkpoint of one unit into `images` (removed afterwards; CRIU's log kept in
/// /var/log/kup/dry-run/UNIT).
fn trial(unit: &str, images: &Path) -> UnitVerdict {
    let verdict =
        |restorable: bool, reason: String, dump_seconds: f64, image_mib: u64| UnitVerdict {
            name: unit.to_owned(),
            restorable,
            reason,
            dump_seconds,
            image_mib,
        };
    if let Err(e) = update::preflight_unit(unit) {
        return verdict(false, e.to_string(), 0.0, 0);
    }
    let pid = match systemd::main_pid(unit) {
        Ok(Some(pid)) => pid,
        Ok(None) => return verdict(false, "it stopped".into(), 0.0, 0),
        Err(e) => return verdict(false, e.to_string(), 0.0, 0),
    };
    let _ = std::fs::remove_dir_all(images);
    if let Err(e) = std::fs::create_dir_all(images) {
        return verdict(
            false,
            format!("cannot create {}: {e}", images.display()),
            0.0,
            0,
        );
    }
    let t = Instant::now();
    let dumped =
        criu::read_stdio(pid).and_then(|stdio| criu::trial_dump(pid, images, &stdio, unit));
    let seconds = t.elapsed().as_secs_f64();
    let kept = keep_log(unit, images);
    let result = match dumped {
        // CRIU's log outlives the scratch directory: name the kept copy.
        Err(e) => verdict(
            false,
            e.to_string().replace(
                &images.join("dry-run.log").display().to_string(),
                &kept.display().to_string(),
            ),
            seconds,
            0,
        ),
        Ok(()) => match crate::criu_image::check(images) {
            Err(e) => verdict(
                false,
                format!("its checkpoint is not whole: {e}"),
                seconds,
                0,
            ),
            Ok(_) => {
                let mib = update::dir_bytes(images) >> 20;
                verdict(
                    true,
                    format!(
                        "checkpointed whole while it kept running ({mib} MiB, paused {seconds:.1} s)"
                    ),
                    seconds,
                    mib,
                )
            }
        },
    };
    let _ = std::fs::remove_dir_all(images);
    result
}

/// Copies CRIU's log of the trial to /var/log/kup/dry-run/UNIT/dry-run.log; returns that path.
fn keep_log(unit: &str, images: &Path) -> std::path::PathBuf {
    let keep = Path::new(crate::restore::LOG_DIR)
        .join("dry-run")
        .join(unit);
    let _ = std::fs::create_dir_all(&keep);
    let log = keep.join("dry-run.log");
    let _ = std::fs::copy(images.join("dry-run.log"), &log);
    log
}
