//! Dry-run: what an update would do, with every service left running. Stage and preflight as for an
//! update, then a trial checkpoint of each marked unit (a whole CRIU dump that leaves the tree
//! running, into a scratch directory, and the image check), then the restore of those checkpoints
//! on the target kernel in a throwaway VM ([`crate::qemu`]: the target's kernel and initrd boot a
//! copy-on-write view of the root filesystem, kup restores the units there as on a real handoff,
//! runs their health commands and reports on a serial port). Reported per unit. The services pause
//! for the time of their dump and go on; nothing is switched, the live disk is only read by the VM.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::manifest::{self, Manifest, UnitImage};
use crate::update::{self, RUN_DIR, UpdateError};
use crate::{criu, qemu, stage, systemd};

/// The dry-run's handoff directory (manifest, id, PID floor): the throwaway VM makes it its
/// `/var/lib/kup/handoff` in its own view of the disk (dracut-module/90kup/kup-handoff.sh).
pub const HANDOFF_DIR: &str = "/var/lib/kup/dry-run";

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
    /// What the throwaway VM did: which kernel booted, how (KVM or TCG), how long; or why there
    /// was none.
    pub vm: String,
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
    /// Whether the throwaway VM restored it on the target kernel (`None`: not tried).
    pub restored_in_vm: Option<bool>,
}

/// What kup in the throwaway VM reports (one JSON line on [`qemu::REPORT_PORT`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// `uname -r` in the VM.
    pub kernel: String,
    pub units: Vec<VmUnit>,
}

/// One unit of a [`VmReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmUnit {
    pub unit: String,
    pub restored: bool,
    /// Why not, or how it went.
    pub reason: String,
}

