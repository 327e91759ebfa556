//! The update, stage by stage on the running kernel: stage -> preflight -> freeze + dump -> switch.
//! Anything that fails before the switch puts every unit back as it was (restored in place from its
//! fresh checkpoint) and reports why; nothing is lost.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::config::{Backend, Settings};
use crate::manifest::{self, Manifest, UnitImage, UnitState};
use crate::{criu, kexec, restore, stage, systemd};

/// Where the handoff of the update in flight lives: manifest, id, pid floor.
pub const HANDOFF_DIR: &str = "/var/lib/kup/handoff";
/// kup's runtime directory.
pub const RUN_DIR: &str = "/run/kup";
/// `panic=` given to the new kernel unless its command line sets one: seconds before a panic reboots.
pub const PANIC_REBOOT_SECS: u32 = 10;
/// The luo backend's image directory: a tmpfs of kup's own (its files are preserved by LUO across
/// the kexec; on the new kernel the same paths lead to them again, `crate::luo::retrieve_tree`).
pub const LUO_DIR: &str = "/run/kup/luo";
/// The luo backend's disk copy (`luo_disk_copy`), in `image_dir`.
pub const DISK_COPY_DIR: &str = "luo-copy";
/// The luo backend's index of the preserved tree (`crate::luo::Index`), beside the manifest.
pub const LUO_INDEX: &str = "luo.json";
/// The drop-in name that keeps a unit from restarting while it is checkpointed.
pub const NO_RESTART: &str = "50-kup-no-restart";

/// Why an update was refused or failed before the switch.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("another update is running (lock {0} is held); wait for it to finish")]
    Busy(String),
    #[error("no units are marked: add [[unit]] name = \"NAME.service\" to /etc/kup/kup.toml")]
    NothingMarked,
    #[error(
        "the checkpoint of {unit} is not whole ({source}); check the disk under the image directory (kup.toml image_dir) and try again"
    )]
    Images {
        unit: String,
        source: crate::criu_image::ImageError,
    },
    #[error("{unit} cannot be checkpointed: {reason}; fix: {fix}")]
    Refused {
        unit: String,
        reason: String,
        fix: String,
    },
    #[error(
        "the target kernel's initrd {initrd} lacks kup's dracut module, so the new kernel could not restore; fix: dracut -f --kver {version} (with kup installed)"
    )]
    InitrdWithoutModule { initrd: String, version: String },
    #[error(
        "the luo backend keeps the checkpoints in RAM beside the running units: they need about {need_mib} MiB, the machine has {available_mib} MiB available; nothing was touched: free memory, or set backend = \"disk\" in /etc/kup/kup.toml"
    )]
    NoMemory { need_mib: u64, available_mib: u64 },
    #[error(
        "keeping the checkpoints in RAM across the switch failed: {0}; every unit was restored in place"
    )]
    Luo(String),
    #[error(
        "the image directory {dir} has {free_mib} MiB free, but the marked units' memory needs about {need_mib} MiB there; nothing was touched: free space there or point image_dir in /etc/kup/kup.toml at a larger filesystem"
    )]
    NoSpace {
        dir: String,
        free_mib: u64,
        need_mib: u64,
    },
    #[error(
        "the luo backend also copies the checkpoints to {dir} (luo_disk_copy), which has {free_mib} MiB free for about {need_mib} MiB; nothing was touched: free space there, point image_dir at a larger filesystem, or set luo_disk_copy = false in /etc/kup/kup.toml (a boot through the firmware then starts the units afresh)"
    )]
    NoSpaceForCopy {
        dir: String,
        free_mib: u64,
        need_mib: u64,
    },
    #[error(
        "the disk copy of the checkpoints kept in RAM (luo_disk_copy) failed: {0}; every unit was restored in place: check the disk under image_dir, or set luo_disk_copy = false in /etc/kup/kup.toml"
    )]
    DiskCopy(String),
    #[error(
        "the running kernel {version} cannot be the fallback if the restore fails on the new one: {reason}; fix: {fix}"
    )]
    NoFallback {
        version: String,
        reason: String,
        fix: String,
    },
    #[error(transparent)]
    Stage(#[from] stage::StageError),
    #[error("checkpoint of {unit} failed, every unit was left running: {source}")]
    Dump {
        unit: String,
        source: Box<criu::CriuError>,
    },
    #[error(
        "{unit}'s processes are gone and its checkpoint is not whole ({reason}); {restarted}; every other unit was left running. Check the disk under image_dir and CRIU's log"
    )]
    Lost {
        unit: String,
        reason: String,
        restarted: String,
    },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error("{0}; every unit was restored and keeps running on this kernel")]
    Switch(kexec::KexecError),
    #[error(
        "the FOAM image store of {unit} cannot be set up ({source}); every unit was left running: check the disk under image_dir, or set store = \"criu\" in /etc/kup/kup.toml"
    )]
    Foam {
        unit: String,
        source: crate::foam::FoamError,
    },
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

use crate::io;

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Kernel version; `None` = the configured one, else the newest installed.
    pub kernel: Option<String>,
    /// Extra kernel command-line arguments.
    pub append: String,
}

/// A checked update, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub target: stage::Target,
    /// The marked units, with their health commands.
    pub units: Vec<crate::config::UnitSettings>,
    pub image_dir: PathBuf,
    /// Where the images live across the switch (the configured backend, or disk where LUO is
    /// missing: `backend_note` says why).
    pub backend: Backend,
    pub backend_note: Option<String>,
    /// luo backend with `luo_disk_copy`: where the copy of the images on disk goes
    /// ([`DISK_COPY_DIR`] in `image_dir`).
    pub disk_copy: Option<PathBuf>,
    /// luo backend: the processes' memory is kept in place (`luo_in_place`, PPP), not copied.
    pub in_place: bool,
    /// Pre-copy rounds before the final dump (0 = none).
    pub precopy_rounds: u8,
    /// The form of the memory images: `Foam` or `Criu` (never `Auto`, see [`store_for`]).
    pub store: crate::config::Store,
    /// How the next kernel brings the memory back.
    pub restore: crate::config::RestoreMode,
    /// What the new kernel checks before it is blessed.
    pub checks: manifest::Checks,
}

