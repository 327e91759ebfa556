//! Stage 9, verify + fallback. On a restoring boot, after kup-restore.target, every unit must be
//! restored, pass its health command and stay up with its restored main PID for the grace period.
//! Otherwise the boot falls back to the kernel the units came from: each unit still running here
//! is checkpointed again (its newest state), each one that never came back goes from its untouched
//! images, and the old kernel restores them all. A fallback that fails again does not bounce: the
//! images stay and the outcome says what to do. Every boot's outcome is recorded in [`OUTCOME_FILE`]
//! for `kupctl status`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::manifest::{self, FallbackOf, Manifest, UnitFailure, UnitImage, UnitState};
use crate::update::{self, HANDOFF_DIR, RUN_DIR, UpdateError};
use crate::{kexec, nft, restore, stage, systemd};

/// The outcome of the last restoring boot (JSON, [`Outcome`]).
pub const OUTCOME_FILE: &str = "/var/lib/kup/last-handoff.json";

/// How a restoring boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every unit restored and healthy on the kernel it was sent to.
    Restored,
    /// Something failed here; the units are on their way back to the previous kernel.
    FallingBack,
    /// Something failed on the new kernel; every unit is restored on the previous one.
    FellBack,
    /// Units are not running and nothing more happens automatically; their images are kept.
    Failed,
    /// A boot kup did not make (power loss, crash, panic, watchdog reset) found the handoff
    /// unfinished and restored every unit from the images.
    Resumed,
}

/// The record of a restoring boot, written to [`OUTCOME_FILE`] (also the JSON `kupctl status` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The handoff this boot restored.
    pub id: String,
    /// `uname -r` of this boot.
    pub kernel: String,
    pub result: Verdict,
    /// One sentence for the administrator: what happened and what to do.
    pub message: String,
    /// Units that failed on this boot.
    pub failures: Vec<UnitFailure>,
    /// For a fallback boot: the kernel that failed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_of: Option<FallbackOf>,
    /// Unix seconds.
    pub time: u64,
}

/// Why the fallback could not be started (the units that could not go back keep running here, or
/// keep their images).
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error(
        "the previous kernel {kernel} cannot be booted again: {source}; the units stay on this kernel"
    )]
    Kernel {
        kernel: String,
        source: stage::StageError,
    },
    #[error(
        "{unit} was still serving but its lazy restore did not finish ({state}), so it cannot be checkpointed for the fallback; it stays on this kernel"
    )]
    Lazy { unit: String, state: String },
    #[error("{0}; every unit that ran on this kernel keeps running here")]
    Update(#[from] UpdateError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
}

/// The failures of a restoring boot: units not restored, not running as restored, unhealthy, or
/// gone within the grace period. Runs the health commands (output in `/run/kup/health/UNIT.log`).
pub fn verify(m: &Manifest) -> Vec<UnitFailure> {
    let mut failures = Vec::new();
    let fail = |failures: &mut Vec<UnitFailure>, u: &UnitImage, reason: String| {
        tracing::error!(unit = %u.unit, kup_phase = "verify", "kup: {}: {reason}", u.unit);
        failures.push(UnitFailure {
            unit: u.unit.clone(),
            reason,
        });
    };
    for u in &m.units {
        match &u.state {
            UnitState::Restored => {}
            UnitState::Failed(why) => {
                fail(&mut failures, u, format!("restore failed: {why}"));
                continue;
            }
            UnitState::Pending | UnitState::Dumped => {
                fail(
                    &mut failures,
                    u,
                    format!(
                        "it was not restored (its restoring start did not run or did not finish; see journalctl -b -u {})",
                        u.unit
                    ),
                );
                continue;
            }
        }
        if let Err(why) = running_as_restored(u) {
            fail(&mut failures, u, why);
            continue;
        }
        if let Some(cmd) = &u.health {
            let dir = Path::new(RUN_DIR).join("health");
            let _ = std::fs::create_dir_all(&dir);
            let log = dir.join(format!("{}.log", u.unit));
            let timeout = Duration::from_secs(m.checks.health_timeout.into());
            match health(&log, cmd, timeout) {
                Ok(()) => {
                    tracing::info!(unit = %u.unit, kup_phase = "verify", "kup: {}: health command passed", u.unit)
                }
                Err(why) => fail(&mut failures, u, why),
            }
        }
    }
    if m.checks.grace > 0 {
        std::thread::sleep(Duration::from_secs(m.checks.grace.into()));
    }
    for u in &m.units {
        if failures.iter().any(|f| f.unit == u.unit) {
            continue;
        }
        if let Err(why) = running_as_restored(u) {
            fail(
                &mut failures,
                u,
                format!("within the {} s grace period: {why}", m.checks.grace),
            );
        }
    }
    failures
}

