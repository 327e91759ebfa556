//! The luo backend's processes: on the old kernel the holder (`kup-restore luo-hold`) that keeps
//! the image tree in a LUO session through the shutdown into the kexec, and on the new kernel the
//! claim (`kup-restore luo-claim`, `kup-luo.service`) that takes it back, lays it out where the
//! manifest says the images are, and lets each unit's memory go once its images are released.
//!
//! With the memory kept in place (`luo_in_place`, PPP) the holder starts before the final dumps
//! and takes lines on stdin: `keep UNIT PID` (at CRIU's post-dump, the tree frozen: the process's
//! pidfd is preserved, its memory stays where it is; answered `kept PID` or `error WHY`), then
//! `tree` (the image tree as without it; answered `ready ...`). Its stdin closing before `tree`
//! (the update gave up) writes the processes' memory back like a signal after it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::luo::{self, Index, LuoError};
use crate::manifest;
use crate::update::{HANDOFF_DIR, LUO_INDEX};

/// Where kup-restore is installed (the holder runs it).
const KUP_RESTORE: &str = "/usr/lib/kup/kup-restore";
/// The holder's `argv[0]`: systemd-shutdown spares processes whose name begins with `@` (root
/// storage daemons) from its final killing spree, so the session is still open at the kexec.
pub const HOLDER_ARGV0: &str = "@kup-luo-hold";
/// The early claim's `argv[0]` (`kup-restore luo-claim-early`, from the initramfs): the `@`
/// exempts it from the killing spree of systemd's switch to the real root, so it holds the session
/// until kup-luo.service takes it over.
pub const CLAIM_ARGV0: &str = "@kup-luo-claim";
/// What the early claim took, for kup-luo.service to take over ([`EarlyClaim`]).
pub const CLAIMED: &str = "/run/kup/luo-claimed";
/// The session name of handoff `id`.
pub fn session_name(id: &str) -> String {
    format!("kup-{id}")
}