/// Stage + preflight: resolves the target and checks everything that can be checked while every
/// service keeps running untouched.
pub fn plan(settings: &Settings, req: &Request) -> Result<Plan, UpdateError> {
    if settings.units.is_empty() {
        return Err(UpdateError::NothingMarked);
    }
    let id = manifest::new_handoff_id();
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(io("reading /proc/cmdline"))?;
    let wanted = req
        .kernel
        .clone()
        .or_else(|| settings.update.kernel.clone());
    let mut extra = [settings.update.extra_cmdline.as_str(), req.append.as_str()].join(" ");
    // A new kernel that panics reboots (into the firmware's default entry, whose early boot then
    // restores the unfinished handoff) instead of halting with every marked unit down.
    if !format!("{cmdline} {extra}")
        .split_whitespace()
        .any(|w| w.starts_with("panic="))
    {
        extra.push_str(&format!(" panic={PANIC_REBOOT_SECS}"));
    }
    // The new kernel keeps the hardware watchdog running through its own next kexec (a fallback,
    // the next update): without it most drivers stop the watchdog at any reboot.
    if settings.update.kexec_watchdog > 0
        && !format!("{cmdline} {extra}")
            .split_whitespace()
            .any(|w| w.starts_with("watchdog.stop_on_reboot="))
    {
        extra.push_str(&format!(" {}", crate::watchdog::KEEP_RUNNING_ARG));
    }
    let mut target = stage::resolve_target(
        Path::new(stage::BOOT_DIR),
        wanted.as_deref(),
        cmdline.trim(),
        &id,
        extra.trim(),
    )?;
    let (backend, backend_note) = choose_backend(settings.update.backend, &mut target);
    if let Some(note) = &backend_note {
        tracing::warn!(kup_phase = "preflight", "kup: {note}");
    }
    for u in &settings.units {
        preflight_unit(&u.name)?;
    }
    if !initrd_has_module(&target.initrd) {
        return Err(UpdateError::InitrdWithoutModule {
            initrd: target.initrd.display().to_string(),
            version: target.version.clone(),
        });
    }
    preflight_fallback(&running_kernel())?;
    let image_dir = match backend {
        Backend::Disk => settings.update.image_dir.clone(),
        Backend::Luo => PathBuf::from(LUO_DIR),
    };
    let disk_copy = (backend == Backend::Luo && settings.update.luo_disk_copy)
        .then(|| settings.update.image_dir.join(DISK_COPY_DIR));
    let in_place = backend == Backend::Luo
        && match in_place_for(settings, crate::luo::running_keeps_in_place) {
            Ok(()) => true,
            Err(why) => {
                if settings.update.luo_in_place {
                    tracing::info!(
                        kup_phase = "preflight",
                        "kup: the units' memory is copied into the checkpoints kept in RAM, not kept in place: {why}"
                    );
                }
                false
            }
        };
    preflight_space(settings, backend, in_place)?;
    // Kept in place, one pre-copy round still sets CRIU's dirty tracking (and gives the final
    // dump a parent to leave the unchanged pages to); it copies nothing.
    let precopy_rounds = if in_place {
        settings.update.precopy_rounds.max(1)
    } else {
        settings.update.precopy_rounds
    };
    Ok(Plan {
        id,
        target,
        units: settings.units.clone(),
        image_dir,
        backend,
        backend_note,
        disk_copy,
        in_place,
        precopy_rounds,
        store: if in_place {
            crate::config::Store::Foam
        } else {
            store_for(settings.update.store, backend, settings.update.restore)
        },
        restore: settings.update.restore,
        checks: manifest::Checks {
            health_timeout: settings.update.health_timeout,
            grace: settings.update.grace,
            kexec_watchdog: settings.update.kexec_watchdog,
            make_default: settings.update.make_default,
        },
    })
}

/// Whether the luo backend can keep the units' memory in place (`luo_in_place`): asked for, no
/// disk copy (which needs the memory copied), a lazy restore (which frees the kept pages as it
/// copies them in) and a running kernel that offers it (`running`); the reason when not.
pub fn in_place_for(
    settings: &Settings,
    running: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    let u = &settings.update;
    if !u.luo_in_place {
        return Err("luo_in_place = false".into());
    }
    if u.luo_disk_copy {
        return Err("luo_disk_copy is on, and a disk copy needs the memory copied (set luo_disk_copy = false to keep it in place)".into());
    }
    if u.restore != crate::config::RestoreMode::Lazy {
        return Err("restore = \"eager\" would hold the memory twice while it restores (set restore = \"lazy\" to keep it in place)".into());
    }
    running()
}

/// The form of the memory images: FOAM where asked for, or (`auto`) for a lazy restore, which reads
/// it page by page at the faulting address; CRIU's images otherwise, and always on the luo backend
/// (LUO allocates every hole of a file it preserves: a sparse FOAM file would fill the RAM).
pub fn store_for(
    wanted: crate::config::Store,
    backend: Backend,
    restore: crate::config::RestoreMode,
) -> crate::config::Store {
    use crate::config::{RestoreMode, Store};
    match (wanted, backend) {
        (Store::Foam, Backend::Luo) => {
            tracing::warn!(
                kup_phase = "preflight",
                "kup: store \"foam\" cannot be used with the luo backend (LUO would allocate every hole of its sparse files); CRIU's images are used"
            );
            Store::Criu
        }
        (_, Backend::Luo) => Store::Criu,
        (Store::Auto, Backend::Disk) if restore == RestoreMode::Lazy => Store::Foam,
        (Store::Auto, Backend::Disk) => Store::Criu,
        (s, Backend::Disk) => s,
    }
}

/// The backend this update uses: luo where it was asked for and both kernels have LUO, else disk
/// with the reason. A target kernel that has LUO gets `kho=on liveupdate=on` (so the update after
/// this one can keep memory, even when this one goes through the disk).
fn choose_backend(wanted: Backend, target: &mut stage::Target) -> (Backend, Option<String>) {
    if wanted == Backend::Disk {
        return (Backend::Disk, None);
    }
    let target_ok = crate::luo::kernel_supports(Path::new(stage::BOOT_DIR), &target.version);
    backend_for(target, target_ok, crate::luo::running_supports)
}