impl VmReport {
    /// The last report line in what came out of the report port. Pure.
    pub fn parse(text: &str) -> Option<Self> {
        text.lines()
            .rev()
            .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c == '\0'))
            .find_map(|l| serde_json::from_str(l).ok())
    }

    /// The line kup in the VM writes.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
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
    let (mut units, images): (Vec<UnitVerdict>, Vec<Option<UnitImage>>) = settings
        .units
        .iter()
        .map(|u| {
            let (verdict, mut image) = trial(&u.name, &scratch.join(&u.name));
            if let Some(i) = image.as_mut() {
                i.health.clone_from(&u.health);
            }
            (verdict, image)
        })
        .unzip();
    let images: Vec<UnitImage> = images.into_iter().flatten().collect();
    let vm = if images.is_empty() {
        "none: no unit was checkpointed whole".to_owned()
    } else if settings.update.dry_run_vm_timeout == 0 {
        "none: dry_run_vm_timeout = 0".to_owned()
    } else {
        // The checkpoints' size, as the trial measured it.
        let image_mib = units
            .iter()
            .filter(|u| u.restorable)
            .map(|u| u.image_mib)
            .sum();
        match throwaway_vm(settings, &target, &scratch, images, image_mib) {
            Ok((what, report)) => {
                merge(&mut units, &target.version, &report);
                what
            }
            Err(why) => format!("none: {why}"),
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(HANDOFF_DIR);
    let tried = units.iter().any(|u| u.restored_in_vm.is_some());
    Ok(Report {
        not_checked: if tried {
            format!(
                "the machine's own hardware and network on {} (the VM has neither; the update itself restores from its own fresh checkpoint)",
                target.version
            )
        } else {
            format!(
                "the restore on {} (no throwaway VM restored the units: {vm}); the update itself restores from its own fresh checkpoint",
                target.version
            )
        },
        target: target.version,
        refusal,
        units,
        vm,
    })
}

/// Folds the VM's report into the verdicts: a unit checkpointed whole is restorable only if the VM
/// restored it too.
fn merge(units: &mut [UnitVerdict], kernel: &str, report: &VmReport) {
    for u in units.iter_mut().filter(|u| u.restorable) {
        match report.units.iter().find(|r| r.unit == u.name) {
            Some(r) if r.restored => {
                u.restored_in_vm = Some(true);
                u.reason = format!(
                    "{}; restored on {kernel} in a throwaway VM: {}",
                    u.reason, r.reason
                );
            }
            Some(r) => {
                u.restored_in_vm = Some(false);
                u.restorable = false;
                u.reason = format!(
                    "{}, but its restore on {kernel} in a throwaway VM failed: {}",
                    u.reason, r.reason
                );
            }
            None => {
                u.restored_in_vm = Some(false);
                u.restorable = false;
                u.reason = format!(
                    "{}, but the throwaway VM on {kernel} did not report it (see /var/log/kup/dry-run/vm-console.log)",
                    u.reason
                );
            }
        }
    }
}

/// Restores `units` (checkpointed into `scratch`, `image_mib` in all) on `target` in a throwaway
/// VM. Returns what the VM did and its report, or why there was no report.
fn throwaway_vm(
    settings: &Settings,
    target: &stage::KernelImage,
    scratch: &Path,
    units: Vec<UnitImage>,
    image_mib: u64,
) -> Result<(String, VmReport), String> {
    let qemu_bin = qemu::find_qemu().map_err(|e| e.to_string())?;
    let (root, device) = qemu::root_device().map_err(|e| e.to_string())?;
    let root_args = qemu::root_args(&root).map_err(|e| e.to_string())?;
    // The VM sees the root filesystem only: the checkpoints and the handoff must be on it.
    let dev_of = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
            .ok()
    };
    std::fs::create_dir_all(HANDOFF_DIR).map_err(|e| format!("creating {HANDOFF_DIR}: {e}"))?;
    for dir in [scratch, Path::new(HANDOFF_DIR)] {
        if dev_of(dir) != dev_of(Path::new("/")) {
            return Err(format!(
                "{} is not on the root filesystem, the only one the VM gets; set image_dir to a directory on / for a dry-run that restores",
                dir.display()
            ));
        }
    }
    if !crate::initrd::has_module(&target.initrd) {
        return Err(format!(
            "{}'s initrd {} lacks kup's hook, so no restore can happen there; run `kupctl initrds --fix`",
            target.version,
            target.initrd.display()
        ));
    }
    let memory_mib = image_mib + qemu::BASE_MEMORY_MIB;
    let available = std::fs::read_to_string("/proc/meminfo")
        .map_or(0, |m| update::meminfo_kib(&m, "MemAvailable") >> 10);
    if memory_mib > available {
        return Err(qemu::VmError::Memory {
            need: memory_mib,
            available,
        }
        .to_string());
    }
    let m = Manifest {
        version: manifest::MANIFEST_VERSION,
        id: manifest::new_handoff_id(),
        created: manifest::unix_now(),
        from_kernel: update::running_kernel(),
        to_kernel: target.version.clone(),
        cmdline_old: String::new(),
        backend: crate::config::Backend::Disk.as_str().into(),
        image_dir: scratch.display().to_string(),
        disk_copy: None,
        restore: crate::config::RestoreMode::Eager,
        checks: manifest::Checks {
            health_timeout: settings.update.health_timeout,
            grace: settings.update.grace,
            kexec_watchdog: 0,
            make_default: false,
        },
        fallback: None,
        dry_run: true,
        units,
    };
    let handoff = Path::new(HANDOFF_DIR);
    manifest::write_atomic(handoff, &m).map_err(|e| e.to_string())?;
    // Written and synced (everything on the disk is what the VM will read).
    update::write_boot_files_in(handoff, &m).map_err(|e| e.to_string())?;
    let kvm = qemu::kvm_usable();
    let plan = qemu::Plan {
        kernel: target.vmlinuz.clone(),
        initrd: target.initrd.clone(),
        root_device: device,
        root_args,
        memory_mib,
        // Under TCG one emulated CPU: the services on this machine keep the others.
        cpus: if kvm {
            std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get().min(2)).unwrap_or(1))
        } else {
            1
        },
        kvm,
        handoff: m.id.clone(),
        extra: settings.update.extra_cmdline.clone(),
        run_dir: PathBuf::from(RUN_DIR).join("dry-run"),
    };
    tracing::info!(
        kup_phase = "dry-run",
        "kup: dry-run: booting {} in a throwaway VM ({}, {} MiB) to restore {} unit(s): {QEMU} {}",
        target.version,
        if kvm { "KVM" } else { "TCG" },
        memory_mib,
        m.units.len(),
        plan.args().join(" "),
        QEMU = qemu::QEMU
    );
    let ended = qemu::run(
        &qemu_bin,
        &plan,
        Duration::from_secs(settings.update.dry_run_vm_timeout.into()),
    )
    .map_err(|e| e.to_string())?;
    // The console is kept for the administrator; the VM's temporary snapshot goes with the run dir.
    let keep = Path::new(crate::restore::LOG_DIR).join("dry-run");
    let _ = std::fs::create_dir_all(&keep);
    let _ = std::fs::copy(
        plan.run_dir.join("console.log"),
        keep.join("vm-console.log"),
    );
    let _ = std::fs::remove_dir_all(&plan.run_dir);
    let how = format!(
        "{} booted in a throwaway VM ({}, {} MiB, no network card, the root filesystem read through a copy-on-write snapshot) for {} s",
        target.version,
        if kvm { "KVM" } else { "TCG" },
        memory_mib,
        ended.seconds
    );
    match VmReport::parse(&ended.report) {
        Some(r) if r.kernel == target.version => {
            let ok = r.units.iter().filter(|u| u.restored).count();
            Ok((
                format!("{how}; it restored {ok} of {} unit(s)", r.units.len()),
                r,
            ))
        }
        Some(r) => Err(format!(
            "{how}, but the report came from kernel {}, not {}",
            r.kernel, target.version
        )),
        None => Err(format!(
            "{how}, and kup there reported nothing{}; the end of its console (all of it in /var/log/kup/dry-run/vm-console.log): {}",
            ended.killed.map(|k| format!(" ({k})")).unwrap_or_default(),
            ended
                .console_tail
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ")
        )),
    }
}

