//! Settings from kup's TOML files: defaults, `/etc/kup/kup.toml` and drop-in fragments, merged and
//! validated into one [`Settings`].
//!
//! Files are read in this order (missing files and directories are skipped):
//! `/usr/lib/kup/kup.toml`, `/etc/kup/kup.toml`, `/etc/kup/kup.d/*.toml` (sorted by name),
//! `/run/kup/kup.d/*.toml` (sorted by name). A later file overrides the scalar keys of `[update]`;
//! `[[unit]]` entries accumulate, and a later entry with the same `name` replaces the earlier one.
//!
//! ```toml
//! [update]
//! kernel = "6.12.117+deb13-cloud-amd64"   # optional staged target; "" or absent = newest installed
//! backend = "disk"                        # or "luo": images kept in RAM across the kexec
//! luo_disk_copy = true                    # luo: also a copy in image_dir, for a boot through the firmware
//! luo_in_place = true                     # luo: the processes' memory stays where it is (PPP kernels)
//! image_dir = "/var/lib/kup/images"
//! extra_cmdline = ""                      # appended to the new kernel's command line
//! precopy_rounds = 0                      # 0..=16
//! store = "auto"                          # memory images: "foam", "criu" or "auto" (foam for lazy restores on disk)
//! restore = "eager"                       # or "lazy": resume first, pages arrive on demand
//! auto = "off"                            # after a kernel install: "off", "timer" or "now"
//! health_timeout = 60                     # seconds a unit's health command may take
//! grace = 5                               # seconds a restored unit must stay up before the boot is blessed
//! kexec_watchdog = 180                    # seconds the new kernel has to reach kup's restore (hardware watchdog); 0 = off
//! make_default = false                    # once blessed, the new kernel becomes the boot loader's default entry
//! dry_run_vm_timeout = 900                # seconds a dry-run's throwaway VM may take to restore; 0 = no VM
//!
//! [[unit]]
//! name = "memcached.service"
//! health = "memcached-tool 127.0.0.1 stats"   # optional shell command
//! ```
//!
//! [`parse_fragment`] is pure; [`Settings::load_from`] and [`Settings::load`] do the file I/O.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Highest accepted `precopy_rounds`.
pub const MAX_PRECOPY_ROUNDS: u8 = 16;
/// Default `health_timeout`, seconds.
pub const DEFAULT_HEALTH_TIMEOUT: u16 = 60;
/// Default `grace`, seconds.
pub const DEFAULT_GRACE: u16 = 5;
/// Default `kexec_watchdog`, seconds.
pub const DEFAULT_KEXEC_WATCHDOG: u16 = 180;
/// Shortest `kexec_watchdog` other than 0: no kernel boots faster.
pub const MIN_KEXEC_WATCHDOG: u16 = 30;
/// Default `dry_run_vm_timeout`, seconds.
pub const DEFAULT_DRY_RUN_VM_TIMEOUT: u16 = 900;
/// Shortest `dry_run_vm_timeout` other than 0: a VM boot with a restore takes longer.
pub const MIN_DRY_RUN_VM_TIMEOUT: u16 = 60;
/// Default `image_dir`.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/kup/images";

/// Where the configuration lives. [`ConfigPaths::system`] gives the real locations; tests point it
/// at a temporary directory with [`ConfigPaths::under`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPaths {
    /// Distribution defaults, read first (`/usr/lib/kup/kup.toml`).
    pub defaults: PathBuf,
    /// The administrator's file (`/etc/kup/kup.toml`).
    pub main: PathBuf,
    /// Drop-in directories, in order; each one's `*.toml` files are read sorted by name
    /// (`/etc/kup/kup.d`, `/run/kup/kup.d`).
    pub dropin_dirs: Vec<PathBuf>,
}

impl ConfigPaths {
    /// The real locations on the system.
    pub fn system() -> Self {
        Self::under(Path::new("/"))
    }

    /// The real locations, below `root` instead of `/` (a chroot, an image, a test's tempdir).
    pub fn under(root: &Path) -> Self {
        Self {
            defaults: root.join("usr/lib/kup/kup.toml"),
            main: root.join("etc/kup/kup.toml"),
            dropin_dirs: vec![root.join("etc/kup/kup.d"), root.join("run/kup/kup.d")],
        }
    }