/// Whether `u` runs as restored: active, with the restored main PID.
fn running_as_restored(u: &UnitImage) -> Result<(), String> {
    let state = systemd::property(&u.unit, "ActiveState").map_err(|e| e.to_string())?;
    if state != "active" {
        return Err(format!("the unit is {state}, not active"));
    }
    match systemd::main_pid(&u.unit).map_err(|e| e.to_string())? {
        Some(pid) if pid == u.main_pid => Ok(()),
        Some(pid) => Err(format!(
            "its main PID is {pid}, not the restored {}: the restored process is gone",
            u.main_pid
        )),
        None => Err("it has no main process".into()),
    }
}

/// Runs `cmd` with `sh -c`, at most `timeout`; its output goes to `log`.
fn health(log: &Path, cmd: &str, timeout: Duration) -> Result<(), String> {
    let out =
        std::fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run its health command {cmd:?}: {e}"))?;
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "its health command {cmd:?} did not finish within {} s (health_timeout)",
                    timeout.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for its health command: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Err(format!(
        "its health command {cmd:?} failed ({status}): {}",
        last.trim()
    ))
}

/// Sends every unit back to the kernel `m` came from, with a new handoff whose manifest records
/// the failures; returns once systemd has the kexec job. Units still running here are
/// checkpointed again; the others go from their images. On an error before the switch, every unit
/// checkpointed here is restored here again.
pub fn fall_back(m: &Manifest, failures: &[UnitFailure]) -> Result<String, FallbackError> {
    let here = update::running_kernel();
    let id = manifest::new_handoff_id();
    let target = stage::resolve_target(
        Path::new(stage::BOOT_DIR),
        Some(&m.from_kernel),
        &m.cmdline_old,
        &id,
        "",
    )
    .map_err(|source| FallbackError::Kernel {
        kernel: m.from_kernel.clone(),
        source,
    })?;
    let running: Vec<&UnitImage> = m
        .units
        .iter()
        .filter(|u| systemd::main_pid(&u.unit).ok().flatten().is_some())
        .collect();
    // A lazily restored unit holds its memory only once every page is in.
    if m.restore == crate::config::RestoreMode::Lazy {
        for u in &running {
            wait_lazy_complete(&u.unit)?;
        }
    }
    // The way back goes through the disk: the old kernel may have no LUO, and a firmware boot (a
    // fallback that panics) must still find the images.
    let (backend, image_dir) = if m.backend == crate::config::Backend::Luo.as_str() {
        let dir = crate::config::Settings::load()
            .map(|s| s.update.image_dir)
            .unwrap_or_else(|_| PathBuf::from(crate::config::DEFAULT_IMAGE_DIR));
        (crate::config::Backend::Disk.as_str().to_owned(), dir)
    } else {
        (m.backend.clone(), PathBuf::from(&m.image_dir))
    };
    let mut next = Manifest {
        version: manifest::MANIFEST_VERSION,
        id: id.clone(),
        created: manifest::unix_now(),
        from_kernel: here.clone(),
        to_kernel: m.from_kernel.clone(),
        cmdline_old: std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        backend: backend.clone(),
        image_dir: image_dir.display().to_string(),
        disk_copy: None,
        restore: m.restore,
        checks: m.checks,
        fallback: Some(FallbackOf {
            id: m.id.clone(),
            kernel: here.clone(),
            failures: failures.to_vec(),
        }),
        dry_run: false,
        units: Vec::new(),
    };
    let handoff = Path::new(HANDOFF_DIR);
    // Units that never came back go from their images, untouched since the old kernel.
    for u in m
        .units
        .iter()
        .filter(|u| !running.iter().any(|r| r.unit == u.unit))
    {
        let mut u = u.clone();
        if backend != m.backend {
            // Kept in RAM (LUO) so far: onto the disk for the way back.
            let to = image_dir.join(&u.unit);
            copy_tree(Path::new(&u.images), &to).map_err(|source| {
                FallbackError::Update(UpdateError::Io(crate::IoError {
                    what: format!("copying {}'s images from RAM to {}", u.unit, to.display()),
                    source,
                }))
            })?;
            u.images = to.display().to_string();
        }
        update::check_images(&u.unit, Path::new(&u.images))?;
        next.units.push(UnitImage {
            state: UnitState::Dumped,
            ..u
        });
    }
    manifest::write_atomic(handoff, &next)?;
    for u in &running {
        // Beside the images they were restored from, which a lazy server may still be releasing.
        let images = image_dir.join(format!("{}.fallback", u.unit));
        let mut img =
            match update::dump_unit(&u.unit, &images, None, None, None).map(|(img, _)| img) {
                Ok(img) => img,
                Err(e) => {
                    back_here(&next);
                    return Err(e.into());
                }
            };
        img.health.clone_from(&u.health);
        next.units.push(img);
        manifest::write_atomic(handoff, &next)?;
    }
    update::write_boot_files(&next)?;
    // The way back has its own images on disk now; a luo handoff's disk copy is spent.
    if let Some(copy) = &m.disk_copy {
        let _ = std::fs::remove_dir_all(copy);
    }
    if let Err(e) = kexec::load(&target)
        .and_then(|()| kexec::switch(m.checks.kexec_watchdog, &m.from_kernel, &target.version))
    {
        kexec::unload();
        back_here(&next);
        return Err(UpdateError::Switch(e).into());
    }
    Ok(format!(
        "falling back to {} (handoff {id}) with {} unit(s)",
        m.from_kernel,
        next.units.len()
    ))
}

