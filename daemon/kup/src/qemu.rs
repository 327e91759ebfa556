//! QEMU, for the dry-run's throwaway VM: the target kernel and its own initrd boot a copy-on-write
//! view of this machine's root filesystem (QEMU's `snapshot=on`: the VM reads the live disk and
//! writes to a temporary file, never to the disk), with no network card, and restore the
//! dry-run's checkpoints there. kup in the VM reports on the second serial port. The facts about
//! the root filesystem are parsed from `/proc/self/mountinfo` and sysfs text (no I/O in the
//! parsers); [`run`] starts QEMU and waits for it within a time limit.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The QEMU system emulator kup boots the throwaway VM with (Debian: `qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";

/// The systemd target the throwaway VM boots into (`systemd.unit=`).
pub const TARGET: &str = "kup-dry-run.target";

/// Where kup in the VM writes its report (the VM's second serial port; the first is the console).
pub const REPORT_PORT: &str = "/dev/ttyS1";

/// Memory the VM needs beyond the checkpoints' own (the kernel, systemd, CRIU).
pub const BASE_MEMORY_MIB: u64 = 1024;

/// Why the VM could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "{QEMU} is not installed, so the restore is not tried in a throwaway VM; install it (Debian: apt install qemu-system-x86) for a dry-run that restores on the target kernel"
    )]
    NoQemu,
    #[error("the throwaway VM needs x86-64 (QEMU's {QEMU}); this machine is {0}")]
    Arch(&'static str),
    #[error(
        "the root filesystem cannot be given to a throwaway VM: {0}; the restore is not tried there"
    )]
    Root(String),
    #[error(
        "the throwaway VM needs {need} MiB of memory (the checkpoints + {BASE_MEMORY_MIB} MiB), and only {available} MiB are available; free memory or mark fewer units for the dry-run"
    )]
    Memory { need: u64, available: u64 },
    #[error("cannot start {QEMU}: {0}")]
    Start(std::io::Error),
}

/// The root filesystem as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFs {
    /// `MAJOR:MINOR` of its block device.
    pub device: String,
    /// The directory of the filesystem mounted at `/` (`/` unless a subvolume or a bind mount).
    pub fs_root: String,
    pub fstype: String,
}

/// The filesystem mounted at `/` (the last mount there wins, as in the kernel's view). Pure.
pub fn root_fs(mountinfo: &str) -> Option<RootFs> {
    mountinfo.lines().rev().find_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        let f: Vec<&str> = head.split_whitespace().collect();
        let fstype = tail.split_whitespace().next()?;
        if f.get(4) != Some(&"/") {
            return None;
        }
        Some(RootFs {
            device: (*f.get(2)?).to_owned(),
            fs_root: (*f.get(3)?).to_owned(),
            fstype: fstype.to_owned(),
        })
    })
}

/// `DEVNAME` of a sysfs `uevent` file (`/sys/dev/block/MAJ:MIN/uevent`). Pure.
pub fn uevent_devname(uevent: &str) -> Option<&str> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|n| !n.is_empty() && !n.contains(".."))
}

/// How the VM mounts the root: the kernel arguments beyond `root=`. Refuses what a plain block
/// device cannot carry (a bind mount of a directory).
pub fn root_args(root: &RootFs) -> Result<Vec<String>, VmError> {
    let mut args = vec![format!("rootfstype={}", root.fstype)];
    if root.fs_root != "/" {
        if root.fstype != "btrfs" {
            return Err(VmError::Root(format!(
                "/ is the directory {} of its {} filesystem (a bind mount), which a VM cannot mount as its root",
                root.fs_root, root.fstype
            )));
        }
        args.push(format!(
            "rootflags=subvol={}",
            root.fs_root.trim_start_matches('/')
        ));
    }
    Ok(args)
}

/// Everything the throwaway VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The live root's block device, read through a copy-on-write snapshot.
    pub root_device: PathBuf,
    /// Kernel arguments for the root beyond `root=` ([`root_args`]).
    pub root_args: Vec<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// KVM when [`kvm_usable`], else TCG.
    pub kvm: bool,
    /// The dry-run's handoff id (`kup.handoff=`).
    pub handoff: String,
    /// More kernel arguments (the update's `extra_cmdline`).
    pub extra: String,
    /// Where the console log, the report and QEMU's temporary snapshot go.
    pub run_dir: PathBuf,
}

