//! The versioned handoff manifest: what was checkpointed before a kernel switch and how to bring it
//! back, written atomically so that a crash never leaves a half manifest.
//!
//! Layout of a handoff directory: `manifest.json` (the manifest), `manifest.copy.json` (its second
//! copy, written after it, read when the first is damaged), `lock` (flock'd by writers),
//! `manifest.json.tmp` (a write in progress; ignored by readers). [`Manifest::from_json`] and
//! [`Manifest::to_json`] are pure; [`write_atomic`] and [`read`] do the file I/O.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest version this kup writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// File name of the manifest inside a handoff directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the manifest's second copy, written after it: read when the first is damaged.
pub const MANIFEST_COPY_FILE: &str = "manifest.copy.json";
/// File name of a manifest being written (never read).
pub const MANIFEST_TMP_FILE: &str = "manifest.json.tmp";
/// File name of the writers' lock.
pub const LOCK_FILE: &str = "lock";

/// Everything the next kernel (or the old one, on fallback) needs to restore the marked units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_VERSION`] when written by this kup.
    pub version: u32,
    /// Handoff id, as on the kernel command line (`kup.handoff=<id>`); see [`new_handoff_id`].
    pub id: String,
    /// Creation time, unix seconds.
    pub created: u64,
    /// `uname -r` of the kernel the units were dumped on (the fallback target).
    pub from_kernel: String,
    /// `uname -r` of the kernel being switched to.
    pub to_kernel: String,
    /// `/proc/cmdline` of the old kernel, to kexec back into it on fallback.
    pub cmdline_old: String,
    /// Image storage backend (`"disk"`).
    pub backend: String,
    /// Directory holding the per-unit image directories.
    pub image_dir: String,
    /// luo backend with `luo_disk_copy`: the directory on disk holding a copy of `image_dir` (one
    /// directory per unit), for a boot through the firmware, which does not keep RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_copy: Option<String>,
    /// How the next kernel brings the memory back.
    #[serde(default)]
    pub restore: crate::config::RestoreMode,
    /// What the boot that restores must check before it is blessed (health timeout, grace).
    #[serde(default)]
    pub checks: Checks,
    /// Set when this handoff is itself a fallback: the kernel that failed and why. A fallback
    /// handoff that fails again does not bounce back; it keeps the images and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackOf>,
    /// A dry-run's handoff, restored in its throwaway VM only: the restoring boot reports and
    /// powers off instead of blessing or falling back (`crate::dryrun`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub units: Vec<UnitImage>,
}

/// The checks a restoring boot runs before it blesses the handoff (from `[update]` at dump time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Checks {
    /// Seconds each unit's health command may take.
    pub health_timeout: u16,
    /// Seconds every restored unit must then stay active with its restored main PID.
    pub grace: u16,
    /// Seconds a kernel kup switches to has to take over the hardware watchdog (a fallback's switch
    /// too); 0 = off.
    pub kexec_watchdog: u16,
    /// Once blessed, the kernel becomes the boot loader's default entry.
    pub make_default: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            health_timeout: crate::config::DEFAULT_HEALTH_TIMEOUT,
            grace: crate::config::DEFAULT_GRACE,
            kexec_watchdog: crate::config::DEFAULT_KEXEC_WATCHDOG,
            make_default: false,
        }
    }
}

/// Why a fallback handoff was made: the handoff that failed, on which kernel, and each unit's
/// failure there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackOf {
    /// The failed handoff's id.
    pub id: String,
    /// `uname -r` of the kernel the restore failed on.
    pub kernel: String,
    /// `(unit, reason)` for each unit that failed there.
    pub failures: Vec<UnitFailure>,
}

/// One unit's failure on a restoring boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitFailure {
    pub unit: String,
    pub reason: String,
}

/// One checkpointed unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitImage {
    /// systemd unit name, e.g. `memcached.service`.
    pub unit: String,
    /// The unit's MainPID at dump time (restored with the same PID).
    pub main_pid: i32,
    /// Every PID and TID of the dumped tree: the early boot keeps them free.
    pub pids: Vec<i32>,
    /// CRIU image directory for this unit.
    pub images: String,
    /// Arguments given to `criu --external` at dump time (e.g. `unix[12345]`).
    #[serde(default)]
    pub external: Vec<String>,
    /// Descriptors the restoring process hands to CRIU with `--inherit-fd`.
    #[serde(default)]
    pub inherit: Vec<InheritFd>,
    /// Established TCP connections at dump time: locked on the next kernel until the restore.
    #[serde(default)]
    pub tcp: Vec<crate::tcp::TcpConn>,
    /// The unit's `health` command: must exit 0 after the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub state: UnitState,
}