/// Why the images could not be kept in RAM, or taken back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Luo(#[from] LuoError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the LUO holder failed: {0}")]
    Holder(String),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(
        "{LUO_INDEX} in {HANDOFF_DIR} is damaged ({0}); the images kept in RAM cannot be found"
    )]
    Index(String),
    #[error(
        "handoff {0} kept its images in RAM only (luo_disk_copy = false), and {1}: they are lost; keep luo_disk_copy = true where that must not happen"
    )]
    NoDiskCopy(String, String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Mounts a tmpfs of kup's own at `dir` (unless one is there): the images must be shmem files for
/// LUO, and /run's tmpfs is capped at a fifth of RAM. Its size is RAM; preflight checked the need.
/// `huge=within_size`: the pages files are written in 2 MiB folios where they fill them, so LUO
/// preserves and the next kernel retrieves hundreds of times fewer folios (one by one, each a
/// record in the handover) than with 4 KiB pages.
pub fn mount_tmpfs(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo"))?;
    if is_mount_point(&mountinfo, dir) {
        return Ok(());
    }
    nix::mount::mount(
        Some("kup-luo"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700,size=100%,huge=within_size"),
    )
    .map_err(|e| io(format!("mounting a tmpfs on {}", dir.display()))(e.into()))
}

/// Whether `dir` is a mount point in a `/proc/self/mountinfo` text.
pub fn is_mount_point(mountinfo: &str, dir: &Path) -> bool {
    let want = dir.to_string_lossy();
    mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
}

/// The running holder on the old kernel.
#[derive(Debug)]
pub struct Held {
    child: Child,
    pub summary: String,
    /// In-place mode, before `tree`: the command channel.
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

/// Starts the holder on `dir` for handoff `id` in a scope of its own that the shutdown does not
/// stop (`DefaultDependencies=no`), and waits until every file is preserved and the index is in
/// `handoff`.
pub fn hold(dir: &Path, id: &str, handoff: &Path) -> Result<Held, StoreError> {
    let mut held = spawn_holder(dir, id, handoff, false)?;
    held.expect("ready")?;
    tracing::info!(
        kup_phase = "switch",
        "kup: kept in RAM (LUO): {}",
        held.summary
    );
    Ok(held)
}

/// Starts the holder for memory kept in place (`luo_in_place`), before the final dumps: it
/// creates the session and waits for [`Held::keep`] and [`Held::seal`].
pub fn hold_in_place(dir: &Path, id: &str, handoff: &Path) -> Result<Held, StoreError> {
    let mut held = spawn_holder(dir, id, handoff, true)?;
    held.expect("session")?;
    Ok(held)
}

fn spawn_holder(dir: &Path, id: &str, handoff: &Path, in_place: bool) -> Result<Held, StoreError> {
    let _ = std::fs::remove_file(handoff.join(LUO_INDEX));
    let mut child = Command::new("systemd-run")
        .args([
            "--scope",
            "--quiet",
            "--collect",
            "--property=DefaultDependencies=no",
            &format!("--unit=kup-luo-hold-{id}"),
            "--description=kup: checkpoints kept in RAM across the kexec",
            KUP_RESTORE,
            "luo-hold",
        ])
        .arg(dir)
        .args(in_place.then_some("--in-place"))
        .stdin(if in_place {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting the LUO holder with systemd-run"))?;
    Ok(Held {
        stdin: child.stdin.take(),
        stdout: child.stdout.take().map(BufReader::new),
        child,
        summary: String::new(),
    })
}

impl Held {
    /// Reads the holder's next line, which must begin with `word` (its rest becomes `summary`);
    /// anything else (an `error` line, its end) fails with what it said.
    fn expect(&mut self, word: &str) -> Result<(), StoreError> {
        let mut line = String::new();
        if let Some(out) = self.stdout.as_mut() {
            let _ = out.read_line(&mut line);
        }
        if let Some(rest) = line.trim_end().strip_prefix(word) {
            self.summary = rest.trim().to_owned();
            return Ok(());
        }
        if let Some(why) = line.trim().strip_prefix("error ") {
            return Err(StoreError::Holder(why.to_owned()));
        }
        // Gone: what it said on stderr.
        self.stdin = None;
        let mut err = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        let status = self
            .child
            .wait()
            .map_err(io("waiting for the LUO holder"))?;
        Err(StoreError::Holder(format!("{status}: {}", err.trim())))
    }

    /// Sends one command line to an in-place holder.
    fn send(&mut self, line: &str) -> Result<(), StoreError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| StoreError::Holder("the holder takes no more commands".into()))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(io("writing to the LUO holder"))
    }

    /// In-place mode, at CRIU's post-dump (the tree frozen, still there): the memory of every
    /// process of `unit`'s tree `pids` is kept where it is (preserved through its pidfd).
    pub fn keep(&mut self, unit: &str, pids: &[i32]) -> Result<(), StoreError> {
        for pid in pids {
            self.send(&format!("keep {unit} {pid}"))?;
            self.expect("kept")?;
        }
        Ok(())
    }

    /// In-place mode, after the last final dump: the image tree too, then the index; the holder
    /// is then as [`hold`] leaves it.
    pub fn seal(&mut self) -> Result<(), StoreError> {
        self.send("tree")?;
        self.expect("ready")?;
        self.stdin = None;
        tracing::info!(
            kup_phase = "switch",
            "kup: kept in RAM (LUO): {}",
            self.summary
        );
        Ok(())
    }

    /// The switch did not happen: the holder writes every file back into the tree (for the
    /// rollback's in-place restore), the memory of processes kept in place into their FOAM, and
    /// exits.
    pub fn give_back(mut self) -> Result<(), StoreError> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if self.stdin.take().is_none() {
            nix::sys::signal::kill(pid, Signal::SIGUSR1)
                .map_err(|e| io("signalling the LUO holder")(e.into()))?;
        }
        let out = self
            .child
            .wait()
            .map_err(io("waiting for the LUO holder"))?;
        if out.success() {
            Ok(())
        } else {
            Err(StoreError::Holder(format!(
                "writing the images back failed ({out}); see journalctl -t kup-restore"
            )))
        }
    }
}

/// `kup-restore luo-hold DIR` (the holder): re-executes itself as [`HOLDER_ARGV0`], preserves the
/// tree, writes the index, says `ready ...` on stdout, then holds the session until the kexec. A
/// signal (the update gave up) writes the files back and ends it.
pub fn run_holder(dir: &Path, argv0: &str, in_place: bool) -> Result<(), StoreError> {
    if !argv0.starts_with('@') {
        let err = Command::new("/proc/self/exe")
            .arg0(HOLDER_ARGV0)
            .args(["luo-hold"])
            .arg(dir)
            .args(in_place.then_some("--in-place"))
            .exec();
        return Err(io("re-executing the LUO holder")(err));
    }
    // Signals are taken synchronously below; blocked before anything can send one.
    let set = block_signals(&[
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ])
    .map_err(|e| io("blocking signals")(e.into()))?;
    let m = manifest::read(Path::new(HANDOFF_DIR))?;
    let name = session_name(&m.id);
    let (mut session, kept) = if in_place {
        let mut session = luo::Session::create(&name)?;
        println!("session {name}");
        let _ = std::io::stdout().flush();
        match take_commands(&mut session, dir) {
            Some(kept) => (session, kept),
            // The update gave up before the tree: the memory kept so far goes back into FOAM.
            None => return Ok(()),
        }
    } else {
        (luo::Session::create(&name)?, Vec::new())
    };
    let t = Instant::now();
    let mut index = luo::scan(dir, &name)?;
    index.processes = kept.iter().map(|k| k.process.clone()).collect();
    let bytes: u64 = index.files.iter().map(|f| f.size).sum();
    let give_back = |session: &luo::Session, index: &Index| {
        let files = session.give_back(dir, index);
        give_back_memory(dir, &kept);
        files
    };
    if let Err(e) = luo::preserve_files(&mut session, dir, &index) {
        give_back_memory(dir, &kept);
        return Err(e.into());
    }
    let text = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Index(e.to_string()))?;
    if let Err(e) = write_synced(&Path::new(HANDOFF_DIR).join(LUO_INDEX), &text) {
        let _ = give_back(&session, &index);
        return Err(e);
    }
    println!(
        "ready {} files, {} MiB, and the memory of {} process(es) kept in place, in LUO session {} in {:.1} s",
        index.files.len(),
        bytes >> 20,
        kept.len(),
        index.session,
        t.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    let signal = set
        .wait()
        .map_err(|e| io("waiting for a signal")(e.into()))?;
    tracing::warn!(
        kup_phase = "switch",
        "kup: the switch did not happen ({signal:?}): writing the images kept in RAM back to {}",
        dir.display()
    );
    give_back(&session, &index)?;
    let _ = std::fs::remove_file(Path::new(HANDOFF_DIR).join(LUO_INDEX));
    Ok(())
}

/// A process whose memory the holder keeps in place, with its memory open for a give-back.
struct Kept {
    process: luo::IndexProcess,
    unit: String,
    mem: std::fs::File,
}

/// The in-place holder's commands (see the module's notes) until `tree` (`Some`: the processes
/// kept) or the end of stdin (`None`: everything kept is written back first).
fn take_commands(session: &mut luo::Session, dir: &Path) -> Option<Vec<Kept>> {
    let mut kept: Vec<Kept> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["keep", unit, pid] => {
                let token = luo::PROCESS_TOKENS + kept.len() as u64;
                match keep_process(session, unit, pid, token) {
                    Ok(k) => {
                        println!("kept {pid}");
                        kept.push(k);
                    }
                    Err(e) => println!("error {e}"),
                }
            }
            ["tree"] => return Some(kept),
            _ => println!("error unknown command {line:?}"),
        }
        let _ = std::io::stdout().flush();
    }
    give_back_memory(dir, &kept);
    None
}

