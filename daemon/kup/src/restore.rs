//! Restore: the generator that turns a pending handoff into drop-ins, `kup-restore exec UNIT` (the
//! start of a marked unit on a handoff boot), and `finish`, which releases the handoff once every
//! unit is back.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::RestoreMode;
use crate::manifest::{self, UnitState};
use crate::update::{HANDOFF_DIR, NO_RESTART, RUN_DIR};
use crate::{criu, fallback, nft, systemd};

/// Where kup-restore is installed.
pub const KUP_RESTORE: &str = "/usr/lib/kup/kup-restore";
/// The drop-in name of a restoring start.
pub const RESTORE_DROPIN: &str = "50-kup-restore";
/// The service that feeds the hardware watchdog on a restoring boot until `finish` has decided
/// ([`crate::watchdog::feed_until_stopped`]).
pub const WATCHDOG_SERVICE: &str = "kup-watchdog.service";

/// Disarms the hardware watchdog of a restoring boot once the restore is decided: blessed, fallen
/// back (the fallback's switch arms it again) or given up.
pub fn release_watchdog() {
    if let Err(e) = systemd::systemctl(&["stop", "--no-block", WATCHDOG_SERVICE]) {
        tracing::warn!(
            kup_phase = "watchdog",
            "kup: cannot stop {WATCHDOG_SERVICE}: {e}"
        );
    }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0} is not in the handoff manifest; nothing to restore for it")]
    NotInManifest(String),
    #[error(
        "no holder process appeared in {0}'s cgroup (the drop-in's ExecStartPre= did not run?)"
    )]
    NoHolder(String),
    #[error(
        "PID {pid} that {unit} needs is taken by {comm:?}; the early boot hook should have kept it free (is kup's dracut module in this initrd?)"
    )]
    PidTaken {
        unit: String,
        pid: i32,
        comm: String,
    },
    #[error(transparent)]
    Criu(#[from] criu::CriuError),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error("telling systemd the restored main PID failed: {0}")]
    Notify(String),
    #[error(transparent)]
    Nft(#[from] crate::nft::NftError),
    #[error(transparent)]
    Images(#[from] crate::criu_image::ImageError),
    #[error(
        "{unit} kept TCP connections on {addresses}, which this boot has not configured after 60 s, so it was not restored; its images stay in {images}: check the network configuration of this boot"
    )]
    AddressMissing {
        unit: String,
        addresses: String,
        images: String,
    },
    #[error("lazy restore: {0}")]
    Lazy(String),
    #[cfg(feature = "failpoints")]
    #[error("failpoint {0} (a fault test)")]
    Injected(String),
    #[error("{0}")]
    NotRestored(String),
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

use crate::io;

/// The pending handoff id recorded by the early boot, if this boot must restore.
pub fn pending() -> Option<String> {
    std::fs::read_to_string(Path::new(RUN_DIR).join("pending"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Whether `u`'s checkpoint is on disk to restore from: dumped, and on a boot that resumes an
/// unfinished handoff also restored or failed on the boot that did not finish.
fn has_images(u: &manifest::UnitImage) -> bool {
    u.state != UnitState::Pending
}

/// The unit that takes the luo backend's images back from RAM (`kup-restore luo-claim`).
pub const LUO_SERVICE: &str = "kup-luo.service";

/// Whether this boot resumes an unfinished handoff it was not made for (`/run/kup/resumed`, written
/// by the early boot).
pub fn resumed() -> bool {
    Path::new(RUN_DIR).join("resumed").exists()
}

/// systemd generator: when a handoff is pending, every dumped unit gets the restoring drop-in and
/// kup-restore.target is pulled into the boot.
pub fn generate(early_dir: &Path) -> Result<usize, RestoreError> {
    let Some(id) = pending() else { return Ok(0) };
    let m = manifest::read(Path::new(HANDOFF_DIR))?;
    if m.id != id {
        return Ok(0);
    }
    let link = |dir: &str, name: &str, target: &str| -> Result<(), RestoreError> {
        let d = early_dir.join(dir);
        std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
        let l = d.join(name);
        let _ = std::fs::remove_file(&l);
        std::os::unix::fs::symlink(target, &l).map_err(io(format!("linking {}", l.display())))?;
        Ok(())
    };
    let mut n = 0;
    // luo backend: the images come back from RAM first (kup-luo.service, `luo_store::claim`).
    let luo = m.backend == crate::config::Backend::Luo.as_str();
    for u in m.units.iter().filter(|u| has_images(u)) {
        let path = early_dir.join(format!("{}.d/{RESTORE_DROPIN}.conf", u.unit));
        let dropin = systemd::restore_dropin(&u.unit, KUP_RESTORE, luo.then_some(LUO_SERVICE));
        systemd::write_dropin(&path, &dropin)?;
        link(
            "kup-restore.target.wants",
            &u.unit,
            &format!("/usr/lib/systemd/system/{}", u.unit),
        )?;
        n += 1;
    }
    link(
        "multi-user.target.wants",
        "kup-restore.target",
        "/usr/lib/systemd/system/kup-restore.target",
    )?;
    let luo_unit = luo.then_some(LUO_SERVICE);
    for unit in [
        "kup-restore-finish.service",
        "kup-netlock.service",
        WATCHDOG_SERVICE,
    ]
    .into_iter()
    .chain(luo_unit)
    {
        link(
            "kup-restore.target.wants",
            unit,
            &format!("/usr/lib/systemd/system/{unit}"),
        )?;
    }
    Ok(n)
}

/// `kup-restore exec UNIT`: runs as the unit's ExecStart (full privileges, in the unit's cgroup) while
/// the holder from ExecStartPre= keeps the unit's fresh sandbox; restores the checkpoint inside it and
/// hands systemd the restored main PID. Returns that PID. A failure is recorded in the manifest
/// (the unit's state), where `finish` finds it.
pub fn exec(unit: &str) -> Result<Restored, RestoreError> {
    let restored = restore_unit(unit);
    if let Err(e) = &restored {
        let _ = manifest::update(Path::new(HANDOFF_DIR), |m| {
            if let Some(entry) = m.unit_mut(unit) {
                entry.state = UnitState::Failed(e.to_string());
            }
        });
    }
    restored
}

/// A unit's restore: the PID systemd was handed and where the time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub pid: i32,
    pub steps: RestoreSteps,
}

/// Seconds spent in each step of one unit's restore (`kup-restore exec`), in their order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreSteps {
    /// The image check (`criu_image::check`).
    pub check: f64,
    /// Starting the lazy-pages server (lazy restores only).
    pub lazy_server: f64,
    /// Waiting for the kept connections' local addresses, and which they were.
    pub address_wait: f64,
    pub addresses: Vec<String>,
    /// CRIU's restore, up to the tree running.
    pub criu: f64,
}

impl std::fmt::Display for RestoreSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.check + self.lazy_server + self.address_wait + self.criu;
        write!(f, "in {total:.1} s: images checked in {:.1} s", self.check)?;
        if self.lazy_server > 0.0 {
            write!(f, ", lazy-pages server up in {:.1} s", self.lazy_server)?;
        }
        if !self.addresses.is_empty() {
            write!(
                f,
                ", {:.1} s waiting for {}",
                self.address_wait,
                self.addresses.join(", ")
            )?;
        }
        write!(f, ", CRIU restore {:.1} s", self.criu)
    }
}