/// An `--inherit-fd fd[FD]:KEY` pair: descriptor `fd` of the restoring process replaces the
/// resource CRIU knows as `key` (e.g. `socket:[12345]` for the journald stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritFd {
    pub fd: i32,
    pub key: String,
}

/// Where a unit is in the handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    /// Listed, not dumped yet.
    Pending,
    /// Final dump done; images complete.
    Dumped,
    /// Restored and running again.
    Restored,
    /// Dump or restore failed; the reason.
    Failed(String),
}

/// Why a manifest could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is not JSON or lacks fields.
    #[error(
        "{origin} is corrupt ({reason}); the handoff cannot be trusted: restore from the images by hand or remove the handoff directory to abandon it"
    )]
    Corrupt { origin: String, reason: String },
    /// Written by another kup with a format this one does not read.
    #[error(
        "{origin} has version {found}, but this kup reads version {supported} only; run the kup release that wrote it (or a newer one) to finish the handoff"
    )]
    Version {
        origin: String,
        found: u32,
        supported: u32,
    },
    /// The handoff id cannot go on a kernel command line.
    #[error(
        "{origin} has handoff id {id:?}, which is not 1-64 characters of [A-Za-z0-9-]; the manifest was not written by kup: remove it"
    )]
    BadId { origin: String, id: String },
    /// There is no manifest in the directory (no handoff pending there).
    #[error("no handoff manifest at {}: no handoff is pending there (is the handoff directory right?)", path.display())]
    Missing { path: PathBuf },
    /// A file operation failed.
    #[error("cannot {op} {}: {source}; check that the directory exists, is writable by root and its filesystem is not full or read-only", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest could not be serialised (a bug).
    #[error("cannot serialise the handoff manifest: {0}; this is a bug in kup, please report it")]
    Serialise(#[source] serde_json::Error),
}

#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

impl Manifest {
    /// Parses a manifest, refusing versions other than [`MANIFEST_VERSION`] and ids that are not
    /// command-line safe. Unknown fields are ignored (additions that keep the version).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        Self::from_json_named("the handoff manifest", bytes)
    }

    fn from_json_named(origin: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let corrupt = |e: serde_json::Error| ManifestError::Corrupt {
            origin: origin.to_string(),
            reason: e.to_string(),
        };
        // Check the version first, so that a newer layout says "version" and not "missing field".
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(corrupt)?;
        match probe.version {
            Some(MANIFEST_VERSION) => {}
            Some(found) => {
                return Err(ManifestError::Version {
                    origin: origin.to_string(),
                    found,
                    supported: MANIFEST_VERSION,
                });
            }
            None => {
                return Err(ManifestError::Corrupt {
                    origin: origin.to_string(),
                    reason: "no \"version\" field".to_string(),
                });
            }
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(corrupt)?;
        if !is_valid_handoff_id(&manifest.id) {
            return Err(ManifestError::BadId {
                origin: origin.to_string(),
                id: manifest.id,
            });
        }
        Ok(manifest)
    }

    /// Serialises to pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Result<Vec<u8>, ManifestError> {
        let mut out = serde_json::to_vec_pretty(self).map_err(ManifestError::Serialise)?;
        out.push(b'\n');
        Ok(out)
    }

    /// The entry for `unit`, if listed.
    pub fn unit(&self, unit: &str) -> Option<&UnitImage> {
        self.units.iter().find(|u| u.unit == unit)
    }

    /// The entry for `unit`, mutable.
    pub fn unit_mut(&mut self, unit: &str) -> Option<&mut UnitImage> {
        self.units.iter_mut().find(|u| u.unit == unit)
    }
}

/// Whether `id` can be a handoff id: 1 to 64 characters of `[A-Za-z0-9-]`.
pub fn is_valid_handoff_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Now, in unix seconds (0 before 1970): the manifest's and the outcome's timestamps.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh handoff id: `<unix seconds>-<8 random hex digits>`, e.g. `1767225600-3f9a2c1b`.
pub fn new_handoff_id() -> String {
    format!("{}-{:08x}", unix_now(), rand::random::<u32>())
}

/// Path of the manifest inside handoff directory `dir`.
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST_FILE)
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError {
    let path = path.to_path_buf();
    move |source| ManifestError::Io { op, path, source }
}

/// Writes `manifest` to `dir/manifest.json` so that readers see the old or the new manifest, never
/// a mix: under an exclusive flock on `dir/lock`, write `manifest.json.tmp`, fsync it, rename it over
/// `manifest.json`, fsync `dir`; then the same for the second copy `manifest.copy.json` (a disk
/// that damages one file leaves the other). Creates `dir` if needed. Blocks while another writer
/// holds the lock.
pub fn write_atomic(dir: &Path, manifest: &Manifest) -> Result<(), ManifestError> {
    let _lock = lock(dir)?;
    write_locked(dir, manifest)
}

