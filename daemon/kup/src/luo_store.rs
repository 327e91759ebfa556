//! The luo backend's processes: on the old kernel the holder (`kup-restore luo-hold`) that keeps
//! the image tree in a LUO session through the shutdown into the kexec, and on the new kernel the
//! claim (`kup-restore luo-claim`, `kup-luo.service`) that takes it back, lays it out where the
//! manifest says the images are, and lets each unit's memory go once its images are released.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::luo::{self, Index, LuoError};
use crate::manifest;
use crate::update::{HANDOFF_DIR, LUO_INDEX};

/// Where kup-restore is installed (the holder runs it).
const KUP_RESTORE: &str = "/usr/lib/kup/kup-restore";
/// The holder's `argv[0]`: systemd-shutdown spares processes whose name begins with `@` (root
/// storage daemons) from its final killing spree, so the session is still open at the kexec.
pub const HOLDER_ARGV0: &str = "@kup-luo-hold";
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
}

/// Starts the holder on `dir` for handoff `id` in a scope of its own that the shutdown does not
/// stop (`DefaultDependencies=no`), and waits until every file is preserved and the index is in
/// `handoff`.
pub fn hold(dir: &Path, id: &str, handoff: &Path) -> Result<Held, StoreError> {
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting the LUO holder with systemd-run"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if let Some(summary) = line.trim().strip_prefix("ready ") {
        tracing::info!(kup_phase = "switch", "kup: kept in RAM (LUO): {summary}");
        return Ok(Held {
            summary: summary.to_owned(),
            child,
        });
    }
    let out = child
        .wait_with_output()
        .map_err(io("waiting for the LUO holder"))?;
    Err(StoreError::Holder(format!(
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Held {
    /// The switch did not happen: the holder writes every file back into the tree (for the
    /// rollback's in-place restore) and exits.
    pub fn give_back(mut self) -> Result<(), StoreError> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1)
            .map_err(|e| io("signalling the LUO holder")(e.into()))?;
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
pub fn run_holder(dir: &Path, argv0: &str) -> Result<(), StoreError> {
    if !argv0.starts_with('@') {
        let err = Command::new("/proc/self/exe")
            .arg0(HOLDER_ARGV0)
            .args(["luo-hold"])
            .arg(dir)
            .exec();
        return Err(io("re-executing the LUO holder")(err));
    }
    // Signals are taken synchronously below; blocked before anything can send one.
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| io("blocking signals")(e.into()))?;
    let m = manifest::read(Path::new(HANDOFF_DIR))?;
    let t = Instant::now();
    let index = luo::scan(dir, &session_name(&m.id))?;
    let bytes: u64 = index.files.iter().map(|f| f.size).sum();
    let session = luo::preserve_tree(dir, &index)?;
    let text = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Index(e.to_string()))?;
    if let Err(e) = write_synced(&Path::new(HANDOFF_DIR).join(LUO_INDEX), &text) {
        let _ = session.give_back(dir, &index);
        return Err(e);
    }
    println!(
        "ready {} files, {} MiB, in LUO session {} in {:.1} s",
        index.files.len(),
        bytes >> 20,
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
    session.give_back(dir, &index)?;
    let _ = std::fs::remove_file(Path::new(HANDOFF_DIR).join(LUO_INDEX));
    Ok(())
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
            bytes += std::fs::copy(&src, &dst)?;
        }
    }
    std::fs::File::open(to)?.sync_all()?;
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
    // A kernel without LUO (or booted without `liveupdate=on`), or a session that did not come
    // through: the disk copy, where the update made one.
    let mut session = match luo::retrieve_tree(&root, &index, std::process::id()) {
        Ok(session) => session,
        Err(e) if m.disk_copy.is_some() => {
            return from_disk_copy(
                handoff,
                &m,
                &format!("they cannot be taken back from RAM ({e})"),
            );
        }
        Err(e) => return Err(e.into()),
    };
    let bytes: u64 = index.files.iter().map(|f| f.size).sum();
    let took = format!(
        "took {} files ({} MiB) of LUO session {} back in {:.2} s, at {}",
        index.files.len(),
        bytes >> 20,
        index.session,
        t.elapsed().as_secs_f64(),
        root.display()
    );
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

#[cfg(test)]
mod tests {
    use super::*;

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