/// The trial checkpoint of one unit into `images` (kept for the VM when whole; CRIU's log kept in
/// /var/log/kup/dry-run/UNIT). Returns the verdict and, when whole, what a manifest lists for it.
fn trial(unit: &str, images: &Path) -> (UnitVerdict, Option<UnitImage>) {
    let verdict =
        |restorable: bool, reason: String, dump_seconds: f64, image_mib: u64| UnitVerdict {
            name: unit.to_owned(),
            restorable,
            reason,
            dump_seconds,
            image_mib,
            restored_in_vm: None,
        };
    if let Err(e) = update::preflight_unit(unit) {
        return (verdict(false, e.to_string(), 0.0, 0), None);
    }
    let pid = match systemd::main_pid(unit) {
        Ok(Some(pid)) => pid,
        Ok(None) => return (verdict(false, "it stopped".into(), 0.0, 0), None),
        Err(e) => return (verdict(false, e.to_string(), 0.0, 0), None),
    };
    let _ = std::fs::remove_dir_all(images);
    if let Err(e) = std::fs::create_dir_all(images) {
        return (
            verdict(
                false,
                format!("cannot create {}: {e}", images.display()),
                0.0,
                0,
            ),
            None,
        );
    }
    let t = Instant::now();
    let mut facts = None;
    let dumped = criu::read_stdio(pid).and_then(|stdio| {
        let pids = criu::tree_pids(pid)?;
        let tcp = crate::tcp::established(&pids);
        criu::trial_dump(pid, images, &stdio, unit)?;
        facts = Some((stdio, pids, tcp));
        Ok(())
    });
    let seconds = t.elapsed().as_secs_f64();
    let kept = keep_log(unit, images);
    match (dumped, facts) {
        // CRIU's log outlives the scratch directory: name the kept copy.
        (Err(e), _) => (
            verdict(
                false,
                e.to_string().replace(
                    &images.join("dry-run.log").display().to_string(),
                    &kept.display().to_string(),
                ),
                seconds,
                0,
            ),
            None,
        ),
        (Ok(()), Some((stdio, pids, tcp))) => match crate::criu_image::check(images) {
            Err(e) => (
                verdict(
                    false,
                    format!("its checkpoint is not whole: {e}"),
                    seconds,
                    0,
                ),
                None,
            ),
            Ok(_) => {
                let mib = update::dir_bytes(images) >> 20;
                (
                    verdict(
                        true,
                        format!(
                            "checkpointed whole while it kept running ({mib} MiB, paused {seconds:.1} s)"
                        ),
                        seconds,
                        mib,
                    ),
                    Some(update::dumped_image(unit, pid, pids, images, stdio, tcp)),
                )
            }
        },
        (Ok(()), None) => (
            verdict(
                false,
                "the trial dump left no facts (a bug in kup)".into(),
                seconds,
                0,
            ),
            None,
        ),
    }
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

/// The name of the dummy link that carries, in the throwaway VM, the local addresses of the kept
/// connections (the VM has no network card).
pub const VM_LINK: &str = "kup-dry-run";

/// In the throwaway VM (kup-netlock.service, before the restores): the restored sockets need their
/// local addresses and a route to their peers, which the VM, without a network card, lacks. A
/// dummy link gets every kept connection's local address and the default routes (packets sent
/// there go nowhere), and binding to addresses the VM does not have is allowed (listeners on a
/// specific address). Failures are logged: the restore then says which address is missing.
pub fn vm_network(m: &Manifest) {
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(args).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                kup_phase = "dry-run",
                "kup: ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::warn!(kup_phase = "dry-run", "kup: ip {}: {e}", args.join(" ")),
        }
    };
    for sysctl in [
        "/proc/sys/net/ipv4/ip_nonlocal_bind",
        "/proc/sys/net/ipv6/ip_nonlocal_bind",
    ] {
        let _ = std::fs::write(sysctl, "1");
    }
    ip(&["link", "add", VM_LINK, "type", "dummy"]);
    ip(&["link", "set", VM_LINK, "up"]);
    let conns: Vec<crate::tcp::TcpConn> = m.units.iter().flat_map(|u| u.tcp.clone()).collect();
    for a in crate::tcp::local_addresses(&conns) {
        let prefix = if a.is_ipv4() { 32 } else { 128 };
        ip(&[
            "addr",
            "add",
            &format!("{a}/{prefix}"),
            "dev",
            VM_LINK,
            "nodad",
        ]);
    }
    ip(&["route", "add", "default", "dev", VM_LINK]);
    ip(&["-6", "route", "add", "default", "dev", VM_LINK]);
}