    /// The files that exist, in the order they are applied.
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        for single in [&self.defaults, &self.main] {
            if single.is_file() {
                files.push(single.clone());
            }
        }
        for dir in &self.dropin_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: dir.clone(),
                        source,
                    });
                }
            };
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Read {
                    path: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || !name.ends_with(".toml") || !path.is_file() {
                    continue;
                }
                found.push(path);
            }
            found.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            files.extend(found);
        }
        Ok(files)
    }
}

/// Why the configuration was refused. Every message names the file and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or directory could not be read.
    #[error("cannot read kup configuration {}: {source}; check that it exists and is readable by root", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid TOML, has an unknown key, or a value kup does not accept.
    #[error("{}{}: {reason} (fix or remove it: kup refuses the whole configuration until then)", path.display(), Location(*line, *column))]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key or value, when toml knows it.
        line: Option<usize>,
        /// 1-based column, when toml knows it.
        column: Option<usize>,
        reason: String,
    },
}

struct Location(Option<usize>, Option<usize>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(col)) => write!(f, ":{line}:{col}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

/// The storage backend for the checkpoint images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Images on disk under `image_dir`; works on every kernel and survives a firmware reboot.
    #[default]
    Disk,
    /// Images in RAM across the kexec (the Live Update Orchestrator, `crate::luo`): nothing is
    /// written to disk; needs LUO on both kernels (kernel-patches/), else the update uses the disk.
    /// A power loss or a firmware reboot after the final dump loses what only RAM held.
    Luo,
}

impl Backend {
    /// The name used in the configuration and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Disk => "disk",
            Backend::Luo => "luo",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disk" => Ok(Backend::Disk),
            "luo" => Ok(Backend::Luo),
            other => Err(format!(
                "unknown backend {other:?}; use \"disk\" (images on disk) or \"luo\" (images kept in RAM across the kexec)"
            )),
        }
    }
}

/// The form a unit's memory takes in its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Store {
    /// FOAM for a lazy restore on the disk backend, CRIU's images otherwise.
    #[default]
    Auto,
    /// FOAM (`crate::foam`): one file per process, file offset = virtual address; pre-copy rounds
    /// overwrite it in place. An eager restore first copies the pages into CRIU's pages files.
    Foam,
    /// CRIU's own pagemap and pages images, one set per pre-copy round, chained to the previous.
    Criu,
}

impl Store {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Store::Auto => "auto",
            Store::Foam => "foam",
            Store::Criu => "criu",
        }
    }
}

impl std::str::FromStr for Store {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Store::Auto),
            "foam" => Ok(Store::Foam),
            "criu" => Ok(Store::Criu),
            other => Err(format!(
                "unknown store {other:?}; use \"foam\" (one file per process, offset = address), \"criu\" (CRIU's own images) or \"auto\""
            )),
        }
    }
}

/// How the next kernel brings a unit's memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Every page is read back before the unit resumes (the unit never waits on a page later).
    #[default]
    Eager,
    /// The unit resumes at once; its pages arrive on first touch (userfaultfd, kup's lazy-pages
    /// server, pre-copy images included) and in the background until all are in. The images stay
    /// until then.
    Lazy,
}