/// Preserves process `pid` of `unit` (its pidfd) under `token`: its memory stays in place.
fn keep_process(
    session: &mut luo::Session,
    unit: &str,
    pid: &str,
    token: u64,
) -> Result<Kept, StoreError> {
    let n: i32 = pid
        .parse()
        .map_err(|_| StoreError::Holder(format!("{pid:?} is not a PID")))?;
    // Opened first: after the process is gone, its memory reads back only through this.
    let mem = std::fs::File::open(format!("/proc/{n}/mem"))
        .map_err(io(format!("opening /proc/{n}/mem")))?;
    let pidfd = rustix::process::Pid::from_raw(n)
        .ok_or_else(|| StoreError::Holder(format!("{n} is not a PID")))
        .and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                .map_err(|e| io(format!("pidfd_open({n})"))(e.into()))
        })?;
    session.preserve(pidfd, token, &format!("the memory of {unit}'s process {n}"))?;
    tracing::info!(
        kup_phase = "dump",
        "kup: the memory of {unit}'s process {n} is kept in place (LUO token {token})"
    );
    Ok(Kept {
        process: luo::IndexProcess {
            token,
            path: format!(
                "{unit}/{}/pagemap-{n}/{}",
                crate::foam::DIR,
                crate::foam::WHOLE
            ),
            pid: n,
        },
        unit: unit.to_owned(),
        mem,
    })
}