/// [`choose_backend`] for luo, given whether the target kernel has LUO and how to ask the running
/// one.
fn backend_for(
    target: &mut stage::Target,
    target_ok: Result<(), crate::luo::LuoError>,
    running_ok: impl FnOnce() -> Result<(), crate::luo::LuoError>,
) -> (Backend, Option<String>) {
    if target_ok.is_ok() {
        for arg in crate::luo::CMDLINE_ARGS {
            let key = arg.split('=').next().unwrap_or(arg);
            if !target
                .cmdline
                .split_whitespace()
                .any(|w| w.split('=').next() == Some(key))
            {
                target.cmdline.push(' ');
                target.cmdline.push_str(arg);
            }
        }
    }
    match target_ok.and_then(|()| running_ok()) {
        Ok(()) => (Backend::Luo, None),
        Err(e) => (
            Backend::Disk,
            Some(format!(
                "backend \"luo\" cannot be used for this update, the images go to disk: {e}"
            )),
        ),
    }
}

/// The checkpoints must fit: the marked units' memory (anonymous and shared pages of every
/// process, plus a tenth and 64 MiB for CRIU's metadata) against the free space of `image_dir`
/// (disk), or the memory available beside the running units (luo), and then also the free space
/// of `image_dir` for the disk copy (`luo_disk_copy`).
fn preflight_space(
    settings: &Settings,
    backend: Backend,
    in_place: bool,
) -> Result<(), UpdateError> {
    // Kept in place: nothing of the memory is copied, before or after the switch.
    if in_place {
        return Ok(());
    }
    let mut need_kib = 0;
    for u in &settings.units {
        let Some(pid) = systemd::main_pid(&u.name)? else {
            continue;
        };
        for p in criu::tree_pids(pid).unwrap_or_default() {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
                need_kib += process_memory_kib(&status, p);
            }
        }
    }
    let need_mib = (need_kib + need_kib / 10) / 1024 + 64;
    if backend == Backend::Luo {
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").map_err(io("reading /proc/meminfo"))?;
        let available_mib = meminfo_kib(&meminfo, "MemAvailable") / 1024;
        if need_mib > available_mib {
            return Err(UpdateError::NoMemory {
                need_mib,
                available_mib,
            });
        }
        if !settings.update.luo_disk_copy {
            return Ok(());
        }
    }
    // The directory may not exist yet: its nearest existing ancestor holds it then.
    let dir = &settings.update.image_dir;
    let existing = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let free_mib = nix::sys::statvfs::statvfs(existing)
        .map(|s| (s.blocks_available() * s.fragment_size()) >> 20)
        .map_err(|e| io(format!("reading the free space of {}", existing.display()))(e.into()))?;
    if need_mib > free_mib {
        let dir = dir.display().to_string();
        return Err(match backend {
            Backend::Disk => UpdateError::NoSpace {
                dir,
                free_mib,
                need_mib,
            },
            Backend::Luo => UpdateError::NoSpaceForCopy {
                dir,
                free_mib,
                need_mib,
            },
        });
    }
    Ok(())
}

/// A `/proc/meminfo` field in KiB (0 when absent).
pub fn meminfo_kib(meminfo: &str, field: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The memory a checkpoint of task `tid` holds, from its `/proc/TID/status`: RssAnon + RssShmem,
/// counted once per process (threads, whose Tgid is another, share it).
/// The processes among `tids` (threads of one process share its memory): those whose
/// `/proc/TID/status` says they lead their thread group.
fn thread_group_leaders(tids: &[i32]) -> Vec<i32> {
    tids.iter()
        .copied()
        .filter(|&t| {
            std::fs::read_to_string(format!("/proc/{t}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:"))
                    .is_some_and(|v| v.trim() == t.to_string())
            })
        })
        .collect()
}

pub fn process_memory_kib(status: &str, tid: i32) -> u64 {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if field("Tgid:").is_some_and(|tgid| tgid != u64::try_from(tid).unwrap_or(0)) {
        return 0;
    }
    field("RssAnon:").unwrap_or(0) + field("RssShmem:").unwrap_or(0)
}