/// Read-modify-write under the lock: `change` applied to the manifest on disk, written back
/// atomically ([`write_atomic`]). Units restored at the same time each record their own state
/// without losing the other's (a read, then a [`write_atomic`], would).
pub fn update(dir: &Path, change: impl FnOnce(&mut Manifest)) -> Result<(), ManifestError> {
    let _lock = lock(dir)?;
    let mut m = read(dir)?;
    change(&mut m);
    write_locked(dir, &m)
}

/// The exclusive flock on `dir/lock` (creates `dir`).
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, ManifestError> {
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open lock file", &lock_path))?;
    nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        ManifestError::Io {
            op: "lock",
            path: lock_path.clone(),
            source: std::io::Error::from(errno),
        }
    })
}

fn write_locked(dir: &Path, manifest: &Manifest) -> Result<(), ManifestError> {
    let bytes = manifest.to_json()?;
    for dest in [manifest_path(dir), dir.join(MANIFEST_COPY_FILE)] {
        let tmp = dir.join(MANIFEST_TMP_FILE);
        let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &dest).map_err(io("rename into place", &dest))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", dir))?;
    }
    Ok(())
}

/// Reads `dir/manifest.json` (a leftover `manifest.json.tmp` is ignored).
pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
    let first = read_file(&manifest_path(dir));
    match first {
        Err(ManifestError::Corrupt { .. } | ManifestError::Io { .. }) => {
            // A damaged first copy: the second, written after it, is as new or newer.
            match read_file(&dir.join(MANIFEST_COPY_FILE)) {
                Ok(m) => {
                    if let Err(e) = &first {
                        tracing::warn!(
                            kup_phase = "restore",
                            "kup: {e}; using its second copy {MANIFEST_COPY_FILE}"
                        );
                    }
                    Ok(m)
                }
                Err(_) => first,
            }
        }
        other => other,
    }
}