/// The switch did not happen after processes were kept in place (and killed by CRIU): their
/// memory goes from the kept address spaces into their FOAM ([`crate::foam::WHOLE`]), the pages
/// their pagemap lists, for the rollback's restore. Needs room for that copy beside the memory
/// still held. Best effort per process, each failure logged.
fn give_back_memory(dir: &Path, kept: &[Kept]) {
    for k in kept {
        let images = dir.join(&k.unit);
        let pid = k.process.pid;
        let written = (|| -> Result<u64, String> {
            let pm_path = images.join(format!("pagemap-{pid}.img"));
            let bytes =
                std::fs::read(&pm_path).map_err(|e| format!("{}: {e}", pm_path.display()))?;
            let pm = crate::criu_image::parse(&bytes)?;
            let out_path = dir.join(&k.process.path);
            if let Some(d) = out_path.parent() {
                std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            }
            let out = std::fs::File::create(&out_path)
                .map_err(|e| format!("{}: {e}", out_path.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            for e in &pm.entries {
                let (mut at, end) = (e.vaddr, e.vaddr + e.nr_pages * 4096);
                while at < end {
                    let n = ((end - at) as usize).min(buf.len());
                    k.mem
                        .read_exact_at(&mut buf[..n], at)
                        .map_err(|e| format!("reading {at:#x} of process {pid}: {e}"))?;
                    out.write_all_at(&buf[..n], at)
                        .map_err(|e| format!("{}: {e}", out_path.display()))?;
                    at += n as u64;
                    total += n as u64;
                }
            }
            Ok(total)
        })();
        match written {
            Ok(b) => tracing::warn!(
                kup_phase = "switch",
                "kup: the memory of {}'s process {pid} kept in place was written back ({} MiB)",
                k.unit,
                b >> 20
            ),
            Err(e) => tracing::error!(
                kup_phase = "switch",
                "kup: the memory of {}'s process {pid} kept in place could not be written back: {e}",
                k.unit
            ),
        }
    }
}

/// Blocks `signals` in this (the only) thread: they are taken synchronously (the set's `wait`)
/// or not at all. Returns the set.
fn block_signals(signals: &[Signal]) -> nix::Result<nix::sys::signal::SigSet> {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block()?;
    Ok(set)
}

/// Writes `path` through a temporary file, synced, then renamed and the directory synced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))?;
    if let Some(d) = path.parent() {
        let _ = std::fs::File::open(d).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// The images kept in RAM are not here (`why`): from now on the handoff is a disk handoff on its
/// disk copy (`luo_disk_copy`): `backend` disk, `image_dir` and every unit's `images` there. Fails
/// when the update made no copy.
fn from_disk_copy(handoff: &Path, m: &manifest::Manifest, why: &str) -> Result<String, StoreError> {
    let copy = m
        .disk_copy
        .clone()
        .ok_or_else(|| StoreError::NoDiskCopy(m.id.clone(), why.to_owned()))?;
    manifest::update(handoff, |m| {
        m.backend = crate::config::Backend::Disk.as_str().into();
        m.image_dir.clone_from(&copy);
        m.disk_copy = None;
        for u in &mut m.units {
            u.images = Path::new(&copy).join(&u.unit).display().to_string();
        }
    })?;
    let msg = format!(
        "handoff {} kept its images in RAM, but {why}: they come from the disk copy in {copy}",
        m.id
    );
    tracing::warn!(kup_phase = "restore", "kup: {msg}");
    Ok(ready(msg))
}

/// Tells systemd the claim is done (the units may restore now), with `status`; returns it.
fn ready(status: String) -> String {
    let _ = libsystemd::daemon::notify(
        false,
        &[
            libsystemd::daemon::NotifyState::Ready,
            libsystemd::daemon::NotifyState::Status(status.clone()),
        ],
    );
    status
}

/// Copies into `to` every file of the tree `from` that `to` lacks, or has with another size or
/// an older modification time, following the links into `/proc` that the claim lays out (a
/// pre-copy round's `parent` link stays a link). Returns the bytes copied. Used for the disk copy
/// (`luo_disk_copy`: first the pre-copy rounds, then only the final dumps) and for the way back
/// of a fallback.
pub fn copy_out(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if let Ok(target) = std::fs::read_link(&src) {
            if !target.starts_with("/proc/") {
                if std::fs::read_link(&dst).ok().as_ref() != Some(&target) {
                    let _ = std::fs::remove_file(&dst);
                    std::os::unix::fs::symlink(&target, &dst)?;
                }
                continue;
            }
        }
        let meta = std::fs::metadata(&src)?;
        if meta.is_dir() {
            bytes += copy_out(&src, &dst)?;
            continue;
        }
        let current = std::fs::metadata(&dst).is_ok_and(|d| {
            d.is_file() && d.len() == meta.len() && d.modified().ok() >= meta.modified().ok()
        });
        if !current {
            bytes += if e.file_name() == crate::foam::WHOLE {
                copy_sparse(&src, &dst)?
            } else {
                std::fs::copy(&src, &dst)?
            };
        }
    }
    std::fs::File::open(to)?.sync_all()?;
    Ok(bytes)
}

/// Copies only the data extents of `src` (a process's whole address space, kept in place:
/// [`crate::foam::WHOLE`], sparse over 128 TiB) into `dst`, of the same size. Returns the bytes.
fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<u64> {
    use nix::unistd::{Whence, lseek};
    let from = std::fs::File::open(src)?;
    let to = std::fs::File::create(dst)?;
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut bytes) = (0i64, 0u64);
    while (at as u64) < len {
        let data = match lseek(&from, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&from, data, Whence::SeekHole)?;
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off)?;
            to.write_all_at(&buf[..n], off)?;
            off += n as u64;
            bytes += n as u64;
        }
        at = hole;
    }
    Ok(bytes)
}