/// `uname -r` of the running kernel.
pub fn running_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The running kernel is where the units go back if they cannot be restored on the new one: its
/// image must be installed and its initrd must carry kup's hook.
fn preflight_fallback(version: &str) -> Result<(), UpdateError> {
    let refuse = |reason: String, fix: String| UpdateError::NoFallback {
        version: version.to_owned(),
        reason,
        fix,
    };
    let image = stage::resolve_kernel(Path::new(stage::BOOT_DIR), Some(version)).map_err(|e| {
        refuse(
            e.to_string(),
            format!("reinstall the package of kernel {version} (its image and initrd in /boot)"),
        )
    })?;
    if !initrd_has_module(&image.initrd) {
        return Err(refuse(
            format!("its initrd {} lacks kup's hook", image.initrd.display()),
            "kupctl initrds --fix".to_owned(),
        ));
    }
    // A firmware boot (after a panic, hang or power loss of the new kernel) comes back through the
    // boot loader's entry for this kernel: its initrd must carry the hook too.
    let firmware = crate::bootloader::firmware_initrds(version).map_err(|e| {
        refuse(
            e.to_string(),
            format!(
                "kernel-install add {version} /boot/vmlinuz-{version} /boot/initrd.img-{version}"
            ),
        )
    })?;
    if let Some(initrds) = firmware {
        if !initrds.iter().any(|i| initrd_has_module(i)) {
            return Err(refuse(
                format!(
                    "the boot loader's initrd for it ({}) lacks kup's hook",
                    initrds
                        .iter()
                        .map(|i| i.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "kupctl initrds --fix (it refreshes the boot loader's copy too)".to_owned(),
            ));
        }
    }
    Ok(())
}

/// Checks one marked unit: loaded, running, and of a kind kup can restore.
pub fn preflight_unit(unit: &str) -> Result<(), UpdateError> {
    let refuse = |reason: &str, fix: &str| UpdateError::Refused {
        unit: unit.to_owned(),
        reason: reason.to_owned(),
        fix: fix.to_owned(),
    };
    if systemd::property(unit, "LoadState")? != "loaded" {
        return Err(refuse(
            "no such unit is loaded",
            "check the name in /etc/kup/kup.toml",
        ));
    }
    if systemd::main_pid(unit)?.is_none() {
        return Err(refuse(
            "it is not running (no main PID)",
            &format!("systemctl start {unit}, or unmark it"),
        ));
    }
    // PrivateUsers= (and DynamicUser=, which implies it) puts the service in a user namespace. CRIU
    // recreates each thread with its old TID (clone3 set_tid), which the kernel allows only with
    // CAP_CHECKPOINT_RESTORE in the host user namespace: a task inside the unit's namespace has none.
    if systemd::property(unit, "PrivateUsers")? == "yes"
        || systemd::property(unit, "DynamicUser")? == "yes"
    {
        return Err(refuse(
            "it runs in its own user namespace (PrivateUsers= or DynamicUser=), and CRIU 4.2 cannot \
             recreate its thread IDs inside a user namespace (clone3 set_tid needs CAP_CHECKPOINT_RESTORE \
             in the host user namespace)",
            "unmark it for now; see docs/ARCHITECTURE.md, \"User namespaces\"",
        ));
    }
    if let Some(pid) = systemd::main_pid(unit)? {
        for p in criu::tree_pids(pid).unwrap_or_default() {
            if let Some((fd, what)) = uncheckpointable_fd(p) {
                return Err(refuse(
                    &format!(
                        "process {p} holds {what} (/proc/{p}/fd/{fd}), which CRIU cannot checkpoint"
                    ),
                    "unmark it, or run the service without it (e.g. another I/O backend)",
                ));
            }
        }
    }
    Ok(())
}

/// The first descriptor of process `pid` that CRIU cannot checkpoint, and what it is.
fn uncheckpointable_fd(pid: i32) -> Option<(String, &'static str)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().find_map(|e| {
        let link = std::fs::read_link(e.path()).ok()?;
        let what = uncheckpointable(&link.to_string_lossy())?;
        Some((e.file_name().to_string_lossy().into_owned(), what))
    })
}

/// What a descriptor is, by its `/proc/PID/fd` link, when CRIU 4.2 cannot checkpoint it.
pub fn uncheckpointable(link: &str) -> Option<&'static str> {
    match link {
        "anon_inode:[io_uring]" => Some("an io_uring instance"),
        _ => None,
    }
}

/// Whether the initrd carries kup's early-boot hook.
fn initrd_has_module(initrd: &Path) -> bool {
    crate::initrd::has_module(initrd)
}