fn restore_unit(unit: &str) -> Result<Restored, RestoreError> {
    let m = manifest::read(Path::new(HANDOFF_DIR))?;
    let u = m
        .unit(unit)
        .ok_or_else(|| RestoreError::NotInManifest(unit.to_owned()))?
        .clone();
    let holder = find_holder(unit)?;
    // Fault tests: another process takes the unit's main PID first.
    #[cfg(feature = "failpoints")]
    if fail::eval("pid-taken", |_| ()).is_some() {
        crate::failpoints::take_pid(u.main_pid);
    }
    for &pid in &u.pids {
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            return Err(RestoreError::PidTaken {
                unit: unit.to_owned(),
                pid,
                comm: comm.trim().to_owned(),
            });
        }
    }
    let mut steps = RestoreSteps::default();
    let mut probe = criu::warm_probe();
    let images = PathBuf::from(&u.images);
    let t = Instant::now();
    // Memory kept in place: the vDSO's pages, stored beside it, join it first.
    crate::foam::merge_into_whole(&images).map_err(crate::criu_image::ImageError::from)?;
    crate::criu_image::check(&images)?;
    let lazy = m.restore == RestoreMode::Lazy;
    // An eager restore of a dump into FOAM: CRIU reads every page itself, from its pages files
    // (counted with the check).
    if !lazy && images.join(crate::foam::DIR).is_dir() {
        crate::foam::fill_pages_files(&images).map_err(crate::criu_image::ImageError::from)?;
    }
    // Memory kept in place (luo, PPP): the few pages CRIU reads itself (stacks, ...) come from the
    // memory the kernel handed back; the rest is the lazy-pages server's.
    if lazy && images.join(crate::foam::DIR).is_dir() {
        crate::foam::fill_in_place(&images).map_err(crate::criu_image::ImageError::from)?;
    }
    steps.check = t.elapsed().as_secs_f64();
    // Everything that does not need the network comes before the wait for it: the lazy-pages
    // server starts and CRIU probes the kernel (`warm_probe` above, cached in /run for the
    // restore's own CRIU) while the boot is still configuring the addresses.
    if lazy {
        let t = Instant::now();
        start_lazy_pages(unit)?;
        steps.lazy_server = t.elapsed().as_secs_f64();
    }
    // A kept connection is restored onto its own local address: the unit's ordering (e.g. after
    // network.target) does not promise the address is configured yet, so wait for it.
    let t = Instant::now();
    let missing = crate::tcp::wait_local_addresses(&u.tcp, Duration::from_secs(60));
    steps.address_wait = t.elapsed().as_secs_f64();
    steps.addresses = crate::tcp::local_addresses(&u.tcp)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(RestoreError::AddressMissing {
            unit: unit.to_owned(),
            addresses: missing
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            images: images.display().to_string(),
        });
    }
    fail::fail_point!("restore-exec", |_| Err(RestoreError::Injected(
        "restore-exec".into()
    )));
    // Fault tests: the new kernel panics in the middle of the restores.
    fail::fail_point!("restore-panic", |_| {
        let _ = std::fs::write("/proc/sysrq-trigger", "c");
        Err(RestoreError::Injected("restore-panic".into()))
    });
    if let Some(mut p) = probe.take() {
        let _ = p.kill();
        let _ = p.wait();
    }
    let t = Instant::now();
    let pid = criu::restore(holder, &images, &u.inherit, lazy, unit)?;
    steps.criu = t.elapsed().as_secs_f64();
    // CRIU has turned the connections' repair mode off: they may talk again.
    nft::unlock(unit);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder),
        nix::sys::signal::Signal::SIGKILL,
    );
    libsystemd::daemon::notify(
        false,
        &[
            libsystemd::daemon::NotifyState::Other(format!("MAINPID={pid}")),
            libsystemd::daemon::NotifyState::Ready,
        ],
    )
    .map_err(|e| RestoreError::Notify(e.to_string()))?;
    manifest::update(Path::new(HANDOFF_DIR), |m| {
        if let Some(entry) = m.unit_mut(unit) {
            entry.state = UnitState::Restored;
        }
    })?;
    Ok(Restored { pid, steps })
}