/// `kup-restore luo-claim` (kup-luo.service, before any unit is restored): takes the session of
/// the pending handoff back, checks it against the index, lays the tree out at the manifest's
/// image directory, tells systemd it is ready, then holds each unit's files until its images are
/// released (its directory removed) and finishes the session when none is left.
pub fn claim() -> Result<String, StoreError> {
    let handoff = Path::new(HANDOFF_DIR);
    let m = manifest::read(handoff)?;
    if m.backend != crate::config::Backend::Luo.as_str() {
        return Ok(ready(format!(
            "handoff {} keeps its images on disk; nothing to take from RAM",
            m.id
        )));
    }
    // A boot through the firmware (the new kernel panicked or hung, the power went): RAM is gone,
    // the disk copy is what is left.
    if crate::restore::resumed() {
        return from_disk_copy(handoff, &m, "a boot through the firmware does not keep RAM");
    }
    let text = std::fs::read_to_string(handoff.join(LUO_INDEX))
        .map_err(io(format!("reading {HANDOFF_DIR}/{LUO_INDEX}")))?;
    let index = Index::parse(&text).map_err(StoreError::Index)?;
    let root = PathBuf::from(&m.image_dir);
    let t = Instant::now();
    // The initramfs took the session already (the early claim): its descriptors come over from
    // the process holding them. Otherwise (an initramfs without kup's hook, or its claim failed)
    // the session is taken here.
    let taken = match std::fs::read_to_string(CLAIMED) {
        Ok(text) => adopt_early_claim(&text, &index),
        Err(_) => luo::take_tree(&index)
            .map(|s| (s, took_text(&index, t, "")))
            .map_err(StoreError::from),
    }
    .and_then(|(session, took)| {
        luo::lay_out(&root, &index, &session, std::process::id())?;
        Ok((session, took))
    });
    // A kernel without LUO (or booted without `liveupdate=on`), or a session that did not come
    // through: the disk copy, where the update made one.
    let (mut session, took) = match taken {
        Ok(taken) => taken,
        Err(e) if m.disk_copy.is_some() => {
            end_early_claim();
            return from_disk_copy(
                handoff,
                &m,
                &format!("they cannot be taken back from RAM ({e})"),
            );
        }
        Err(e) => return Err(e),
    };
    let took = format!("{took}, at {}", root.display());
    tracing::info!(kup_phase = "restore", "kup: {took}");
    let took = ready(took);
    let mut held = index.tokens_by_unit();
    while !held.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
        held.retain(|unit, tokens| {
            if root.join(unit).exists() {
                return true;
            }
            for t in tokens.iter() {
                session.files.remove(t);
            }
            tracing::info!(
                kup_phase = "verify",
                "kup: {unit}'s images were released: its memory kept in RAM is freed"
            );
            false
        });
    }
    session.finish()?;
    Ok(format!(
        "{took}; every unit's images released, session finished"
    ))
}

/// What the early claim took ([`CLAIMED`]): the process holding the session, the session's
/// descriptor there and each file's, and what it says it did. One item per line: `pid PID`,
/// `session NAME FD`, `took TEXT`, and `file TOKEN FD` per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyClaim {
    pub pid: i32,
    pub session: String,
    pub fd: i32,
    pub files: Vec<(u64, i32)>,
    pub took: String,
}