/// The validated `[update]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSettings {
    /// Staged target kernel version (`uname -r` form); `None` = newest installed.
    pub kernel: Option<String>,
    pub backend: Backend,
    pub image_dir: PathBuf,
    /// With the luo backend, a copy of the images also goes to `image_dir` (the pre-copy rounds
    /// while the units serve, the final dumps frozen), so that a boot through the firmware (the new
    /// kernel panicked or hung, the power went) still restores them. Off: nothing reaches the disk,
    /// and such a boot starts the units afresh.
    pub luo_disk_copy: bool,
    /// With the luo backend, the processes' memory is kept in RAM where it is (persistent physical
    /// pages, a kernel with kup's PPP patch: `kernel-patches/`), not copied into checkpoint
    /// files: no second copy, so units larger than half of RAM fit. Used where the running kernel
    /// offers it, `luo_disk_copy` is off (a disk copy needs the memory copied) and the restore is
    /// lazy (the restore frees the kept pages as it copies them in).
    pub luo_in_place: bool,
    /// Appended to the new kernel's command line; empty for none.
    pub extra_cmdline: String,
    /// CRIU pre-dump rounds before the final dump, `0..=16`.
    pub precopy_rounds: u8,
    /// The form of the memory images.
    pub store: Store,
    pub restore: RestoreMode,
    /// What happens after a kernel package installs a kernel (`auto`; see [`crate::install`]).
    pub auto: crate::install::Auto,
    /// Seconds a unit's `health` command may run on the new kernel before it counts as failed.
    pub health_timeout: u16,
    /// Seconds every restored unit must stay active with its restored main PID, after the health
    /// checks, before the new kernel is blessed (else: fallback to the previous kernel).
    pub grace: u16,
    /// Seconds the new kernel has, from the kexec, until kup's restore takes over the hardware
    /// watchdog (which resets the machine into the firmware's default kernel when it runs out: a
    /// new kernel that hangs); 0 = kup leaves the watchdog alone.
    pub kexec_watchdog: u16,
    /// Once the new kernel is blessed, make it the boot loader's default entry (systemd-boot).
    pub make_default: bool,
    /// Seconds a dry-run's throwaway VM (the target kernel restoring the trial checkpoints) may
    /// take before it is stopped; 0 = the dry-run boots no VM.
    pub dry_run_vm_timeout: u16,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        Self {
            kernel: None,
            backend: Backend::Disk,
            image_dir: PathBuf::from(DEFAULT_IMAGE_DIR),
            luo_disk_copy: true,
            luo_in_place: true,
            extra_cmdline: String::new(),
            precopy_rounds: 0,
            store: Store::Auto,
            restore: RestoreMode::Eager,
            auto: crate::install::Auto::Off,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            grace: DEFAULT_GRACE,
            kexec_watchdog: DEFAULT_KEXEC_WATCHDOG,
            make_default: false,
            dry_run_vm_timeout: DEFAULT_DRY_RUN_VM_TIMEOUT,
        }
    }
}

/// One marked unit (`[[unit]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSettings {
    /// A systemd service name, e.g. `memcached.service`.
    #[serde(deserialize_with = "de_unit_name")]
    pub name: String,
    /// Optional shell command that must succeed after the restore.
    #[serde(default, deserialize_with = "de_health")]
    pub health: Option<String>,
}

/// The merged, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pub update: UpdateSettings,
    /// Marked units, in the order first seen.
    pub units: Vec<UnitSettings>,
}

/// One file's content, before merging. Absent keys are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    #[serde(default)]
    pub update: UpdateFragment,
    #[serde(default, rename = "unit")]
    pub units: Vec<UnitSettings>,
}

/// One file's `[update]` table; `None` leaves the earlier value in place.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateFragment {
    /// `Some(None)` (written `kernel = ""`) resets to "newest installed".
    #[serde(default, deserialize_with = "de_kernel")]
    pub kernel: Option<Option<String>>,
    #[serde(default, deserialize_with = "de_backend")]
    pub backend: Option<Backend>,
    #[serde(default, deserialize_with = "de_image_dir")]
    pub image_dir: Option<PathBuf>,
    pub luo_disk_copy: Option<bool>,
    pub luo_in_place: Option<bool>,
    #[serde(default, deserialize_with = "de_extra_cmdline")]
    pub extra_cmdline: Option<String>,
    #[serde(default, deserialize_with = "de_precopy_rounds")]
    pub precopy_rounds: Option<u8>,
    #[serde(default, deserialize_with = "de_store")]
    pub store: Option<Store>,
    #[serde(default, deserialize_with = "de_restore")]
    pub restore: Option<RestoreMode>,
    #[serde(default, deserialize_with = "de_auto")]
    pub auto: Option<crate::install::Auto>,
    #[serde(default, deserialize_with = "de_health_timeout")]
    pub health_timeout: Option<u16>,
    #[serde(default, deserialize_with = "de_grace")]
    pub grace: Option<u16>,
    #[serde(default, deserialize_with = "de_kexec_watchdog")]
    pub kexec_watchdog: Option<u16>,
    pub make_default: Option<bool>,
    #[serde(default, deserialize_with = "de_dry_run_vm_timeout")]
    pub dry_run_vm_timeout: Option<u16>,
}