/// Copies an image tree afresh, following the luo backend's links to the files it holds open.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    crate::luo_store::copy_out(from, to).map(|_| ())
}

/// Aborted fallback: the units checkpointed on this kernel run here again; the ones that never
/// came back keep their images, listed in the manifest.
fn back_here(next: &Manifest) {
    for u in next
        .units
        .iter()
        .filter(|u| u.images.ends_with(".fallback"))
    {
        if let Err(e) = restore::restore_in_place(&u.unit) {
            tracing::error!(unit = %u.unit, kup_phase = "fallback", "kup: restoring {} on this kernel failed too: {e}", u.unit);
        }
    }
}

/// Waits (up to 10 min) until the lazy-pages server of `unit` has every page in.
fn wait_lazy_complete(unit: &str) -> Result<(), FallbackError> {
    let marker = Path::new(RUN_DIR).join("lazy").join(unit);
    let t0 = Instant::now();
    loop {
        let state = std::fs::read_to_string(&marker).unwrap_or_default();
        let state = state.trim();
        if state == "complete" {
            return Ok(());
        }
        if state.starts_with("failed") || t0.elapsed() > Duration::from_secs(600) {
            return Err(FallbackError::Lazy {
                unit: unit.to_owned(),
                state: if state.is_empty() {
                    "still serving after 600 s"
                } else {
                    state
                }
                .to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes this boot's outcome to [`OUTCOME_FILE`] (atomically) and the journal.
pub fn record(m: &Manifest, result: Verdict, message: &str, failures: &[UnitFailure]) {
    let outcome = Outcome {
        id: m.id.clone(),
        kernel: update::running_kernel(),
        result,
        message: message.to_owned(),
        failures: failures.to_vec(),
        fallback_of: m.fallback.clone(),
        time: manifest::unix_now(),
    };
    match result {
        Verdict::Restored | Verdict::Resumed => {
            tracing::info!(kup_update_id = %m.id, kup_phase = "verify", "kup: {message}");
        }
        _ => tracing::error!(kup_update_id = %m.id, kup_phase = "fallback", "kup: {message}"),
    }
    if let Ok(mut json) = serde_json::to_vec_pretty(&outcome) {
        json.push(b'\n');
        let tmp = format!("{OUTCOME_FILE}.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, OUTCOME_FILE);
        }
    }
}

/// Lifts the network lock of every unit that runs as restored (their connections live again); the
/// others' kept connections stay locked until a kernel restores them.
pub fn unlock_running(m: &Manifest, failures: &[UnitFailure]) {
    for u in &m.units {
        if !failures.iter().any(|f| f.unit == u.unit) {
            nft::unlock(&u.unit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_json_names_the_result() {
        let o = Outcome {
            id: "1-a".into(),
            kernel: "6.12.107".into(),
            result: Verdict::FellBack,
            message: "m".into(),
            failures: vec![],
            fallback_of: Some(FallbackOf {
                id: "0-b".into(),
                kernel: "6.12.117".into(),
                failures: vec![UnitFailure {
                    unit: "memcached.service".into(),
                    reason: "health".into(),
                }],
            }),
            time: 1,
        };
        let text = serde_json::to_string(&o).unwrap();
        assert!(text.contains("\"result\":\"fell-back\""), "{text}");
        assert_eq!(serde_json::from_str::<Outcome>(&text).unwrap(), o);
    }

    #[test]
    fn a_failing_health_command_gives_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t.log");
        let err = health(
            &log,
            "echo first; echo 'not ready' >&2; exit 3",
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            err.contains("not ready") && err.contains("exit status: 3"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "first\nnot ready\n");
        assert!(health(&log, "true", Duration::from_secs(5)).is_ok());
        let err = health(&log, "sleep 5", Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("did not finish within"), "{err}");
    }
}