impl EarlyClaim {
    pub fn parse(text: &str) -> Result<EarlyClaim, String> {
        let (mut pid, mut session, mut took, mut files) = (None, None, String::new(), Vec::new());
        let num = |w: Option<&str>, what: &str, line: &str| {
            w.and_then(|w| w.parse::<i64>().ok())
                .ok_or_else(|| format!("{what} missing or not a number in {line:?}"))
        };
        for line in text.lines() {
            let mut w = line.split(' ');
            match w.next() {
                Some("pid") => pid = Some(num(w.next(), "the PID", line)? as i32),
                Some("session") => {
                    let name = w.next().filter(|n| !n.is_empty());
                    let name = name.ok_or_else(|| format!("no session name in {line:?}"))?;
                    session = Some((
                        name.to_owned(),
                        num(w.next(), "the descriptor", line)? as i32,
                    ));
                }
                Some("took") => took = line["took".len()..].trim().to_owned(),
                Some("file") => {
                    let token = w.next().and_then(|t| t.parse::<u64>().ok());
                    let token = token.ok_or_else(|| format!("no token in {line:?}"))?;
                    files.push((token, num(w.next(), "the descriptor", line)? as i32));
                }
                Some("") | None => {}
                Some(other) => return Err(format!("unknown item {other:?}")),
            }
        }
        let pid = pid.ok_or("no `pid` line")?;
        // It is signalled: never 0, 1 or a group.
        if pid <= 1 {
            return Err(format!("{pid} is not the PID of a claim"));
        }
        let (session, fd) = session.ok_or("no `session` line")?;
        Ok(EarlyClaim {
            pid,
            session,
            fd,
            files,
            took,
        })
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "pid {}\nsession {} {}\ntook {}\n",
            self.pid, self.session, self.fd, self.took
        );
        for (token, fd) in &self.files {
            out.push_str(&format!("file {token} {fd}\n"));
        }
        out
    }

    /// Whether it holds exactly `index`'s session and tokens.
    fn matches(&self, index: &Index) -> Result<(), String> {
        if self.session != index.session {
            return Err(format!(
                "it holds LUO session {}, the index names {}",
                self.session, index.session
            ));
        }
        let mut have: Vec<u64> = self.files.iter().map(|f| f.0).collect();
        let mut want: Vec<u64> = index.tokens().collect();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            return Err(format!(
                "it holds {} tokens, the index lists {}",
                have.len(),
                want.len()
            ));
        }
        Ok(())
    }
}

/// The images come from the disk copy after all: the early claim's process, if one holds the
/// session still, ends, and the memory it holds is freed.
fn end_early_claim() {
    let claim = std::fs::read_to_string(CLAIMED)
        .ok()
        .and_then(|t| EarlyClaim::parse(&t).ok());
    if let Some(c) = claim {
        end_claim_process(c.pid);
    }
}

/// Kills the early claim's process `pid` and forgets its claim; returns once systemd has reaped it,
/// before any restore can want its PID.
fn end_claim_process(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let _ = std::fs::remove_file(CLAIMED);
    let gone = Path::new("/proc").join(pid.to_string());
    let t = Instant::now();
    while gone.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// kup-luo.service on a boot whose initramfs claimed the session: takes the session and its files
/// over from the early claim's process (which then goes), and says what the early claim took.
fn adopt_early_claim(text: &str, index: &Index) -> Result<(luo::Session, String), StoreError> {
    let bad = |why: String| {
        StoreError::Holder(format!(
            "the initramfs's claim of the images kept in RAM ({CLAIMED}) cannot be taken over: {why}"
        ))
    };
    let c = EarlyClaim::parse(text).map_err(bad)?;
    c.matches(index).map_err(bad)?;
    let session = luo::Session::adopt(&c.session, c.pid, c.fd, &c.files)?;
    // Everything is duplicated here: the early claim's process has done its part.
    end_claim_process(c.pid);
    Ok((
        session,
        format!("{}, taken over from its PID {}", c.took, c.pid),
    ))
}

/// `kup-restore luo-claim-early ROOT` (kup's dracut hook, in the initramfs, with the real root
/// mounted at ROOT): takes the LUO session of the pending handoff back before anything of the real
/// root runs, and leaves /dev/liveupdate to whoever opens it next. The session stays in a process
/// of its own ([`CLAIM_ARGV0`]) across the switch to the real root until kup-luo.service takes it
/// over. Returns what it did, or why it left the claim to kup-luo.service.
pub fn claim_early(root: &Path, argv0: &str) -> Result<String, StoreError> {
    if argv0.starts_with('@') {
        return early_claim_process(root);
    }
    let mut child = Command::new("/proc/self/exe")
        .arg0(CLAIM_ARGV0)
        .arg("luo-claim-early")
        .arg(root)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io("starting the early claim of the images kept in RAM"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let line = line.trim_end();
    match line.split_once(' ') {
        // It goes on, holding the session; nobody here waits for it.
        Some(("claimed", took)) => Ok(format!(
            "{took}; held by PID {} until kup-luo.service takes it over",
            child.id()
        )),
        Some(("skip", why)) => {
            let _ = child.wait();
            Ok(format!(
                "the images kept in RAM are left to kup-luo.service: {why}"
            ))
        }
        Some(("error", why)) => {
            let _ = child.wait();
            Err(StoreError::Holder(why.to_owned()))
        }
        _ => {
            let status = child.wait().map_err(io("waiting for the early claim"))?;
            Err(StoreError::Holder(format!(
                "the early claim ended ({status}) without a word"
            )))
        }
    }
}

/// The early claim's own process: says `claimed TEXT` (then holds the session until killed),
/// `skip WHY` or `error WHY` on stdout.
fn early_claim_process(root: &Path) -> Result<String, StoreError> {
    let say = |line: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    };
    let taken = match early_take(root) {
        Ok(Ok(taken)) => taken,
        Ok(Err(why)) => {
            say(format!("skip {why}"));
            return Ok(why);
        }
        Err(e) => {
            say(format!("error {e}"));
            return Err(e);
        }
    };
    let (session, took) = taken;
    let (fd, files) = session.descriptors();
    let c = EarlyClaim {
        pid: std::process::id() as i32,
        session: session.name.clone(),
        fd,
        files,
        took: took.clone(),
    };
    if let Err(e) = std::fs::create_dir_all(crate::update::RUN_DIR)
        .map_err(io(format!("creating {}", crate::update::RUN_DIR)))
        .and_then(|()| write_synced(Path::new(CLAIMED), c.render().as_bytes()))
    {
        say(format!("error {e}"));
        return Err(e);
    }
    say(format!("claimed {took}"));
    // Nobody reads more: stdout goes, so the hook that started this does not wait for it.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }
    // Held until kup-luo.service has taken everything over and kills it (SIGKILL); the signals
    // of the switch to the real root do not end it.
    let _ = block_signals(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]);
    loop {
        std::thread::park();
        let _ = &session;
    }
}