fn read_file(path: &Path) -> Result<Manifest, ManifestError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ManifestError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io("read", path)(e)),
    };
    Manifest::from_json_named(&format!("handoff manifest {}", path.display()), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: "1767225600-3f9a2c1b".to_string(),
            created: 1_767_225_600,
            from_kernel: "6.12.107+deb13-cloud-amd64".to_string(),
            to_kernel: "6.12.117+deb13-cloud-amd64".to_string(),
            cmdline_old: "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro".to_string(),
            backend: "disk".to_string(),
            image_dir: "/var/lib/kup/images/1767225600-3f9a2c1b".to_string(),
            disk_copy: None,
            restore: crate::config::RestoreMode::Lazy,
            checks: Checks {
                health_timeout: 30,
                grace: 2,
                kexec_watchdog: 90,
                make_default: true,
            },
            fallback: Some(FallbackOf {
                id: "1767225000-00000001".to_string(),
                kernel: "6.12.117+deb13-cloud-amd64".to_string(),
                failures: vec![UnitFailure {
                    unit: "redis-server.service".to_string(),
                    reason: "health check failed".to_string(),
                }],
            }),
            dry_run: false,
            units: vec![
                UnitImage {
                    unit: "memcached.service".to_string(),
                    main_pid: 812,
                    pids: vec![812, 813, 814],
                    images: "/var/lib/kup/images/1767225600-3f9a2c1b/memcached.service".to_string(),
                    external: vec!["unix[12345]".to_string()],
                    inherit: vec![InheritFd {
                        fd: 1,
                        key: "socket:[12345]".to_string(),
                    }],
                    tcp: vec![crate::tcp::TcpConn {
                        local: "10.0.2.15:11211".parse().unwrap(),
                        remote: "10.0.2.2:40000".parse().unwrap(),
                    }],
                    health: Some("memcached-tool 127.0.0.1 stats".to_string()),
                    state: UnitState::Dumped,
                },
                UnitImage {
                    unit: "redis-server.service".to_string(),
                    main_pid: 900,
                    pids: vec![900],
                    images: "/x".to_string(),
                    external: vec![],
                    inherit: vec![],
                    tcp: vec![],
                    health: None,
                    state: UnitState::Failed("criu said no".to_string()),
                },
            ],
        }
    }

    #[test]
    fn json_round_trip() {
        let m = sample();
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"state\": \"dumped\""), "{text}");
        assert!(text.contains("\"failed\": \"criu said no\""), "{text}");
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
    }

    #[test]
    fn a_manifest_from_before_the_checks_reads_with_the_defaults() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("checks");
        o.remove("fallback");
        let m = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(m.checks, Checks::default());
        assert_eq!(m.fallback, None);
        let text = String::from_utf8(m.to_json().unwrap()).unwrap();
        assert!(
            !text.contains("\"fallback\""),
            "no fallback field unless one: {text}"
        );
    }

    /// Two units restored at once each record their state; neither overwrites the other's (seen in
    /// the lab: memcached's and redis's `kup-restore exec` racing, one unit then "not restored").
    #[test]
    fn concurrent_updates_keep_every_units_state() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), &sample()).unwrap();
        std::thread::scope(|s| {
            for unit in ["memcached.service", "redis-server.service"] {
                let dir = dir.path();
                s.spawn(move || {
                    for i in 0..20 {
                        update(dir, |m| {
                            let u = m.unit_mut(unit).unwrap();
                            u.state = if i == 19 {
                                UnitState::Restored
                            } else {
                                UnitState::Failed(format!("round {i}"))
                            };
                        })
                        .unwrap();
                    }
                });
            }
        });
        let m = read(dir.path()).unwrap();
        assert!(
            m.units.iter().all(|u| u.state == UnitState::Restored),
            "{:?}",
            m.units
        );
    }

    #[test]
    fn a_damaged_manifest_is_read_from_its_second_copy() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        write_atomic(dir.path(), &m).unwrap();
        std::fs::write(manifest_path(dir.path()), b"{\"version\": 1, \"id\": \"x").unwrap();
        assert_eq!(read(dir.path()).unwrap(), m);
        // Both damaged: the first copy's error, naming it.
        std::fs::write(dir.path().join(MANIFEST_COPY_FILE), b"garbage").unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.json is corrupt"), "{err}");
    }

    #[test]
    fn file_round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        write_atomic(dir.path(), &m).unwrap();
        assert_eq!(read(dir.path()).unwrap(), m);
        m.unit_mut("memcached.service").unwrap().state = UnitState::Restored;
        write_atomic(dir.path(), &m).unwrap();
        assert_eq!(read(dir.path()).unwrap(), m);
        assert!(!dir.path().join(MANIFEST_TMP_FILE).exists());
        assert!(dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn creates_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        write_atomic(&sub, &sample()).unwrap();
        assert_eq!(read(&sub).unwrap(), sample());
    }

    #[test]
    fn leftover_tmp_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        write_atomic(dir.path(), &m).unwrap();
        // A writer crashed halfway through the next write.
        std::fs::write(
            dir.path().join(MANIFEST_TMP_FILE),
            b"{\"version\": 1, \"id\": \"tru",
        )
        .unwrap();
        assert_eq!(read(dir.path()).unwrap(), m);
        // And the next write replaces the leftover.
        write_atomic(dir.path(), &m).unwrap();
        assert!(!dir.path().join(MANIFEST_TMP_FILE).exists());
    }

    #[test]
    fn only_tmp_means_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_TMP_FILE), b"{").unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("no handoff manifest at"), "{err}");
    }

    #[test]
    fn version_mismatch() {
        let json = br#"{"version": 2, "something": "else"}"#;
        let err = Manifest::from_json(json).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Version {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("version 2"), "{msg}");
        assert!(msg.contains("reads version 1"), "{msg}");
        assert!(msg.contains("run the kup release that wrote it"), "{msg}");
    }

    #[test]
    fn corrupted_json_names_file_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let json = sample().to_json().unwrap();
        std::fs::write(manifest_path(dir.path()), &json[..json.len() / 2]).unwrap();
        let err = read(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ManifestError::Corrupt { .. }), "{err:?}");
        assert!(
            msg.contains(&manifest_path(dir.path()).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("is corrupt (EOF while parsing"), "{msg}");
        assert!(msg.contains("line"), "serde_json gives the position: {msg}");

        let err = Manifest::from_json(b"{\"version\": 1}").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let err = Manifest::from_json(b"[]").unwrap_err();
        assert!(matches!(err, ManifestError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn bad_id_rejected() {
        let mut m = sample();
        m.id = "a b".to_string();
        let err = Manifest::from_json(&m.to_json().unwrap()).unwrap_err();
        assert!(matches!(err, ManifestError::BadId { .. }), "{err:?}");
    }

    #[test]
    fn handoff_ids() {
        let a = new_handoff_id();
        let b = new_handoff_id();
        assert!(is_valid_handoff_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_valid_handoff_id(""));
        assert!(!is_valid_handoff_id("x=y"));
        assert!(!is_valid_handoff_id("x_y"));
        assert!(!is_valid_handoff_id(&"a".repeat(65)));
    }
}