/// Freeze + dump every unit, write the manifest, load the kernel and ask systemd to switch.
/// Returns once systemd has the kexec job; on any failure every unit is back and running.
pub fn run(plan: &Plan, progress: &dyn Fn(&str, u32)) -> Result<(), UpdateError> {
    std::fs::create_dir_all(RUN_DIR).map_err(io(format!("creating {RUN_DIR}")))?;
    let lock_path = format!("{RUN_DIR}/update.lock");
    let lock = File::create(&lock_path).map_err(io(format!("creating {lock_path}")))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
        .map_err(|_| UpdateError::Busy(lock_path.clone()))?;

    let handoff = Path::new(HANDOFF_DIR);
    if handoff.exists() {
        std::fs::remove_dir_all(handoff)
            .map_err(io(format!("removing the stale {HANDOFF_DIR}")))?;
    }
    let mut m = Manifest {
        version: manifest::MANIFEST_VERSION,
        id: plan.id.clone(),
        created: manifest::unix_now(),
        from_kernel: running_kernel(),
        to_kernel: plan.target.version.clone(),
        cmdline_old: std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        backend: plan.backend.as_str().into(),
        image_dir: plan.image_dir.display().to_string(),
        // Named once the copy is whole (after the final dumps): a boot through the firmware before
        // that finds no copy to trust and starts the units afresh.
        disk_copy: None,
        restore: plan.restore,
        checks: plan.checks,
        fallback: None,
        dry_run: false,
        units: Vec::new(),
    };
    manifest::write_atomic(handoff, &m)?;
    // From here on, a boot that finds this handoff unfinished (power loss, crash) restores what it
    // lists: the early boot needs the id and the PID floor before the first unit is dumped.
    write_boot_files(&m)?;
    let n = plan.units.len() as u32;
    if plan.backend == Backend::Luo {
        if let Err(e) = crate::luo_store::mount_tmpfs(&plan.image_dir) {
            rollback(&m);
            return Err(UpdateError::Luo(e.to_string()));
        }
    }
    if let Some(copy) = &plan.disk_copy {
        let _ = std::fs::remove_dir_all(copy);
    }
    // What does not need the services frozen happens while they still serve: the target kernel is
    // loaded now, not between the last pre-copy round and the final dumps (whatever the units
    // write in between, the final dumps copy while frozen).
    if let Err(e) = kexec::load(&plan.target) {
        rollback(&m);
        return Err(UpdateError::Switch(e));
    }
    // Pre-copy: every unit's memory goes to disk while all of them keep serving; the final dumps
    // below then write only what changed since.
    let mut parents = Vec::new();
    let mut memories = Vec::new();
    for (i, unit) in plan.units.iter().enumerate() {
        if plan.precopy_rounds > 0 {
            progress("pre-copy", 5 + 30 * i as u32 / n);
        }
        let images = plan.image_dir.join(&unit.name);
        let _ = std::fs::remove_dir_all(&images);
        let mut memory = match plan.store {
            crate::config::Store::Foam => {
                let foam = images.join(crate::foam::DIR);
                let created = if plan.in_place {
                    crate::page_server::Memory::create_in_place(&foam)
                } else {
                    crate::page_server::Memory::create(&foam)
                };
                match created {
                    Ok(m) => Some(m),
                    Err(source) => {
                        kexec::unload();
                        rollback(&m);
                        return Err(UpdateError::Foam {
                            unit: unit.name.clone(),
                            source,
                        });
                    }
                }
            }
            _ => None,
        };
        parents.push(precopy(
            &unit.name,
            &images,
            plan.precopy_rounds,
            memory.as_mut(),
        ));
        memories.push(memory);
    }
    // luo_disk_copy: the pre-copy rounds go to the disk copy while the units still serve.
    if let Some(copy) = &plan.disk_copy {
        if let Err(e) = copy_to_disk(&plan.image_dir, copy, "pre-copy rounds, the units serving") {
            kexec::unload();
            rollback(&m);
            return Err(e);
        }
    }
    // Memory kept in place: the holder takes each unit's processes at its post-dump.
    let mut held = None;
    if plan.in_place {
        match crate::luo_store::hold_in_place(&plan.image_dir, &m.id, handoff) {
            Ok(h) => held = Some(h),
            Err(e) => {
                kexec::unload();
                rollback(&m);
                return Err(UpdateError::Luo(e.to_string()));
            }
        }
    }
    // When the first final dump froze its unit: the downtime begins there.
    let mut frozen = None;
    for (i, unit) in plan.units.iter().enumerate() {
        progress("dump", 40 + 40 * i as u32 / n);
        let images = plan.image_dir.join(&unit.name);
        let recorded = dump_unit(
            &unit.name,
            &images,
            parents[i].as_deref(),
            memories[i].as_mut(),
            held.as_mut(),
        )
        .and_then(|(mut img, began)| {
            frozen.get_or_insert(began);
            if plan.restore == crate::config::RestoreMode::Lazy
                && parents[i].is_some()
                && memories[i].is_none()
            {
                mark_precopied_lazy(&unit.name, &images);
            }
            img.health.clone_from(&unit.health);
            m.units.push(img);
            manifest::write_atomic(handoff, &m)?;
            write_boot_files(&m)
        });
        // Nothing switched: every unit dumped so far (this one too, once in the manifest) comes
        // back in place.
        if let Err(e) = recorded {
            kexec::unload();
            give_back(held);
            rollback(&m);
            return Err(e);
        }
    }
    // luo_disk_copy: the final dumps too (frozen), before the holder takes the files; then the
    // manifest names the copy (the last write of the manifest before the switch).
    if let Some(copy) = &plan.disk_copy {
        if let Err(e) = copy_to_disk(&plan.image_dir, copy, "final dumps, the units frozen")
            .and_then(|()| {
                m.disk_copy = Some(copy.display().to_string());
                manifest::write_atomic(handoff, &m).map_err(UpdateError::from)
            })
        {
            kexec::unload();
            rollback(&m);
            return Err(e);
        }
    }
    progress("switch", 90);
    // Fault tests: a disk that damages the manifest after it was written.
    #[cfg(feature = "failpoints")]
    if fail::eval("manifest-corrupt", |_| ()).is_some() {
        let _ = std::fs::write(
            manifest::manifest_path(handoff),
            b"{\"version\": 1, \"id\": \"dam",
        );
        nix::unistd::sync();
    }
    // luo: the image tree goes into a LUO session held by a process that outlives the shutdown.
    let held = match (plan.backend, held) {
        (Backend::Luo, Some(mut h)) => match h.seal() {
            Ok(()) => Some(h),
            Err(e) => {
                kexec::unload();
                give_back(Some(h));
                rollback(&m);
                return Err(UpdateError::Luo(e.to_string()));
            }
        },
        (Backend::Luo, None) => match crate::luo_store::hold(&plan.image_dir, &m.id, handoff) {
            Ok(h) => Some(h),
            Err(e) => {
                kexec::unload();
                rollback(&m);
                return Err(UpdateError::Luo(e.to_string()));
            }
        },
        (Backend::Disk, _) => None,
    };
    // Fault tests: hold the update here, every unit dumped, the switch not begun (a power cut now).
    fail::fail_point!("switch");
    if let Err(e) = kexec::switch(
        plan.checks.kexec_watchdog,
        &m.from_kernel,
        &plan.target.version,
    ) {
        kexec::unload();
        give_back(held);
        rollback(&m);
        return Err(UpdateError::Switch(e));
    }
    tracing::info!(
        kup_phase = "switch",
        "kup: switching to {} {:.1} s after the first final dump froze its unit",
        plan.target.version,
        frozen.map_or(0.0, |t| t.elapsed().as_secs_f64())
    );
    Ok(())
}

/// The switch will not happen: the LUO holder, if any, writes what it holds back into the image
/// tree (the rollback restores from there).
fn give_back(held: Option<crate::luo_store::Held>) {
    if let Some(h) = held {
        if let Err(e) = h.give_back() {
            tracing::error!("kup: {e}");
        }
    }
}