/// In the initramfs: the pending handoff's LUO session and its files, with what was taken; or
/// why the claim is left to kup-luo.service.
#[allow(clippy::type_complexity)]
fn early_take(root: &Path) -> Result<Result<(luo::Session, String), String>, StoreError> {
    let handoff = root.join(HANDOFF_DIR.trim_start_matches('/'));
    let m = manifest::read(&handoff)?;
    if m.backend != crate::config::Backend::Luo.as_str() {
        return Ok(Err(format!("handoff {} keeps its images on disk", m.id)));
    }
    if crate::restore::resumed() {
        return Ok(Err("a boot through the firmware does not keep RAM".into()));
    }
    if !Path::new(luo::DEVICE).exists() {
        return Ok(Err(format!("this kernel has no {}", luo::DEVICE)));
    }
    let text = std::fs::read_to_string(handoff.join(LUO_INDEX))
        .map_err(io(format!("reading {}", handoff.join(LUO_INDEX).display())))?;
    let index = Index::parse(&text).map_err(StoreError::Index)?;
    let t = Instant::now();
    let session = luo::take_tree(&index)?;
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_default();
    let took = format!(
        "{}, {uptime:.1} s after the kernel started",
        took_text(&index, t, " in the initramfs")
    );
    Ok(Ok((session, took)))
}