/// In the throwaway VM (kup-restore-finish.service): each unit's verdict ([`crate::fallback::verify`]'s
/// failures) goes to the report port, then the VM powers off. Returns what was reported.
pub fn vm_finish(m: &Manifest, failures: &[manifest::UnitFailure]) -> Result<String, String> {
    let report = VmReport {
        kernel: update::running_kernel(),
        units: m
            .units
            .iter()
            .map(|u| match failures.iter().find(|f| f.unit == u.unit) {
                Some(f) => VmUnit {
                    unit: u.unit.clone(),
                    restored: false,
                    reason: f.reason.clone(),
                },
                None => VmUnit {
                    unit: u.unit.clone(),
                    restored: true,
                    reason: format!(
                        "active as PID {}{}, still so after {} s",
                        u.main_pid,
                        if u.health.is_some() {
                            ", its health command passed"
                        } else {
                            ""
                        },
                        m.checks.grace
                    ),
                },
            })
            .collect(),
    };
    let line = report.to_line();
    let written = write_report(&line);
    let _ = systemd::systemctl(&["poweroff", "--no-block"]);
    written.map(|()| line.trim().to_owned())
}

/// Writes the report line to [`qemu::REPORT_PORT`] and waits until the port has sent it.
fn write_report(line: &str) -> Result<(), String> {
    use std::io::Write as _;
    let port = qemu::REPORT_PORT;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(port)
        .map_err(|e| format!("cannot open the report port {port}: {e}"))?;
    f.write_all(line.as_bytes())
        .map_err(|e| format!("cannot write the report to {port}: {e}"))?;
    nix::sys::termios::tcdrain(&f).map_err(|e| format!("{port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(name: &str, restorable: bool) -> UnitVerdict {
        UnitVerdict {
            name: name.into(),
            restorable,
            reason: "checkpointed whole".into(),
            dump_seconds: 0.1,
            image_mib: 3,
            restored_in_vm: None,
        }
    }

    #[test]
    fn the_vm_report_is_the_last_json_line_of_the_port() {
        let r = VmReport {
            kernel: "7.3.4".into(),
            units: vec![VmUnit {
                unit: "a.service".into(),
                restored: true,
                reason: "active".into(),
            }],
        };
        // A tty turns the newline into CR LF; noise before it is skipped.
        let port = format!("garbage\r\n{}", r.to_line().replace('\n', "\r\n"));
        assert_eq!(VmReport::parse(&port), Some(r));
        assert_eq!(VmReport::parse(""), None);
        assert_eq!(VmReport::parse("{\"kernel\": 1}"), None);
    }

    #[test]
    fn a_unit_is_restorable_only_when_the_vm_restored_it() {
        let mut units = vec![
            verdict("a.service", true),
            verdict("b.service", true),
            verdict("c.service", true),
            verdict("d.service", false),
        ];
        let report = VmReport {
            kernel: "7.3.4".into(),
            units: vec![
                VmUnit {
                    unit: "a.service".into(),
                    restored: true,
                    reason: "active as PID 7".into(),
                },
                VmUnit {
                    unit: "b.service".into(),
                    restored: false,
                    reason: "CRIU failed".into(),
                },
            ],
        };
        merge(&mut units, "7.3.4", &report);
        assert!(units[0].restorable);
        assert_eq!(units[0].restored_in_vm, Some(true));
        assert_eq!(
            units[0].reason,
            "checkpointed whole; restored on 7.3.4 in a throwaway VM: active as PID 7"
        );
        assert!(!units[1].restorable);
        assert!(
            units[1].reason.ends_with("failed: CRIU failed"),
            "{}",
            units[1].reason
        );
        assert!(!units[2].restorable);
        assert!(
            units[2].reason.contains("did not report it"),
            "{}",
            units[2].reason
        );
        // Not checkpointed whole: the VM never had it.
        assert_eq!(units[3].restored_in_vm, None);
        assert_eq!(units[3].reason, "checkpointed whole");
    }
}