/// luo backend with `luo_disk_copy`: copies what the image tree `images` has that the disk copy
/// `copy` lacks and syncs it, so that a boot through the firmware (which does not keep RAM) finds
/// the images.
fn copy_to_disk(images: &Path, copy: &Path, when: &str) -> Result<(), UpdateError> {
    let t = std::time::Instant::now();
    let bytes = crate::luo_store::copy_out(images, copy).map_err(|e| {
        UpdateError::DiskCopy(format!(
            "copying {} to {}: {e}",
            images.display(),
            copy.display()
        ))
    })?;
    nix::unistd::sync();
    tracing::info!(
        kup_phase = "dump",
        "kup: disk copy ({when}): {} MiB to {} in {:.1} s",
        bytes >> 20,
        copy.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The image check of one unit's fresh checkpoint ([`crate::criu_image::check`]).
pub(crate) fn check_images(unit: &str, images: &Path) -> Result<(), UpdateError> {
    // Fault tests: damage the checkpoint the way a bad disk would (a pages file one page short).
    #[cfg(feature = "failpoints")]
    if fail::eval("images-corrupt", |_| ()).is_some() {
        crate::failpoints::truncate_pages(images);
    }
    crate::criu_image::check(images)
        .map(|_| ())
        .map_err(|source| UpdateError::Images {
            unit: unit.to_owned(),
            source,
        })
}

/// What the early boot reads without parsing JSON, beside the manifest: which handoff this is, and
/// the PID floor (every PID of a dumped tree stays free). Synced to disk with everything before.
pub(crate) fn write_boot_files(m: &Manifest) -> Result<(), UpdateError> {
    write_boot_files_in(Path::new(HANDOFF_DIR), m)
}

/// [`write_boot_files`] into the handoff directory `handoff` (a dry-run's is not the real one).
pub(crate) fn write_boot_files_in(handoff: &Path, m: &Manifest) -> Result<(), UpdateError> {
    let floor = m
        .units
        .iter()
        .flat_map(|u| u.pids.iter())
        .max()
        .copied()
        .unwrap_or(0);
    let write = |name: &str, text: String| {
        let path = handoff.join(name);
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
    };
    write("pid-floor", format!("{floor}\n"))?;
    write("id", format!("{}\n", m.id))?;
    nix::unistd::sync();
    Ok(())
}

/// Pre-dumps `unit` into `images/pre-K` up to `rounds` times (the pages into `memory`, FOAM, when
/// given), stopping early when a round copies no less than the one before (the service dirties
/// memory as fast as it is copied). Returns the last round's directory relative to `images`, for
/// the final dump; `None` when there is none (no rounds, or one failed: the final dump then copies
/// everything, since a CRIU that died after resetting the dirty bits leaves no round to trust).
fn precopy(
    unit: &str,
    images: &Path,
    rounds: u8,
    mut memory: Option<&mut crate::page_server::Memory>,
) -> Option<String> {
    let pid = systemd::main_pid(unit).ok().flatten()?;
    let mut last: Option<(String, u64)> = None;
    for round in 1..=rounds {
        let name = format!("pre-{round}");
        let dir = images.join(&name);
        if std::fs::create_dir_all(&dir).is_err() {
            break;
        }
        let parent = last.as_ref().map(|(p, _)| format!("../{p}"));
        // The rounds before this one go to disk while the unit serves: only the last round and the
        // final dump are left for the sync under freeze. (Not after the last round: whatever the
        // unit writes between that round and its freeze, the final dump copies frozen.)
        if last.is_some() {
            nix::unistd::sync();
        }
        let t = std::time::Instant::now();
        let tables = crate::nft::criu_tables();
        // Bytes copied: counted by the page server (FOAM), else what CRIU wrote.
        let copied = match memory.as_deref_mut() {
            Some(mem) => into_foam(mem, None, unit, |ps| {
                criu::pre_dump(pid, &dir, parent.as_deref(), unit, ps)
            })
            .map(|((), stats)| stats.bytes),
            None => {
                criu::pre_dump(pid, &dir, parent.as_deref(), unit, None).map(|()| dir_bytes(&dir))
            }
        };
        let bytes = match copied {
            Ok(bytes) => bytes,
            Err(e) => {
                let pids = criu::tree_pids(pid).unwrap_or_else(|_| vec![pid]);
                let let_go = let_go(unit, &pids, &tables);
                let _ = std::fs::remove_dir_all(&dir);
                tracing::warn!(
                    unit,
                    kup_phase = "pre-copy",
                    round,
                    "pre-copy round failed ({let_go}), the final dump copies everything: {e}"
                );
                return None;
            }
        };
        tracing::info!(
            unit,
            kup_phase = "pre-copy",
            round,
            mib = bytes >> 20,
            seconds = t.elapsed().as_secs_f64(),
            "kup: pre-copy of {unit} round {round}: {} MiB in {:.1} s",
            bytes >> 20,
            t.elapsed().as_secs_f64()
        );
        let shrinking = last.as_ref().is_none_or(|(_, prev)| bytes < *prev);
        last = Some((name, bytes));
        if !shrinking {
            break;
        }
    }
    last.map(|(name, _)| name)
}

/// Runs `call`, a CRIU run of `unit` given the page-server socket, while kup serves it into
/// `memory` (FOAM); with `images`, the restore's pagemaps are written there once CRIU has sent
/// everything. A failure of either side is the run's failure.
pub(crate) fn into_foam<T>(
    memory: &mut crate::page_server::Memory,
    images: Option<&Path>,
    unit: &str,
    call: impl FnOnce(Option<std::os::fd::OwnedFd>) -> Result<T, criu::CriuError>,
) -> Result<(T, crate::page_server::RunStats), criu::CriuError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = match socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(pair) => pair,
        Err(e) => {
            return Err(criu::CriuError::Spawn {
                program: "socketpair (kup's page server)".into(),
                source: e.into(),
            });
        }
    };
    std::thread::scope(|s| {
        let server = s.spawn(move || memory.serve(ours, images));
        // `call` hands CRIU its end and closes ours: the server sees the end when CRIU is gone.
        let done = call(Some(theirs));
        let served = server.join().unwrap_or_else(|_| {
            Err(crate::page_server::PageServerError::Protocol(
                "the page server stopped (panic)".into(),
            ))
        });
        match (done, served) {
            (Ok(t), Ok(stats)) => Ok((t, stats)),
            (Err(e), Ok(_)) => Err(e),
            (done, Err(se)) => Err(criu::CriuError::PageServer {
                what: unit.to_owned(),
                reason: se.to_string(),
                criu: done.map_or_else(|e| e.to_string(), |_| "it finished".into()),
            }),
        }
    })
}

/// Bytes in the files of a directory (the pages a pre-dump wrote).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A lazy restore after pre-copy: the pages the final dump left in the pre-copy images get
/// `PE_LAZY` too, so the restore leaves them to kup's lazy-pages server instead of reading them
/// all before the unit resumes.
fn mark_precopied_lazy(unit: &str, images: &Path) {
    match crate::criu_image::mark_parent_pages_lazy(images) {
        Ok(n) => tracing::info!(
            unit,
            kup_phase = "dump",
            "kup: {} MiB of pre-copied pages of {unit} will be restored lazily",
            (n * 4096) >> 20
        ),
        // Each pagemap is replaced atomically and only gains flags its parents justify: a failure
        // leaves images that restore correctly, with those pages read eagerly.
        Err(e) => tracing::warn!(
            unit,
            kup_phase = "dump",
            "kup: the pre-copied pages of {unit} will be restored eagerly: {e}"
        ),
    }
}