/// Starts `kup-restore lazy UNIT` beside us and returns once its lazy-pages server listens.
fn start_lazy_pages(unit: &str) -> Result<(), RestoreError> {
    use std::io::BufRead as _;
    let me = std::env::current_exe().map_err(io("finding kup-restore"))?;
    let mut child = std::process::Command::new(me)
        .args(["lazy", unit])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(io("starting the lazy-pages server"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(io("waiting for the lazy-pages server"))?;
    }
    if line.trim() != LAZY_READY {
        let status = child.wait().map_err(io("waiting for kup-restore lazy"))?;
        return Err(RestoreError::Lazy(format!(
            "the lazy-pages server of {unit} did not start ({status}); see `journalctl -u {unit}`"
        )));
    }
    Ok(())
}

/// What `kup-restore lazy` prints once its daemon listens.
const LAZY_READY: &str = "listening";

/// `kup-restore lazy UNIT`: kup's lazy-pages server ([`crate::lazy_pages`]) for `unit`'s images,
/// pre-copy parents included, until every page is in the restored processes; then the images are
/// released. Started by `exec`, it lives in the unit's cgroup while it works; `kupctl status` and
/// the journal say when a unit is complete. Its notes go to `lazy-pages.log` in the images (kept in
/// [`LOG_DIR`] with CRIU's logs).
pub fn serve_lazy(unit: &str) -> Result<String, RestoreError> {
    let m = manifest::read(Path::new(HANDOFF_DIR))
        .or_else(|_| manifest::read(&Path::new(HANDOFF_DIR).with_file_name("handoff.done")))?;
    let u = m
        .unit(unit)
        .ok_or_else(|| RestoreError::NotInManifest(unit.to_owned()))?;
    let images = PathBuf::from(&u.images);
    let log_path = images.join("lazy-pages.log");
    let mut log =
        std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let served = crate::lazy_pages::serve(
        &images,
        || {
            use std::io::Write as _;
            println!("{LAZY_READY}");
            let _ = std::io::stdout().flush();
        },
        &mut log,
    );
    let marker = Path::new(RUN_DIR).join("lazy").join(unit);
    if let Some(d) = marker.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let s = match served {
        Ok(s) => s,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(log, "failed: {e}");
            let _ = std::fs::write(&marker, format!("failed: {e}\n"));
            return Err(RestoreError::Lazy(format!(
                "the lazy-pages server of {unit} failed: {e}; its images stay in {} (log: lazy-pages.log there)",
                images.display()
            )));
        }
    };
    drop(log);
    let _ = std::fs::write(&marker, "complete\n");
    // The handoff may still be pending (finish not run yet): it releases the images itself then.
    if pending().is_none() {
        release_images(unit, &images);
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    Ok(format!(
        "{unit}: every page is back ({:.1} s after the restore began; the restore finished at {:.1} s, then {:.1} s of background fill): {:.0} MiB lazy in {} process(es), {:.1} MiB on {} faults, {:.0} MiB in the background, {:.0} MiB dropped by the processes, {} zero pages",
        s.took.as_secs_f64(),
        s.restore_took.unwrap_or_default().as_secs_f64(),
        s.took
            .saturating_sub(s.restore_took.unwrap_or_default())
            .as_secs_f64(),
        mib(s.lazy_bytes),
        s.processes,
        mib(s.fault_bytes),
        s.faults,
        mib(s.background_bytes),
        mib(s.dropped_bytes),
        s.zero_pages
    ))
}

/// `kup-restore netlock` (kup-netlock.service, before the network is configured on a handoff boot):
/// the dumped units' established TCP connections are dropped, not reset, until each unit is back.
pub fn netlock() -> Result<usize, RestoreError> {
    let Some(id) = pending() else { return Ok(0) };
    let m = manifest::read(Path::new(HANDOFF_DIR))?;
    if m.id != id {
        return Ok(0);
    }
    let mut n = 0;
    for u in m.units.iter().filter(|u| has_images(u)) {
        nft::lock(&u.unit, &u.tcp)?;
        n += u.tcp.len();
    }
    if m.dry_run {
        crate::dryrun::vm_network(&m);
    }
    Ok(n)
}

/// `kup-restore holder` (the restoring drop-in's `ExecStartPre=`, sandboxed like the service): leaves
/// `kup-restore hold` behind in the unit's fresh namespaces and cgroup, and returns.
pub fn spawn_holder() -> Result<(), RestoreError> {
    let me = std::env::current_exe().map_err(io("finding kup-restore"))?;
    std::process::Command::new(me)
        .arg("hold")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(io("starting the holder"))?;
    Ok(())
}

/// `kup-restore hold`: keeps the namespaces alive until `exec` has restored into them and ends it.
pub fn hold() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The holder: the one process of our own cgroup that is not us.
fn find_holder(unit: &str) -> Result<i32, RestoreError> {
    let me = std::process::id() as i32;
    let cg =
        std::fs::read_to_string("/proc/self/cgroup").map_err(io("reading /proc/self/cgroup"))?;
    let path = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_owned();
    let procs = format!("/sys/fs/cgroup{path}/cgroup.procs");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let text = std::fs::read_to_string(&procs).unwrap_or_default();
        if let Some(p) = text
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .find(|p| *p != me)
        {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(RestoreError::NoHolder(unit.to_owned()))
}

/// Restores `unit` on the running kernel from the handoff's images (rollback before a switch).
pub fn restore_in_place(unit: &str) -> Result<(), RestoreError> {
    let dropin = systemd::runtime_dropin(unit, RESTORE_DROPIN);
    systemd::write_dropin(&dropin, &systemd::restore_dropin(unit, KUP_RESTORE, None))?;
    systemd::daemon_reload()?;
    let _ = systemd::systemctl(&["reset-failed", unit]);
    let started = systemd::systemctl(&["start", unit]);
    let _ = std::fs::remove_file(&dropin);
    let _ = std::fs::remove_file(systemd::runtime_dropin(unit, NO_RESTART));
    systemd::daemon_reload()?;
    started.map(|_| ()).map_err(RestoreError::from)
}

/// After kup-restore.target (kup-restore-finish.service): verifies the restore (every unit
/// restored, healthy, still up after the grace period; [`fallback::verify`]). When it holds, the
/// handoff is done: the images are released and the drop-ins disappear (a later crash or reboot
/// starts units normally). When it does not, the units go back to the previous kernel
/// ([`fallback::fall_back`]); a fallback handoff that fails again keeps the images and reports.
pub fn finish() -> Result<String, RestoreError> {
    let Some(id) = pending() else {
        return Ok("no handoff pending".into());
    };
    let dir = Path::new(HANDOFF_DIR);
    let m = manifest::read(dir)?;
    let _ = std::fs::remove_file(Path::new(RUN_DIR).join("pending"));
    let failures = fallback::verify(&m);
    // A dry-run's throwaway VM: report and power off; nothing to bless, release or fall back from.
    if m.dry_run {
        return crate::dryrun::vm_finish(&m, &failures).map_err(RestoreError::NotRestored);
    }
    fallback::unlock_running(&m, &failures);
    if !failures.is_empty() {
        let list = failures
            .iter()
            .map(|f| format!("{}: {}", f.unit, f.reason))
            .collect::<Vec<_>>()
            .join("; ");
        std::fs::write(
            Path::new(RUN_DIR).join("failed"),
            failures
                .iter()
                .map(|f| format!("{}\n", f.unit))
                .collect::<String>(),
        )
        .map_err(io("recording failed units"))?;
        let no_bounce = match (&m.fallback, resumed()) {
            (Some(of), _) => Some(format!(
                "handoff {id}, the fallback from {} to this kernel, failed too",
                of.kernel
            )),
            (None, true) => Some(format!(
                "handoff {id}, resumed on this boot after the switch to {} did not finish, failed",
                m.to_kernel
            )),
            (None, false) => None,
        };
        if let Some(what) = no_bounce {
            let msg = format!(
                "{what} ({list}); nothing more happens automatically: the images stay in {} for a manual restore (see docs/RELIABILITY.md)",
                m.image_dir
            );
            fallback::record(&m, fallback::Verdict::Failed, &msg, &failures);
            return Err(RestoreError::NotRestored(msg));
        }
        return match fallback::fall_back(&m, &failures) {
            Ok(how) => {
                let msg = format!("handoff {id} failed on this kernel ({list}); {how}");
                fallback::record(&m, fallback::Verdict::FallingBack, &msg, &failures);
                Ok(msg)
            }
            Err(e) => {
                let msg = format!(
                    "handoff {id} failed on this kernel ({list}), and the fallback could not start: {e}"
                );
                fallback::record(&m, fallback::Verdict::Failed, &msg, &failures);
                Err(RestoreError::NotRestored(msg))
            }
        };
    }
    for u in &m.units {
        // A lazily restored unit's pages may still be coming from its images: its server releases
        // them when it is done (or we do, when it already is).
        let lazy_done = Path::new(RUN_DIR).join("lazy").join(&u.unit);
        let serving = m.restore == RestoreMode::Lazy
            && std::fs::read_to_string(&lazy_done).map_or(true, |s| s.trim() != "complete");
        if !serving {
            release_images(&u.unit, Path::new(&u.images));
        }
    }
    // luo_disk_copy: the restore came from RAM; the copy for a boot through the firmware is spent.
    if let Some(copy) = &m.disk_copy {
        let _ = std::fs::remove_dir_all(copy);
    }
    let done = dir.with_file_name("handoff.done");
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(dir, &done).map_err(io("retiring the handoff directory"))?;
    systemd::systemctl(&["daemon-reload", "--no-block"])?;
    let (verdict, msg) = match &m.fallback {
        None if resumed() => (
            fallback::Verdict::Resumed,
            format!(
                "handoff {id}: the switch to {} did not finish (power loss, crash, panic or watchdog reset), so this boot restored {} unit(s) from the images",
                m.to_kernel,
                m.units.len()
            ),
        ),
        Some(of) => (
            fallback::Verdict::FellBack,
            format!(
                "handoff {id}: fell back from {} to this kernel; {} unit(s) restored here. What failed there: {}",
                of.kernel,
                m.units.len(),
                of.failures
                    .iter()
                    .map(|f| format!("{}: {}", f.unit, f.reason))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        None => (
            fallback::Verdict::Restored,
            format!("handoff {id}: {} unit(s) restored", m.units.len()),
        ),
    };
    fallback::record(&m, verdict, &msg, &[]);
    // Blessed: the one-shot next boot the switch set is no longer needed (and the kernel becomes
    // the default entry when configured).
    let here = crate::update::running_kernel();
    match crate::bootloader::blessed(&here, m.checks.make_default) {
        Ok(what) => tracing::info!(kup_phase = "verify", "kup: {what}"),
        Err(e) => tracing::warn!(
            kup_phase = "verify",
            "kup: cannot update the boot loader after the blessing ({e}); check `bootctl status`"
        ),
    }
    Ok(msg)
}

/// Where CRIU's logs of the last handoff are kept, per unit, once the images are released.
pub const LOG_DIR: &str = "/var/log/kup";

/// Keeps CRIU's logs of `unit` (dump, restore, lazy-pages) in [`LOG_DIR`] and removes its images.
/// The lazy-pages server and `finish` may both get here: the first to rename the images away does
/// it, the other finds nothing (and must not wipe the logs the first kept).
fn release_images(unit: &str, images: &Path) {
    let claimed = PathBuf::from(format!("{}.releasing", images.display()));
    if std::fs::rename(images, &claimed).is_err() {
        return;
    }
    let keep = Path::new(LOG_DIR).join(unit);
    let _ = std::fs::remove_dir_all(&keep);
    let _ = std::fs::create_dir_all(&keep);
    if let Ok(entries) = std::fs::read_dir(&claimed) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".log") {
                let _ = std::fs::copy(e.path(), keep.join(&name));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&claimed);
    // The last unit restored from a luo handoff's disk copy leaves no empty copy behind.
    if let Some(parent) = images.parent().filter(|p| {
        p.file_name()
            .is_some_and(|n| n == crate::update::DISK_COPY_DIR)
    }) {
        let _ = std::fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_steps_name_each_step_and_the_total() {
        let eager = RestoreSteps {
            check: 0.04,
            criu: 1.26,
            ..RestoreSteps::default()
        };
        assert_eq!(
            eager.to_string(),
            "in 1.3 s: images checked in 0.0 s, CRIU restore 1.3 s"
        );
        let lazy = RestoreSteps {
            check: 0.1,
            lazy_server: 0.4,
            address_wait: 2.5,
            addresses: vec!["10.0.2.15".into()],
            criu: 0.9,
        };
        assert_eq!(
            lazy.to_string(),
            "in 3.9 s: images checked in 0.1 s, lazy-pages server up in 0.4 s, 2.5 s waiting for 10.0.2.15, CRIU restore 0.9 s"
        );
    }
}
