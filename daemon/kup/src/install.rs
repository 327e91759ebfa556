//! The kernel install path: what happens when a kernel package (Debian's `/etc/kernel/postinst.d`)
//! or `kernel-install` adds a kernel. kup stages it: checks the image, makes sure its initrd
//! carries kup's hook, records it as the target of the next update, and, as `[update] auto` says,
//! schedules that update (`kup-update.timer`) or starts it (`kup-update.service`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::initrd::{self, InitrdError};
use crate::stage::{self, KernelImage, StageError};
use crate::systemd::{self, SystemdError};

/// Where [`stage_kernel`] records the staged kernel: a runtime configuration fragment, read after
/// `/etc/kup` (see [`crate::config`]) and gone after the next boot.
pub const STAGED_FRAGMENT: &str = "/run/kup/kup.d/50-staged.toml";
/// The timer of the maintenance window (`[update] auto = "timer"`).
pub const UPDATE_TIMER: &str = "kup-update.timer";
/// The service that runs an update to the newest installed or staged kernel.
pub const UPDATE_SERVICE: &str = "kup-update.service";

/// What kup does after a kernel was installed and staged (`[update] auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Auto {
    /// Only stage it; an administrator runs the update (`kupctl update`).
    #[default]
    Off,
    /// Start `kup-update.timer`: the update runs in its window (`OnCalendar=`).
    Timer,
    /// Start `kup-update.service` at once (it waits for the package manager to finish).
    Now,
}

impl Auto {
    /// The name in the configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Timer => "timer",
            Self::Now => "now",
        }
    }
}

impl fmt::Display for Auto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Auto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "timer" => Ok(Self::Timer),
            "now" => Ok(Self::Now),
            other => Err(format!(
                "auto = {other:?} is not known; use \"off\" (only stage new kernels), \"timer\" \
                 (update in kup-update.timer's window) or \"now\" (update right after the install)"
            )),
        }
    }
}

/// Why a kernel could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("kup cannot stage kernel {version}: {source}")]
    Stage { version: String, source: StageError },
    #[error("kup cannot stage kernel {version}: {source}")]
    Initrd {
        version: String,
        source: InitrdError,
    },
    #[error(
        "kup cannot stage kernel {version}: its initrd {initrd} still lacks kup's hook after {command}; check that kup's dracut module (/usr/lib/dracut/modules.d/90kup) or initramfs-tools hook (/usr/share/initramfs-tools/hooks/kup) is installed (reinstall kup)"
    )]
    StillWithoutHook {
        version: String,
        initrd: String,
        command: String,
    },
    #[error(
        "kup cannot record kernel {version} as staged in {path}: {source}; check that /run is writable"
    )]
    Record {
        version: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "kup staged kernel {version} but could not schedule its update ({auto}): {source}; run `kupctl update --kernel {version}` yourself"
    )]
    Schedule {
        version: String,
        auto: Auto,
        source: SystemdError,
    },
}

/// What [`stage_kernel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The checked kernel and its initrd.
    pub kernel: KernelImage,
    /// The initrd was rebuilt because it lacked kup's hook (with this command).
    pub rebuilt_with: Option<String>,
}

/// The text of [`STAGED_FRAGMENT`] for kernel `version`. Pure.
#[must_use]
pub fn staged_fragment(version: &str) -> String {
    format!(
        "# Written by `kupctl stage` when kernel {version} was installed: the next kup update\n\
         # (kupctl update, kup-update.service) switches to it. Gone after a reboot or kexec.\n\
         [update]\nkernel = \"{version}\"\n"
    )
}