/// What a claim took back, since `t`, and `place` (where, or nothing).
fn took_text(index: &Index, t: Instant, place: &str) -> String {
    let bytes: u64 = index.files.iter().map(|f| f.size).sum();
    format!(
        "took {} files ({} MiB) and the memory of {} process(es) of LUO session {} back{place} in {:.2} s",
        index.files.len(),
        bytes >> 20,
        index.processes.len(),
        index.session,
        t.elapsed().as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_early_claim_reads_back_what_it_wrote_and_must_hold_the_index() {
        let c = EarlyClaim {
            pid: 812,
            session: "kup-1a2b".into(),
            fd: 3,
            files: vec![(1, 4), (2, 5), (1 << 32, 6)],
            took: "took 2 files (3 MiB) of LUO session kup-1a2b back in the initramfs".into(),
        };
        assert_eq!(EarlyClaim::parse(&c.render()).unwrap(), c);
        let index = |session: &str, files: u64| Index {
            session: session.into(),
            files: (1..=files)
                .map(|token| luo::IndexFile {
                    token,
                    path: format!("a.service/f{token}"),
                    size: 1,
                })
                .collect(),
            processes: vec![luo::IndexProcess {
                token: 1 << 32,
                path: "a.service/foam/pagemap-7/whole.foam".into(),
                pid: 7,
            }],
            links: Default::default(),
        };
        assert_eq!(c.matches(&index("kup-1a2b", 2)), Ok(()));
        assert!(c.matches(&index("kup-9", 2)).unwrap_err().contains("kup-9"));
        assert!(
            c.matches(&index("kup-1a2b", 3))
                .unwrap_err()
                .contains("3 tokens, the index lists 4")
        );
        for (bad, says) in [
            ("session kup-1 3\n", "no `pid` line"),
            ("pid 9\n", "no `session` line"),
            ("pid -1\nsession kup-1 3\n", "not the PID of a claim"),
            ("pid 1\nsession kup-1 3\n", "not the PID of a claim"),
            ("pid x\nsession kup-1 3\n", "the PID"),
            ("pid 9\nsession kup-1 3\nfile 1\n", "the descriptor"),
            ("pid 9\nsession kup-1 3\nmemfd 1 2\n", "unknown item"),
        ] {
            let err = EarlyClaim::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn what_a_claim_took_names_the_session_the_sizes_and_the_place() {
        let index = Index {
            session: "kup-1".into(),
            files: vec![luo::IndexFile {
                token: 1,
                path: "a.service/pages-1.img".into(),
                size: 3 << 20,
            }],
            ..Default::default()
        };
        let early = took_text(&index, Instant::now(), " in the initramfs");
        assert!(
            early.starts_with("took 1 files (3 MiB) and the memory of 0 process(es) of LUO session kup-1 back in the initramfs in "),
            "{early}"
        );
        assert!(took_text(&index, Instant::now(), "").contains("kup-1 back in 0.0"));
    }

    #[test]
    fn finds_mount_points_in_mountinfo() {
        let mi = "22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n\
                  90 22 0:50 / /run/kup/luo rw,nosuid,nodev shared:40 - tmpfs kup-luo rw,size=2G\n";
        assert!(is_mount_point(mi, Path::new("/run/kup/luo")));
        assert!(is_mount_point(mi, Path::new("/run")));
        assert!(!is_mount_point(mi, Path::new("/run/kup")));
    }

    #[test]
    fn the_disk_copy_takes_only_what_it_lacks_and_keeps_round_links() {
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("luo"), t.path().join("copy"));
        let unit = from.join("memcached.service");
        std::fs::create_dir_all(unit.join("pre-1")).unwrap();
        std::fs::create_dir_all(unit.join("pre-2")).unwrap();
        std::fs::write(unit.join("pre-1/pages-1.img"), vec![1u8; 8192]).unwrap();
        std::fs::write(unit.join("pre-2/pages-1.img"), vec![2u8; 4096]).unwrap();
        std::os::unix::fs::symlink("../pre-1", unit.join("pre-2/parent")).unwrap();
        // First pass, the pre-copy rounds: everything.
        assert_eq!(copy_out(&from, &to).unwrap(), 8192 + 4096);
        let copied = to.join("memcached.service");
        assert_eq!(
            std::fs::read_link(copied.join("pre-2/parent")).unwrap(),
            Path::new("../pre-1"),
            "a round's parent link stays a link"
        );
        // Second pass, after the final dump: only its files, and a round file rewritten since.
        std::fs::write(unit.join("pages-1.img"), vec![3u8; 100]).unwrap();
        std::os::unix::fs::symlink("pre-2", unit.join("parent")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(unit.join("pre-2/pages-1.img"), vec![4u8; 4096]).unwrap();
        assert_eq!(copy_out(&from, &to).unwrap(), 100 + 4096);
        assert_eq!(
            std::fs::read(copied.join("pages-1.img")).unwrap(),
            vec![3u8; 100]
        );
        assert_eq!(
            std::fs::read(copied.join("pre-2/pages-1.img")).unwrap(),
            vec![4u8; 4096]
        );
        assert_eq!(
            std::fs::read(copied.join("pre-1/pages-1.img")).unwrap(),
            vec![1u8; 8192]
        );
        // Nothing new: nothing copied.
        assert_eq!(copy_out(&from, &to).unwrap(), 0);
    }

    #[test]
    fn the_disk_copy_follows_the_claims_links_into_proc() {
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("luo"), t.path().join("copy"));
        std::fs::create_dir_all(&from).unwrap();
        let f = std::fs::File::create(t.path().join("held")).unwrap();
        std::fs::write(t.path().join("held"), b"pages").unwrap();
        // As the claim lays the tree out: links to its open files.
        std::os::unix::fs::symlink(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)),
            from.join("pages-1.img"),
        )
        .unwrap();
        assert_eq!(copy_out(&from, &to).unwrap(), 5);
        let meta = std::fs::symlink_metadata(to.join("pages-1.img")).unwrap();
        assert!(meta.is_file(), "the file's content, not the link");
    }

    #[test]
    fn session_names_fit_luo() {
        let id = manifest::new_handoff_id();
        assert!(session_name(&id).len() < 64);
    }
}