/// Checkpoints one unit: its process tree stops and is written to `images` (only what changed
/// since the pre-copy round `parent`, a directory relative to `images`, when given), its memory
/// into `memory` (FOAM in `images`) when given.
pub(crate) fn dump_unit(
    unit: &str,
    images: &Path,
    parent: Option<&str>,
    memory: Option<&mut crate::page_server::Memory>,
    mut keep: Option<&mut crate::luo_store::Held>,
) -> Result<(UnitImage, std::time::Instant), UpdateError> {
    let pid = systemd::main_pid(unit)?.ok_or_else(|| UpdateError::Refused {
        unit: unit.to_owned(),
        reason: "it stopped before its checkpoint".into(),
        fix: format!("systemctl start {unit} and update again"),
    })?;
    if parent.is_none() && memory.is_none() && images.exists() {
        std::fs::remove_dir_all(images)
            .map_err(io(format!("removing old images {}", images.display())))?;
    }
    std::fs::create_dir_all(images).map_err(io(format!("creating {}", images.display())))?;
    let dump_err = |source| UpdateError::Dump {
        unit: unit.to_owned(),
        source: Box::new(source),
    };
    let stdio = criu::read_stdio(pid).map_err(dump_err)?;
    let pids = criu::tree_pids(pid).map_err(dump_err)?;
    systemd::write_dropin(
        &systemd::runtime_dropin(unit, NO_RESTART),
        systemd::NO_RESTART_DROPIN,
    )?;
    systemd::daemon_reload()?;
    let t = std::time::Instant::now();
    let tables = crate::nft::criu_tables();
    // Read while CRIU holds the tree frozen after its dump: exactly the connections in the images.
    // The images are checked then too: a checkpoint that is not whole fails the dump, and CRIU
    // resumes the tree instead of killing it.
    let mut tcp = Vec::new();
    let mut post_dump = || {
        tcp = crate::tcp::established(&pids);
        // Memory kept in place: preserved now, the tree frozen and still there (CRIU kills it
        // after this; a failure here resumes it).
        if let Some(h) = keep.as_deref_mut() {
            h.keep(unit, &thread_group_leaders(&pids))
                .map_err(|e| format!("its memory cannot be kept in place: {e}"))?;
        }
        check_images(unit, images).map_err(|e| match e {
            UpdateError::Images { source, .. } => format!("its images are not whole: {source}"),
            other => other.to_string(),
        })
    };
    let dumped = match memory {
        None => criu::dump(pid, images, &stdio, parent, unit, None, &mut post_dump),
        // A page server that fails after CRIU killed the tree is handled below like any CRIU
        // failure then: the update goes on only from images that pass their check.
        Some(mem) => into_foam(mem, Some(images), unit, |ps| {
            criu::dump(pid, images, &stdio, parent, unit, ps, &mut post_dump)
        })
        .map(|((), stats)| {
            tracing::info!(
                unit,
                kup_phase = "dump",
                "kup: final dump of {unit} into FOAM: {} MiB copied, {} MiB unchanged since pre-copy",
                stats.bytes >> 20,
                stats.parent_bytes >> 20
            );
        }),
    };
    if let Err(e) = dumped {
        let unfreeze = || {
            let _ = std::fs::remove_file(systemd::runtime_dropin(unit, NO_RESTART));
            let _ = systemd::daemon_reload();
        };
        if !gone(pid) {
            // CRIU resumes the tree when a dump fails (and a dead CRIU lets go of it): the unit is
            // still running as before, once what a dead CRIU held is undone.
            let_go(unit, &pids, &tables);
            unfreeze();
            return Err(dump_err(e));
        }
        // The tree is gone: CRIU killed it after the dump and failed (or died) before it answered.
        match check_images(unit, images) {
            // Exactly where a dump that succeeds leaves the unit (its connections still locked, by
            // CRIU's table): the update goes on from these images.
            Ok(()) => tracing::warn!(
                unit,
                kup_phase = "dump",
                "kup: CRIU failed after {unit}'s checkpoint was whole and its processes gone; going on from the checked images: {e}"
            ),
            // The worst case: no whole checkpoint and no process. The unit starts afresh, so at
            // least it serves again, and the error says what was lost.
            Err(not_whole) => {
                let_go(unit, &pids, &tables);
                unfreeze();
                let restarted = systemd::systemctl(&["start", unit]).map_or_else(
                    |s| format!("starting it afresh failed too: {s}"),
                    |_| "it was started afresh, without its in-memory state".into(),
                );
                return Err(UpdateError::Lost {
                    unit: unit.to_owned(),
                    reason: format!("{e}; then {not_whole}"),
                    restarted,
                });
            }
        }
    }
    tracing::info!(
        unit,
        kup_phase = "dump",
        seconds = t.elapsed().as_secs_f64(),
        connections = tcp.len(),
        "kup: final dump of {unit} in {:.1} s ({} established TCP connection(s) kept)",
        t.elapsed().as_secs_f64(),
        tcp.len()
    );
    Ok((dumped_image(unit, pid, pids, images, stdio, tcp), t))
}

/// What a manifest lists for a unit checkpointed whole into `images` (its health command is the
/// caller's to add).
pub(crate) fn dumped_image(
    unit: &str,
    pid: i32,
    pids: Vec<i32>,
    images: &Path,
    stdio: criu::Stdio,
    tcp: Vec<crate::tcp::TcpConn>,
) -> UnitImage {
    UnitImage {
        unit: unit.to_owned(),
        main_pid: pid,
        pids,
        images: images.display().to_string(),
        external: stdio.external,
        inherit: stdio.inherit,
        tcp,
        health: None,
        state: UnitState::Dumped,
    }
}