/// Checks kernel `version` in `boot_dir` (image and initrd; the initrd is rebuilt when it lacks
/// kup's hook) and records it in `staged_path` as the target of the next update.
///
/// # Errors
/// [`InstallError`] naming the kernel, the reason and the fix.
pub fn stage_kernel(
    boot_dir: &Path,
    version: &str,
    staged_path: &Path,
) -> Result<Staged, InstallError> {
    let kernel =
        stage::resolve_kernel(boot_dir, Some(version)).map_err(|source| InstallError::Stage {
            version: version.to_owned(),
            source,
        })?;
    let mut rebuilt_with = None;
    if !initrd::has_module(&kernel.initrd) {
        let generator = initrd::rebuild(version).map_err(|source| InstallError::Initrd {
            version: version.to_owned(),
            source,
        })?;
        let command = generator.rebuild_command(version);
        if !initrd::has_module(&kernel.initrd) {
            return Err(InstallError::StillWithoutHook {
                version: version.to_owned(),
                initrd: kernel.initrd.display().to_string(),
                command,
            });
        }
        rebuilt_with = Some(command);
    }
    let record = |source| InstallError::Record {
        version: version.to_owned(),
        path: staged_path.to_path_buf(),
        source,
    };
    if let Some(dir) = staged_path.parent() {
        std::fs::create_dir_all(dir).map_err(record)?;
    }
    std::fs::write(staged_path, staged_fragment(version)).map_err(record)?;
    Ok(Staged {
        kernel,
        rebuilt_with,
    })
}

/// Whether systemd runs this machine (false in a chroot or an image build).
#[must_use]
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Schedules the update of a staged kernel as `auto` says; returns a sentence for the log.
///
/// # Errors
/// [`InstallError::Schedule`] when systemd refuses to start the timer or the service.
pub fn schedule(version: &str, auto: Auto) -> Result<String, InstallError> {
    let fail = |source| InstallError::Schedule {
        version: version.to_owned(),
        auto,
        source,
    };
    match auto {
        Auto::Off => Ok(format!(
            "[update] auto = \"off\": run `kupctl update` to switch to {version}"
        )),
        _ if !systemd_running() => Ok(format!(
            "systemd is not running here (chroot?): no update scheduled; run `kupctl update` on the booted machine to switch to {version}"
        )),
        Auto::Timer => {
            systemd::systemctl(&["start", UPDATE_TIMER]).map_err(fail)?;
            let next =
                systemd::property(UPDATE_TIMER, "NextElapseUSecRealtime").unwrap_or_default();
            Ok(format!(
                "the update to {version} runs in kup-update.timer's window{}",
                if next.is_empty() {
                    String::new()
                } else {
                    format!(" (next: {next})")
                }
            ))
        }
        Auto::Now => {
            systemd::systemctl(&["start", "--no-block", UPDATE_SERVICE]).map_err(fail)?;
            Ok(format!(
                "kup-update.service started: the update to {version} runs once the package manager has finished"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_parses_and_names_the_choices_when_wrong() {
        assert_eq!("off".parse(), Ok(Auto::Off));
        assert_eq!("timer".parse(), Ok(Auto::Timer));
        assert_eq!("now".parse(), Ok(Auto::Now));
        let err = "nightly".parse::<Auto>().expect_err("unknown");
        assert!(
            err.contains("\"nightly\"") && err.contains("\"timer\""),
            "{err}"
        );
    }

    #[test]
    fn the_staged_fragment_is_valid_configuration() {
        let text = staged_fragment("6.12.117+deb13-cloud-amd64");
        let settings =
            crate::config::Settings::from_texts([(Path::new("staged.toml"), text.as_str())])
                .expect("parses");
        assert_eq!(
            settings.update.kernel.as_deref(),
            Some("6.12.117+deb13-cloud-amd64")
        );
    }

    #[test]
    fn a_missing_kernel_is_refused_with_the_installed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = stage_kernel(dir.path(), "9.9.9", &dir.path().join("staged.toml"))
            .expect_err("nothing installed");
        let text = err.to_string();
        assert!(
            text.starts_with("kup cannot stage kernel 9.9.9: "),
            "{text}"
        );
        assert!(!dir.path().join("staged.toml").exists());
    }
}