impl Plan {
    /// The VM kernel's command line. The root is the VM's only disk (`/dev/vda`); `fstab=no`: the
    /// machine's other filesystems are not there (the checkpoints are on the root, checked
    /// before); `panic=-1` with QEMU's `-no-reboot` ends the VM at a panic.
    pub fn cmdline(&self) -> String {
        let mut c = vec![
            "root=/dev/vda".to_owned(),
            "rw".to_owned(),
            "fstab=no".to_owned(),
        ];
        c.extend(self.root_args.iter().cloned());
        c.extend(
            [
                "console=ttyS0,115200",
                "panic=-1",
                &format!("systemd.unit={TARGET}"),
                &format!("kup.handoff={}", self.handoff),
                "kup.dryrun=1",
            ]
            .map(str::to_owned),
        );
        c.extend(self.extra.split_whitespace().map(str::to_owned));
        c.join(" ")
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        let run = |name: &str| self.run_dir.join(name).display().to_string();
        let mut a: Vec<String> = [
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-nic",
            "none",
            "-machine",
            "q35",
        ]
        .map(str::to_owned)
        .to_vec();
        a.extend(
            if self.kvm {
                ["-accel", "kvm", "-cpu", "host"]
            } else {
                ["-accel", "tcg,thread=multi", "-cpu", "max"]
            }
            .map(str::to_owned),
        );
        a.extend([
            "-m".to_owned(),
            self.memory_mib.to_string(),
            "-smp".to_owned(),
            self.cpus.to_string(),
            "-kernel".to_owned(),
            self.kernel.display().to_string(),
            "-initrd".to_owned(),
            self.initrd.display().to_string(),
            "-append".to_owned(),
            self.cmdline(),
            // The live disk is only read (O_DIRECT: what is on the disk, not this kernel's cache of
            // the block device); the VM's writes go to a temporary file in $TMPDIR.
            "-drive".to_owned(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on,cache.direct=on",
                self.root_device.display()
            ),
            "-serial".to_owned(),
            format!("file:{}", run("console.log")),
            "-serial".to_owned(),
            format!("file:{}", run("report")),
            "-monitor".to_owned(),
            "none".to_owned(),
        ]);
        a
    }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// What kup in the VM wrote on the report port.
    pub report: String,
    /// The end of the VM's console.
    pub console_tail: String,
    /// Seconds from start to end.
    pub seconds: u64,
    /// `None` when it powered off or stopped by itself; else why it was stopped.
    pub killed: Option<String>,
}

/// Finds `QEMU` on PATH.
pub fn find_qemu() -> Result<PathBuf, VmError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(VmError::Arch(std::env::consts::ARCH));
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
        .ok_or(VmError::NoQemu)
}

/// The block device of the root filesystem, from `/proc/self/mountinfo` and sysfs.
pub fn root_device() -> Result<(RootFs, PathBuf), VmError> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| VmError::Root(format!("reading /proc/self/mountinfo: {e}")))?;
    let root = root_fs(&mi).ok_or_else(|| VmError::Root("no mount at / in mountinfo".into()))?;
    let uevent_path = format!("/sys/dev/block/{}/uevent", root.device);
    let uevent = std::fs::read_to_string(&uevent_path).map_err(|e| {
        VmError::Root(format!(
            "{} ({}) is not a block device ({uevent_path}: {e})",
            root.device, root.fstype
        ))
    })?;
    let name = uevent_devname(&uevent)
        .ok_or_else(|| VmError::Root(format!("{uevent_path} names no device")))?;
    let dev = Path::new("/dev").join(name);
    match std::fs::metadata(&dev) {
        Ok(m) if m.file_type().is_block_device() => Ok((root, dev)),
        _ => Err(VmError::Root(format!(
            "{} is not a block device node",
            dev.display()
        ))),
    }
}

/// Whether KVM can run the VM here: `/dev/kvm` opens, and this machine is not itself emulated by
/// QEMU's TCG (`systemd-detect-virt --vm` says `qemu`), whose emulation of AMD-V/VT-x is not good
/// enough for a nested KVM guest: seen in the lab, the machine itself was reset as the nested
/// guest booted ("Unhandled WRMSR"). A machine that is a KVM guest (`kvm`) may nest.
pub fn kvm_usable() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let virt = Command::new("systemd-detect-virt")
        .arg("--vm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    use_kvm(opens, &virt)
}

/// [`kvm_usable`]'s rule, from whether `/dev/kvm` opens and `systemd-detect-virt --vm`'s answer.
/// Pure.
pub fn use_kvm(dev_kvm_opens: bool, detect_virt: &str) -> bool {
    dev_kvm_opens && detect_virt != "qemu"
}

