//! Shared by the lab tests: a lab guest with its own run directory, and host-side clients that check
//! services from outside the guest.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub mod disk_probe;
pub mod kup_kernels;
pub mod memcached;
pub mod redis;
pub mod vm_relay;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

pub const OLD: &str = "6.12.107+deb13-cloud-amd64";
pub const NEW: &str = "6.12.117+deb13-cloud-amd64";
pub const MAJOR: &str = "7.3.4+deb13-cloud-amd64";

/// A lab guest with its own run directory, stopped when dropped.
pub struct Lab {
    pub run: PathBuf,
}

impl Lab {
    pub fn new(name: &str) -> Self {
        let run = std::env::temp_dir().join(format!("kup-lab-test-{name}-{}", std::process::id()));
        let lab = Lab { run };
        lab.cmd(&["stop"]);
        lab
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kup-lab"))
            .args(args)
            .env("KUP_LAB_RUN_DIR", &self.run)
            .output()
            .expect("run kup-lab")
    }

    /// Runs a lab verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        assert!(
            out.status.success(),
            "lab {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        stdout
    }

    /// Boots OLD (2 GiB) with `tree` as the payload (kup's package installed at first boot) and
    /// the guest's memcached on 127.0.0.1:`port` of the host.
    pub fn boot_old(&self, tree: &std::path::Path, port: u16) {
        self.start(&["--kernel", OLD], tree, port);
    }

    /// [`Lab::boot_old`] with `mem_mib` of memory and `redis` (a host port) forwarded to the
    /// guest's redis when given; returns the `lab: up` line's stdout.
    pub fn boot_old_mem(
        &self,
        tree: &std::path::Path,
        port: u16,
        mem_mib: u32,
        redis: Option<u16>,
    ) -> String {
        let forward = redis.map(|p| format!("{p}:6379"));
        let mut boot = vec!["--kernel", OLD];
        if let Some(f) = &forward {
            boot.extend(["--forward", f.as_str()]);
        }
        self.start_mem(&boot, tree, port, mem_mib)
    }

    /// Boots `kernel` (2 GiB) through UEFI firmware and systemd-boot (`lab start --firmware`): OVMF
    /// boots systemd-boot from the guest's ESP disk, whose default entry is made `kernel`'s, so a
    /// reset or reboot goes through the firmware and the boot loader again (its default or one-shot
    /// entry). `tree` is the payload, the guest's memcached is on 127.0.0.1:`port`.
    pub fn boot_firmware(&self, tree: &std::path::Path, port: u16, kernel: &str) {
        self.start(&["--firmware", "--kernel", kernel], tree, port);
    }

    /// [`Lab::boot_old`] with a root disk that honours the guest's flushes (`lab start
    /// --disk-flush`), so the host can read what the guest synced ([`vm_relay`]).
    pub fn boot_old_flushing(&self, tree: &std::path::Path, port: u16) {
        self.start(&["--kernel", OLD, "--disk-flush"], tree, port);
    }

    /// `lab start BOOT...` with 2 GiB, `tree` as the payload and memcached on `port` of the host.
    fn start(&self, boot: &[&str], tree: &std::path::Path, port: u16) {
        self.start_mem(boot, tree, port, 2048);
    }

    /// `lab start BOOT...` with `mem_mib`, `tree` as the payload and memcached on `port` of the
    /// host; returns its stdout.
    fn start_mem(&self, boot: &[&str], tree: &std::path::Path, port: u16, mem_mib: u32) -> String {
        let forward = format!("{port}:11211");
        let mem = mem_mib.to_string();
        let mut args = vec!["start"];
        args.extend_from_slice(boot);
        args.extend([
            "--mem",
            &mem,
            "--forward",
            &forward,
            "--payload-tree",
            tree.to_str().unwrap(),
        ]);
        self.ok(&args)
    }

    /// Runs `cmd`, which begins a kernel switch: kupctl returns once the switch has begun (0) or
    /// loses the guest under it (255); anything else is a refusal or a failure before the switch.
    pub fn begin_switch(&self, cmd: &str) {
        let (code, out, err) = self.try_exec(cmd);
        eprint!("{out}{err}");
        assert!(
            code == 0 || code == 255,
            "{cmd} failed with {code}:\n{out}\n{err}"
        );
    }

    /// Runs a shell command in the guest that must succeed; returns its trimmed stdout.
    pub fn exec(&self, cmd: &str) -> String {
        self.ok(&["exec", "--", cmd]).trim().to_owned()
    }

    /// Runs a shell command in the guest; returns (status, stdout, stderr).
    pub fn try_exec(&self, cmd: &str) -> (i32, String, String) {
        let out = self.cmd(&["exec", "--", cmd]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("KUP_LAB_KEEP").is_none() {
            let _ = self.cmd(&["stop"]);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts that memcached runs as before `across`: active, with main PID `pid`, and keys
/// 0..`keys` all there and identical (read from the host).
pub fn assert_memcached_kept(lab: &Lab, port: u16, pid: &str, keys: u32, across: &str) {
    assert_eq!(lab.exec("systemctl is-active memcached"), "active");
    let now = lab.exec("systemctl show -p MainPID --value memcached");
    if now != pid {
        // Why it was not restored: the restore's own words on this boot.
        panic!(
            "memcached keeps its PID across {across}: it is {now}, was {pid}\n{}",
            lab.exec(
                "journalctl -b -o short-monotonic --no-pager -u memcached -u kup-luo.service -t kup-restore -t criu -t kup-handoff | tail -60; \
                 tail -30 /var/lib/kup/images/memcached.service/restore.log /var/lib/kup/images/luo-copy/memcached.service/restore.log 2>/dev/null || true"
            )
        );
    }
    assert_eq!(memcached::verify(port, keys).unwrap(), (keys, 0));
}

/// The (kernel, boot id) of a `lab: up` line.
pub fn up_line(stdout: &str) -> (String, String) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("lab: up "))
        .unwrap_or_else(|| panic!("no up line in {stdout:?}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_owned()
    };
    (field("kernel="), field("boot="))
}

/// The lab's payload for a test: kup's Debian package (built by `packaging/build-deb` from this
/// workspace's release binaries) at `/var/lib/kup-lab/kup.deb`, installed with dpkg at the guest's
/// first boot by the lab's install hook (`/usr/lib/kup-lab/payload-install`); `config` becomes
/// the administrator's /etc/kup/kup.toml. Tests may add more files to the tree (units, drop-ins).
pub fn install_tree(name: &str, config: &str) -> PathBuf {
    let tree = package_tree(name);
    std::fs::create_dir_all(tree.join("etc/kup")).unwrap();
    std::fs::write(tree.join("etc/kup/kup.toml"), config).unwrap();
    tree
}

/// The package and the install hook only, with no configuration (a guest where kup arrives as
/// a package would).
pub fn package_tree(name: &str) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tree = std::env::temp_dir().join(format!("kup-tree-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tree);
    let debs = tree.join("var/lib/kup-lab");
    std::fs::create_dir_all(&debs).unwrap();
    let out = Command::new(repo.join("packaging/build-deb"))
        .arg(&debs)
        .output()
        .expect("run packaging/build-deb");
    assert!(
        out.status.success(),
        "packaging/build-deb failed (build the workspace first: cargo build --release --workspace):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::rename(&deb, debs.join("kup.deb")).unwrap();
    let hook = tree.join("usr/lib/kup-lab/payload-install");
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    std::fs::copy(repo.join("tests/lab/payload/payload-install"), &hook).unwrap();
    tree
}

/// A guest command that rebuilds the installed package `linux-image-VERSION` as a .deb from dpkg's
/// own records (what dpkg-repack does) and prints its path, so a test can purge the kernel and
/// install it again with `dpkg -i`, the kernel package path of an `apt upgrade` (the image has no
/// package cache and the guest no network). The maintainer scripts go into the control area under
/// their plain names (`postinst`, ...): dpkg ignores any other name, and without them nothing runs
/// the kernel hooks. Uncompressed: xz under TCG would take minutes.
pub fn repack_kernel(version: &str) -> String {
    format!(
        "set -e; p=linux-image-{version}; d=/var/tmp/repack; rm -rf $d; mkdir -p $d/DEBIAN; \
         dpkg-query -L $p | while read -r f; do if [ -L \"$f\" ] || [ -f \"$f\" ]; then cp -a --parents \"$f\" $d; fi; done; \
         dpkg-query -s $p | grep -v -e '^Status:' -e '^Conffiles:' > $d/DEBIAN/control; \
         for s in preinst postinst prerm postrm; do [ ! -f /var/lib/dpkg/info/$p.$s ] || cp /var/lib/dpkg/info/$p.$s $d/DEBIAN/$s; done; \
         dpkg-deb -Znone --root-owner-group -b $d /var/tmp/$p.deb >/dev/null; rm -rf $d; echo /var/tmp/$p.deb"
    )
}