/// Parses one file's text. `path` is only used in error messages.
pub fn parse_fragment(path: &Path, text: &str) -> Result<Fragment, ConfigError> {
    toml::from_str::<Fragment>(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            reason: e.message().trim().to_string(),
        }
    })
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Settings {
    /// Applies one fragment on top of `self`: scalars override, units accumulate by name.
    pub fn apply(&mut self, fragment: Fragment) {
        let u = fragment.update;
        if let Some(kernel) = u.kernel {
            self.update.kernel = kernel;
        }
        if let Some(backend) = u.backend {
            self.update.backend = backend;
        }
        if let Some(dir) = u.image_dir {
            self.update.image_dir = dir;
        }
        if let Some(copy) = u.luo_disk_copy {
            self.update.luo_disk_copy = copy;
        }
        if let Some(in_place) = u.luo_in_place {
            self.update.luo_in_place = in_place;
        }
        if let Some(extra) = u.extra_cmdline {
            self.update.extra_cmdline = extra;
        }
        if let Some(rounds) = u.precopy_rounds {
            self.update.precopy_rounds = rounds;
        }
        if let Some(store) = u.store {
            self.update.store = store;
        }
        if let Some(mode) = u.restore {
            self.update.restore = mode;
        }
        if let Some(auto) = u.auto {
            self.update.auto = auto;
        }
        if let Some(t) = u.health_timeout {
            self.update.health_timeout = t;
        }
        if let Some(g) = u.grace {
            self.update.grace = g;
        }
        if let Some(w) = u.kexec_watchdog {
            self.update.kexec_watchdog = w;
        }
        if let Some(d) = u.make_default {
            self.update.make_default = d;
        }
        if let Some(t) = u.dry_run_vm_timeout {
            self.update.dry_run_vm_timeout = t;
        }
        for unit in fragment.units {
            match self.units.iter_mut().find(|u| u.name == unit.name) {
                Some(existing) => *existing = unit,
                None => self.units.push(unit),
            }
        }
    }

    /// Merges already-read `(path, text)` pairs in order. Pure.
    pub fn from_texts<'a>(
        files: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let mut settings = Settings::default();
        for (path, text) in files {
            settings.apply(parse_fragment(path, text)?);
        }
        Ok(settings)
    }

    /// Reads and merges every file under `paths`.
    pub fn load_from(paths: &ConfigPaths) -> Result<Self, ConfigError> {
        let mut settings = Settings::default();
        for path in paths.files()? {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            settings.apply(parse_fragment(&path, &text)?);
        }
        Ok(settings)
    }

    /// Reads the real configuration ([`ConfigPaths::system`]).
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(&ConfigPaths::system())
    }

    /// The marked unit called `name`, if any.
    pub fn unit(&self, name: &str) -> Option<&UnitSettings> {
        self.units.iter().find(|u| u.name == name)
    }
}

/// Checks a systemd service name: `[A-Za-z0-9:_.\\@-]`, at most 255 bytes, ending in `.service`,
/// a non-empty prefix, and a template only with an instance (`foo@bar.service`, not `foo@.service`).
pub fn validate_unit_name(name: &str) -> Result<(), String> {
    let fix = "write the full service name as `systemctl list-units` shows it, e.g. \"memcached.service\"";
    if name.len() > 255 {
        return Err(format!(
            "unit name {name:?} is longer than 255 bytes; {fix}"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":_.\\@-".contains(*c)))
    {
        return Err(format!(
            "unit name {name:?} contains {bad:?}, which systemd does not allow in unit names; {fix}"
        ));
    }
    let Some(prefix) = name.strip_suffix(".service") else {
        return Err(format!(
            "unit name {name:?} does not end in \".service\"; kup checkpoints services only; {fix}"
        ));
    };
    if prefix.is_empty() || prefix.starts_with('@') {
        return Err(format!(
            "unit name {name:?} has no name before the suffix; {fix}"
        ));
    }
    if prefix.ends_with('@') {
        return Err(format!(
            "unit name {name:?} is a template without an instance; name the instance, e.g. \"{prefix}main.service\""
        ));
    }
    if prefix.matches('@').count() > 1 {
        return Err(format!("unit name {name:?} has more than one '@'; {fix}"));
    }
    Ok(())
}

fn de_unit_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    validate_unit_name(&name).map_err(serde::de::Error::custom)?;
    Ok(name)
}

fn de_health<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let cmd = String::deserialize(d)?;
    if cmd.trim().is_empty() {
        return Err(serde::de::Error::custom(
            "health is empty; give a shell command that exits 0 when the service is healthy, or remove the key",
        ));
    }
    Ok(Some(cmd))
}