/// Undoes what a CRIU that failed or died may have left on `unit`'s tree `pids`: its network-lock
/// tables (those not in `tables_before`) and established sockets in repair mode. A CRIU that
/// finishes cleans up itself; one that is killed does not, and the tree (let go by the kernel when
/// its tracer dies) would keep running with its connections silent. Says what it undid.
pub(crate) fn let_go(unit: &str, pids: &[i32], tables_before: &[String]) -> String {
    let sockets = crate::tcp::leave_repair(pids);
    let tables: Vec<String> = crate::nft::criu_tables()
        .into_iter()
        .filter(|t| !tables_before.contains(t))
        .collect();
    for t in &tables {
        crate::nft::delete_table(t);
    }
    if sockets == 0 && tables.is_empty() {
        return "CRIU left nothing behind".into();
    }
    let what = format!(
        "{sockets} socket(s) of {unit} taken out of repair mode, CRIU's lock table(s) {} removed",
        if tables.is_empty() {
            "(none)".to_owned()
        } else {
            tables.join(", ")
        }
    );
    tracing::warn!(unit, kup_phase = "dump", "kup: {what}");
    what
}

/// Whether the tree at `pid` is gone, given a second to finish dying (a tree that CRIU let go of
/// stays alive).
fn gone(pid: i32) -> bool {
    let t0 = std::time::Instant::now();
    while alive(pid) {
        if t0.elapsed() > std::time::Duration::from_secs(1) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Whether process `pid` is alive (a zombie is not).
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// Restores every dumped unit on this kernel after a failure before the switch.
pub(crate) fn rollback(m: &Manifest) {
    for u in &m.units {
        if let Err(e) = restore::restore_in_place(&u.unit) {
            tracing::error!(unit = %u.unit, "rollback restore failed: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(HANDOFF_DIR);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luo_is_used_only_where_both_kernels_have_it_and_the_target_gets_its_arguments() {
        use crate::luo::LuoError;
        let target = || stage::Target {
            version: "7.3.4-kup".into(),
            vmlinuz: PathBuf::from("/boot/vmlinuz-7.3.4-kup"),
            initrd: PathBuf::from("/boot/initrd.img-7.3.4-kup"),
            cmdline: "root=/dev/vda kho=on kup.handoff=1-a".into(),
        };
        let mut t = target();
        assert_eq!(backend_for(&mut t, Ok(()), || Ok(())), (Backend::Luo, None));
        // kho=on was there already: only liveupdate=on is added.
        assert_eq!(
            t.cmdline,
            "root=/dev/vda kho=on kup.handoff=1-a liveupdate=on"
        );
        // A stock running kernel: the disk, saying why; the target still gets the arguments, so the
        // next update can keep memory.
        let mut t = target();
        let (b, note) = backend_for(&mut t, Ok(()), || Err(LuoError::NoDevice));
        assert_eq!(b, Backend::Disk);
        let note = note.unwrap();
        assert!(
            note.contains("the images go to disk") && note.contains("/dev/liveupdate"),
            "{note}"
        );
        assert!(t.cmdline.ends_with("liveupdate=on"));
        // A target without LUO: the disk, no arguments it would not know.
        let mut t = target();
        let missing = LuoError::KernelConfig {
            version: "7.3.4-kup".into(),
            missing: "CONFIG_LIVEUPDATE".into(),
        };
        let (b, note) = backend_for(&mut t, Err(missing), || panic!("not asked"));
        assert_eq!(b, Backend::Disk);
        assert!(note.unwrap().contains("CONFIG_LIVEUPDATE"));
        assert_eq!(t.cmdline, target().cmdline);
    }

    #[test]
    fn foam_is_used_for_lazy_restores_on_disk_and_never_on_luo() {
        use crate::config::{RestoreMode::*, Store::*};
        assert_eq!(store_for(Auto, Backend::Disk, Lazy), Foam);
        assert_eq!(store_for(Auto, Backend::Disk, Eager), Criu);
        assert_eq!(store_for(Foam, Backend::Disk, Eager), Foam);
        assert_eq!(store_for(Criu, Backend::Disk, Lazy), Criu);
        // LUO allocates every hole of a preserved file: a sparse FOAM file would fill the RAM.
        assert_eq!(store_for(Foam, Backend::Luo, Lazy), Criu);
        assert_eq!(store_for(Auto, Backend::Luo, Lazy), Criu);
    }

    #[test]
    fn a_process_memory_counts_once_for_all_its_threads() {
        let status = "Name:\tmemcached\nTgid:\t812\nPid:\t812\nRssAnon:\t  204800 kB\nRssFile:\t 1000 kB\nRssShmem:\t     24 kB\n";
        assert_eq!(process_memory_kib(status, 812), 204_824);
        let thread = status.replace("Pid:\t812", "Pid:\t813");
        assert_eq!(process_memory_kib(&thread, 813), 0);
        assert_eq!(process_memory_kib("Name:\tx\n", 5), 0);
    }

    #[test]
    fn io_uring_descriptors_cannot_be_checkpointed() {
        assert_eq!(
            uncheckpointable("anon_inode:[io_uring]"),
            Some("an io_uring instance")
        );
        assert_eq!(uncheckpointable("anon_inode:[eventfd]"), None);
        assert_eq!(uncheckpointable("socket:[1234]"), None);
    }

    #[test]
    fn memory_is_kept_in_place_only_without_a_disk_copy_with_a_lazy_restore_on_a_ppp_kernel() {
        use crate::config::RestoreMode;
        let mut s = Settings::default();
        s.update.backend = Backend::Luo;
        s.update.luo_disk_copy = false;
        s.update.restore = RestoreMode::Lazy;
        assert_eq!(in_place_for(&s, || Ok(())), Ok(()));
        let no_ppp = || Err("no PPP".to_owned());
        assert_eq!(in_place_for(&s, no_ppp), Err("no PPP".to_owned()));
        s.update.restore = RestoreMode::Eager;
        assert!(
            in_place_for(&s, || Ok(()))
                .unwrap_err()
                .contains("restore = \"lazy\"")
        );
        s.update.restore = RestoreMode::Lazy;
        s.update.luo_disk_copy = true;
        assert!(
            in_place_for(&s, || Ok(()))
                .unwrap_err()
                .contains("luo_disk_copy = false")
        );
        s.update.luo_disk_copy = false;
        s.update.luo_in_place = false;
        assert_eq!(
            in_place_for(&s, || Ok(())),
            Err("luo_in_place = false".to_owned())
        );
    }
}