/// Boots the VM of `plan` and waits until it powers off, or kills it after `limit`.
pub fn run(qemu: &Path, plan: &Plan, limit: Duration) -> Result<Ended, VmError> {
    std::fs::create_dir_all(&plan.run_dir).map_err(VmError::Start)?;
    for f in ["console.log", "report", "qemu.log"] {
        let _ = std::fs::remove_file(plan.run_dir.join(f));
    }
    let log = std::fs::File::create(plan.run_dir.join("qemu.log")).map_err(VmError::Start)?;
    let t = Instant::now();
    let mut child = Command::new(qemu)
        .args(plan.args())
        .env("TMPDIR", &plan.run_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(VmError::Start)?)
        .stderr(log)
        .spawn()
        .map_err(VmError::Start)?;
    let killed = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break None,
            Ok(Some(status)) => {
                let qlog =
                    std::fs::read_to_string(plan.run_dir.join("qemu.log")).unwrap_or_default();
                break Some(format!(
                    "{QEMU} exited with {status}: {}",
                    tail(&qlog, 400).trim()
                ));
            }
            Ok(None) if t.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                break Some(format!(
                    "it did not finish within {} s (dry_run_vm_timeout) and was stopped",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => break Some(format!("waiting for {QEMU}: {e}")),
        }
    };
    let read = |name: &str| {
        std::fs::read(plan.run_dir.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(Ended {
        report: read("report"),
        console_tail: tail(&read("console.log"), 2000).to_owned(),
        seconds: t.elapsed().as_secs(),
        killed,
    })
}

/// The last `max` bytes of `text` (at a character boundary).
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
40 22 254:16 / /boot/efi rw,relatime shared:30 - vfat /dev/vdb1 rw,fmask=0077
";

    #[test]
    fn the_root_is_the_mount_at_slash() {
        assert_eq!(
            root_fs(MOUNTINFO),
            Some(RootFs {
                device: "254:0".into(),
                fs_root: "/".into(),
                fstype: "ext4".into()
            })
        );
        assert_eq!(root_fs("23 22 0:21 / /proc rw - proc proc rw\n"), None);
        // A later mount over / hides the first.
        let over = format!("{MOUNTINFO}50 22 0:40 / / rw - tmpfs tmpfs rw\n");
        assert_eq!(root_fs(&over).map(|r| r.fstype), Some("tmpfs".into()));
    }

    #[test]
    fn devname_comes_from_the_uevent() {
        let ue = "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n";
        assert_eq!(uevent_devname(ue), Some("vda"));
        assert_eq!(uevent_devname("MAJOR=8\n"), None);
        assert_eq!(uevent_devname("DEVNAME=../etc\n"), None);
    }

    #[test]
    fn a_subvolume_is_mounted_by_name_and_a_bind_mount_refused() {
        let mut r = root_fs(MOUNTINFO).unwrap_or_else(|| unreachable!());
        assert_eq!(root_args(&r).unwrap_or_default(), ["rootfstype=ext4"]);
        r.fs_root = "/@".into();
        let err = root_args(&r).expect_err("a bind mount");
        assert!(err.to_string().contains("bind mount"), "{err}");
        r.fstype = "btrfs".into();
        assert_eq!(
            root_args(&r).unwrap_or_default(),
            ["rootfstype=btrfs", "rootflags=subvol=@"]
        );
    }

    fn plan(kvm: bool) -> Plan {
        Plan {
            kernel: "/boot/vmlinuz-7.3.4".into(),
            initrd: "/boot/initrd.img-7.3.4".into(),
            root_device: "/dev/vda".into(),
            root_args: vec!["rootfstype=ext4".into()],
            memory_mib: 1124,
            cpus: 2,
            kvm,
            handoff: "h-1".into(),
            extra: "quiet  loglevel=3".into(),
            run_dir: "/run/kup/dry-run".into(),
        }
    }

    #[test]
    fn the_vm_reads_the_disk_through_a_snapshot_and_has_no_network() {
        let a = plan(false).args();
        let joined = a.join(" ");
        assert!(
            joined
                .contains("-drive file=/dev/vda,format=raw,if=virtio,snapshot=on,cache.direct=on"),
            "{joined}"
        );
        assert!(joined.contains("-nic none"), "{joined}");
        assert!(
            joined.contains("-accel tcg,thread=multi -cpu max"),
            "{joined}"
        );
        assert!(
            joined.contains("-serial file:/run/kup/dry-run/report"),
            "{joined}"
        );
        assert!(plan(true).args().join(" ").contains("-accel kvm -cpu host"));
        let append = a
            .iter()
            .skip_while(|x| *x != "-append")
            .nth(1)
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            append,
            "root=/dev/vda rw fstab=no rootfstype=ext4 console=ttyS0,115200 panic=-1 systemd.unit=kup-dry-run.target kup.handoff=h-1 kup.dryrun=1 quiet loglevel=3"
        );
    }

    #[test]
    fn kvm_only_where_it_opens_and_the_machine_is_not_under_tcg() {
        assert!(use_kvm(true, "none"));
        assert!(use_kvm(true, "kvm"));
        assert!(!use_kvm(true, "qemu"));
        assert!(!use_kvm(false, "none"));
    }

    #[test]
    fn tail_keeps_the_end_at_a_character_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