fn de_kernel<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    let kernel = String::deserialize(d)?;
    if kernel.is_empty() {
        return Ok(Some(None));
    }
    if kernel.starts_with('.')
        || kernel
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(serde::de::Error::custom(format!(
            "kernel {kernel:?} is not a kernel version; write it as `uname -r` prints it, e.g. \"6.12.117+deb13-cloud-amd64\", or \"\" for the newest installed"
        )));
    }
    Ok(Some(Some(kernel)))
}

fn de_backend<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Backend>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_store<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Store>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_image_dir<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    let path = PathBuf::from(&s);
    if !path.is_absolute() {
        return Err(serde::de::Error::custom(format!(
            "image_dir {s:?} is not an absolute path; write e.g. \"{DEFAULT_IMAGE_DIR}\""
        )));
    }
    Ok(Some(path))
}

fn de_extra_cmdline<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if s.chars().any(|c| c.is_control()) {
        return Err(serde::de::Error::custom(
            "extra_cmdline contains a newline or control character; write the arguments on one line",
        ));
    }
    if s.split_whitespace().any(|w| w.starts_with("kup.handoff=")) {
        return Err(serde::de::Error::custom(
            "extra_cmdline sets kup.handoff=, which kup sets itself; remove it",
        ));
    }
    Ok(Some(s))
}

fn de_auto<'de, D: Deserializer<'de>>(d: D) -> Result<Option<crate::install::Auto>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_precopy_rounds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let n = i64::deserialize(d)?;
    match u8::try_from(n) {
        Ok(r) if r <= MAX_PRECOPY_ROUNDS => Ok(Some(r)),
        _ => Err(serde::de::Error::custom(format!(
            "precopy_rounds = {n} is out of range; use a number from 0 to {MAX_PRECOPY_ROUNDS}"
        ))),
    }
}

/// Seconds in `lo..=hi` for `key`.
fn de_seconds<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    lo: u16,
    hi: u16,
) -> Result<Option<u16>, D::Error> {
    let n = i64::deserialize(d)?;
    match u16::try_from(n) {
        Ok(s) if (lo..=hi).contains(&s) => Ok(Some(s)),
        _ => Err(serde::de::Error::custom(format!(
            "{key} = {n} is out of range; give seconds from {lo} to {hi}"
        ))),
    }
}

fn de_health_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    de_seconds(d, "health_timeout", 1, 3600)
}

fn de_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    de_seconds(d, "grace", 0, 600)
}

fn de_kexec_watchdog<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let n = i64::deserialize(d)?;
    match u16::try_from(n) {
        Ok(s) if s == 0 || (MIN_KEXEC_WATCHDOG..=3600).contains(&s) => Ok(Some(s)),
        _ => Err(serde::de::Error::custom(format!(
            "kexec_watchdog = {n} is out of range; give seconds from {MIN_KEXEC_WATCHDOG} to 3600 (no kernel boots faster), or 0 for off"
        ))),
    }
}

fn de_dry_run_vm_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let n = i64::deserialize(d)?;
    match u16::try_from(n) {
        Ok(s) if s == 0 || (MIN_DRY_RUN_VM_TIMEOUT..=7200).contains(&s) => Ok(Some(s)),
        _ => Err(serde::de::Error::custom(format!(
            "dry_run_vm_timeout = {n} is out of range; give seconds from {MIN_DRY_RUN_VM_TIMEOUT} to 7200 (a VM boots and restores in no less), or 0 for a dry-run without the VM"
        ))),
    }
}

fn de_restore<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RestoreMode>, D::Error> {
    match String::deserialize(d)?.as_str() {
        "eager" => Ok(Some(RestoreMode::Eager)),
        "lazy" => Ok(Some(RestoreMode::Lazy)),
        other => Err(serde::de::Error::custom(format!(
            "restore = {other:?} is not a restore mode; write \"eager\" or \"lazy\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn empty_gives_defaults() {
        let s = Settings::from_texts([(p("a.toml"), "")]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.update.image_dir, PathBuf::from("/var/lib/kup/images"));
        assert_eq!(s.update.backend, Backend::Disk);
        assert!(
            s.update.luo_disk_copy,
            "the luo backend keeps a disk copy unless told not to"
        );
        assert!(
            s.update.luo_in_place,
            "memory kept in place where it can be"
        );
    }

    #[test]
    fn full_fragment_parses() {
        let text = r#"
[update]
kernel = "6.12.117+deb13-cloud-amd64"
backend = "disk"
image_dir = "/srv/kup"
luo_disk_copy = false
luo_in_place = false
extra_cmdline = "quiet"
precopy_rounds = 3
restore = "lazy"
health_timeout = 20
grace = 0
kexec_watchdog = 90
make_default = true
dry_run_vm_timeout = 0

[[unit]]
name = "memcached.service"
health = "memcached-tool 127.0.0.1 stats"

[[unit]]
name = "redis-server.service"
"#;
        let s = Settings::from_texts([(p("a.toml"), text)]).unwrap();
        assert_eq!(
            s.update.kernel.as_deref(),
            Some("6.12.117+deb13-cloud-amd64")
        );
        assert_eq!(s.update.image_dir, PathBuf::from("/srv/kup"));
        assert!(!s.update.luo_disk_copy);
        assert!(!s.update.luo_in_place);
        assert_eq!(s.update.extra_cmdline, "quiet");
        assert_eq!(s.update.precopy_rounds, 3);
        assert_eq!(s.update.restore, RestoreMode::Lazy);
        assert_eq!((s.update.health_timeout, s.update.grace), (20, 0));
        assert_eq!(s.update.kexec_watchdog, 90);
        assert!(s.update.make_default);
        assert_eq!(s.update.dry_run_vm_timeout, 0);
        assert_eq!(s.units.len(), 2);
        assert_eq!(
            s.unit("memcached.service").unwrap().health.as_deref(),
            Some("memcached-tool 127.0.0.1 stats")
        );
        assert_eq!(s.unit("redis-server.service").unwrap().health, None);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn merge_order_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            &root.join("usr/lib/kup/kup.toml"),
            "[update]\nprecopy_rounds = 1\nextra_cmdline = \"a\"\nimage_dir = \"/d0\"\nkernel = \"1.0.0\"\n",
        );
        write(
            &root.join("etc/kup/kup.toml"),
            "[update]\nprecopy_rounds = 2\nextra_cmdline = \"b\"\n[[unit]]\nname = \"a.service\"\n",
        );
        // Sorted by name: 10-x before 20-y, regardless of creation order.
        write(
            &root.join("etc/kup/kup.d/20-y.toml"),
            "[update]\nprecopy_rounds = 4\n[[unit]]\nname = \"c.service\"\n",
        );
        write(
            &root.join("etc/kup/kup.d/10-x.toml"),
            "[update]\nprecopy_rounds = 3\nimage_dir = \"/d1\"\n[[unit]]\nname = \"b.service\"\n",
        );
        write(
            &root.join("etc/kup/kup.d/ignored.conf"),
            "not toml at all [",
        );
        write(
            &root.join("run/kup/kup.d/00-z.toml"),
            "[update]\nprecopy_rounds = 5\nkernel = \"\"\n",
        );

        let paths = ConfigPaths::under(root);
        let files = paths.files().unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "usr/lib/kup/kup.toml",
                "etc/kup/kup.toml",
                "etc/kup/kup.d/10-x.toml",
                "etc/kup/kup.d/20-y.toml",
                "run/kup/kup.d/00-z.toml"
            ]
        );

        let s = Settings::load_from(&paths).unwrap();
        assert_eq!(s.update.precopy_rounds, 5);
        assert_eq!(s.update.extra_cmdline, "b");
        assert_eq!(s.update.image_dir, PathBuf::from("/d1"));
        assert_eq!(s.update.kernel, None, "kernel = \"\" resets to newest");
        let units: Vec<_> = s.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(units, ["a.service", "b.service", "c.service"]);
    }

    #[test]
    fn missing_everything_is_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings::load_from(&ConfigPaths::under(dir.path())).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = "[update]\nbackend = \"disk\"\nprecopy_round = 2\n";
        let err = parse_fragment(p("/etc/kup/kup.d/50-x.toml"), text).unwrap_err();
        let ConfigError::Invalid { line, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*line, Some(3));
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/kup/kup.d/50-x.toml:3:"), "{msg}");
        assert!(msg.contains("precopy_round"), "{msg}");
        assert!(
            msg.contains("precopy_rounds"),
            "lists the valid keys: {msg}"
        );
    }

    #[test]
    fn unknown_table_and_unit_key_rejected() {
        let err = parse_fragment(p("k.toml"), "[updates]\nkernel = \"x\"\n").unwrap_err();
        assert!(err.to_string().starts_with("k.toml:1:"), "{err}");
        let err = parse_fragment(
            p("k.toml"),
            "[[unit]]\nname = \"a.service\"\nhealt = \"true\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("k.toml:3:"), "{err}");
        assert!(err.to_string().contains("healt"), "{err}");
    }

    #[test]
    fn syntax_error_names_line() {
        let err = parse_fragment(p("k.toml"), "[update]\n\nkernel = \n").unwrap_err();
        assert!(err.to_string().starts_with("k.toml:3:"), "{err}");
    }

    #[test]
    fn bad_unit_names() {
        for (name, why) in [
            ("memcached", "does not end in \".service\""),
            ("memcached.socket", "does not end in \".service\""),
            ("mem cached.service", "contains ' '"),
            ("mem/cached.service", "contains '/'"),
            (".service", "no name"),
            ("getty@.service", "template without an instance"),
        ] {
            let text = format!("[update]\n[[unit]]\nname = \"{name}\"\n");
            let err = parse_fragment(p("u.toml"), &text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("u.toml:3:"), "{name}: {msg}");
            assert!(msg.contains(why), "{name}: {msg}");
        }
        assert!(validate_unit_name("getty@tty1.service").is_ok());
        assert!(validate_unit_name("redis-server.service").is_ok());
        assert!(validate_unit_name("a\\x2db.service").is_ok());
    }

    #[test]
    fn duplicate_unit_is_replaced() {
        let a = "[[unit]]\nname = \"memcached.service\"\nhealth = \"old\"\n[[unit]]\nname = \"redis-server.service\"\n";
        let b = "[[unit]]\nname = \"memcached.service\"\nhealth = \"new\"\n";
        let s = Settings::from_texts([(p("a.toml"), a), (p("b.toml"), b)]).unwrap();
        assert_eq!(s.units.len(), 2);
        assert_eq!(s.units[0].name, "memcached.service");
        assert_eq!(s.units[0].health.as_deref(), Some("new"));
        // A later entry without health drops the earlier health: the entry is replaced, not merged.
        let c = "[[unit]]\nname = \"memcached.service\"\n";
        let s = Settings::from_texts([(p("a.toml"), a), (p("c.toml"), c)]).unwrap();
        assert_eq!(s.units[0].health, None);
    }

    #[test]
    fn store_parses_and_names_the_choices() {
        let s = Settings::from_texts([(p("s.toml"), "[update]\nstore = \"criu\"\n")]).unwrap();
        assert_eq!(s.update.store, Store::Criu);
        assert_eq!(Settings::default().update.store, Store::Auto);
        let err = parse_fragment(p("s.toml"), "[update]\nstore = \"tape\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown store \"tape\""), "{msg}");
        assert!(msg.contains("\"foam\""), "{msg}");
    }

    #[test]
    fn bad_backend() {
        let s = Settings::from_texts([(p("b.toml"), "[update]\nbackend = \"luo\"\n")]).unwrap();
        assert_eq!(s.update.backend, Backend::Luo);
        let err = parse_fragment(p("b.toml"), "[update]\nbackend = \"tape\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("b.toml:2:"), "{msg}");
        assert!(msg.contains("unknown backend \"tape\""), "{msg}");
        assert!(msg.contains("\"luo\""), "{msg}");
    }

    #[test]
    fn bad_values() {
        let cases = [
            ("precopy_rounds = 17", "out of range"),
            ("restore = \"sometimes\"", "write \"eager\" or \"lazy\""),
            ("precopy_rounds = -1", "out of range"),
            ("image_dir = \"var/lib\"", "not an absolute path"),
            ("kernel = \"../x\"", "not a kernel version"),
            ("extra_cmdline = \"kup.handoff=x\"", "kup sets itself"),
            ("precopy_rounds = \"3\"", "invalid type"),
            ("health_timeout = 0", "give seconds from 1 to 3600"),
            ("grace = 601", "give seconds from 0 to 600"),
            ("kexec_watchdog = 10", "or 0 for off"),
            (
                "dry_run_vm_timeout = 30",
                "or 0 for a dry-run without the VM",
            ),
        ];
        for (line, why) in cases {
            let err = parse_fragment(p("v.toml"), &format!("\n[update]\n{line}\n")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("v.toml:3:"), "{line}: {msg}");
            assert!(msg.contains(why), "{line}: {msg}");
        }
    }

    #[test]
    fn line_col_counts() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("a\n", 99), (2, 1));
    }
}
