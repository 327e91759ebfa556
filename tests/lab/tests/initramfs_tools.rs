//! Lab acceptance test of kup where initramfs-tools makes the initrds (Debian's default generator):
//! the guest switches from dracut to initramfs-tools (from the .debs the image carries), then
//! installs kup's package, whose postinst puts kup's hook into the initrds with initramfs-tools
//! even though dracut-core stays installed; a kernel package install runs initramfs-tools' hook
//! before kup's; `kupctl update` switches to that kernel, booting an initrd initramfs-tools made,
//! and memcached comes back with its PID and every key, checked from the host; `dpkg --purge kup`
//! leaves initrds without kup's hook.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, MAJOR, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// The administrator's configuration: memcached marked, updates run by hand.
const CONFIG: &str = "[[unit]]\nname = \"memcached.service\"\n";

/// Where the payload leaves kup's package: not where the lab's install hook looks
/// (/var/lib/kup-lab/kup.deb), since kup is installed after the generator switch.
const DEFERRED_DEB: &str = "var/lib/kup-lab/deferred/kup.deb";

/// The initramfs-tools packages the image carries (build-image.sh, LOCAL_DEBS), installed from the
/// files: apt removes dracut (the two conflict); the guest has no package lists, so apt's default
/// release (trixie) is unset for this call.
const SWITCH: &str = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o APT::Default-Release= \
     /var/cache/kup-lab/debs/*.deb 2>&1 && dpkg --purge dracut 2>&1";

/// The dpkg status (`ii`, `rc`, ...) of `package` in the guest, `un` when dpkg does not know it.
fn status(lab: &Lab, package: &str) -> String {
    lab.exec(&format!(
        "dpkg-query -W -f '${{db:Status-Abbrev}}' {package} 2>/dev/null || echo un"
    ))
    .trim()
    .to_owned()
}

/// The files of the initrd of kernel `version`, as initramfs-tools lists them.
fn initrd_files(lab: &Lab, version: &str) -> Vec<String> {
    lab.exec(&format!("lsinitramfs /boot/initrd.img-{version}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// kup's files in an initrd listing: named kup*, or in 90kup/ ("lookup" is not kup).
fn kup_files(files: &[String]) -> Vec<&String> {
    files
        .iter()
        .filter(|f| f.split('/').any(|c| c.starts_with("kup") || c == "90kup"))
        .collect()
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn kup_updates_a_guest_whose_initrds_initramfs_tools_makes() {
    let tree = common::package_tree("itools");
    let deferred = tree.join(DEFERRED_DEB);
    std::fs::create_dir_all(deferred.parent().unwrap()).unwrap();
    std::fs::rename(tree.join("var/lib/kup-lab/kup.deb"), &deferred).unwrap();
    let lab = Lab::new("itools");
    let port = free_port();
    lab.boot_old(&tree, port);
    assert_eq!(status(&lab, "kup"), "un", "kup must not be installed yet");

    // MAJOR is not needed here: each initrd initramfs-tools makes costs ~30 s under TCG.
    lab.exec(&format!("dpkg --purge linux-image-{MAJOR} >/dev/null 2>&1"));

    // Switch the generator. initramfs-tools' trigger makes the newest kernel's initrd (NEW); OLD
    // keeps the image's dracut initrd (with kup's module, the image's dracut configuration).
    let switch = lab.exec(SWITCH);
    assert!(switch.contains("Removing dracut"), "{switch}");
    assert!(
        switch.contains(&format!(
            "update-initramfs: Generating /boot/initrd.img-{NEW}"
        )),
        "{switch}"
    );
    assert_eq!(status(&lab, "initramfs-tools"), "ii");
    assert_eq!(status(&lab, "dracut"), "un");
    // What makes the generator's detection matter: /usr/bin/dracut is still there.
    assert_eq!(status(&lab, "dracut-core"), "ii");
    assert_eq!(lab.exec("command -v dracut"), "/usr/bin/dracut");
    assert!(kup_files(&initrd_files(&lab, NEW)).is_empty());

    // kup's package: its postinst puts the hook into NEW's initrd, with initramfs-tools.
    let install = lab.exec(&format!("dpkg -i /{DEFERRED_DEB} 2>&1"));
    assert!(
        install.contains(&format!(
            "{NEW}  /boot/initrd.img-{NEW}  rebuilt with kup's hook (update-initramfs -u -k {NEW})"
        )),
        "{install}"
    );
    assert!(
        install.contains(&format!("{OLD}  /boot/initrd.img-{OLD}  has kup's hook")),
        "{install}"
    );
    assert_eq!(status(&lab, "kup"), "ii");

    // A kernel package install (NEW, purged first, then `dpkg -i` as apt would): initramfs-tools'
    // hook makes the initrd, with kup's hook already in it, then kup's hook stages the kernel.
    let deb = lab.exec(&common::repack_kernel(NEW));
    lab.exec(&format!("dpkg --purge linux-image-{NEW} >/dev/null 2>&1"));
    assert_eq!(
        lab.exec(&format!("ls /boot/*{NEW}* 2>/dev/null || true")),
        "",
        "linux-image-{NEW} left files in /boot"
    );
    let install = lab.exec(&format!("dpkg -i {deb} 2>&1"));
    let made = install
        .find(&format!(
            "update-initramfs: Generating /boot/initrd.img-{NEW}"
        ))
        .unwrap_or_else(|| panic!("initramfs-tools' kernel hook did not run:\n{install}"));
    let staged = install
        .find(&format!("kupctl: kernel {NEW} staged"))
        .unwrap_or_else(|| panic!("kup's kernel hook did not stage {NEW}:\n{install}"));
    assert!(made < staged, "kup's hook ran first:\n{install}");
    assert!(
        !install.contains("lacked kup's hook"),
        "initramfs-tools made the initrd without kup's hook:\n{install}"
    );
    assert!(
        !install.contains("dracut: Generating"),
        "dracut's kernel hook ran:\n{install}"
    );

    // NEW's initrd is initramfs-tools' (its configuration, init-bottom scripts, no dracut) with
    // kup's hook and boot script.
    let files = initrd_files(&lab, NEW);
    for want in [
        "conf/initramfs.conf",
        "scripts/init-bottom/kup",
        "scripts/kup-handoff.sh",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "the initrd of {NEW} lacks {want}: {files:?}"
        );
    }
    let dracut: Vec<_> = files.iter().filter(|f| f.contains("dracut")).collect();
    assert!(
        dracut.is_empty(),
        "dracut's files in the initrd: {dracut:?}"
    );
    let initrds = lab.exec("kupctl initrds");
    assert!(
        initrds.contains(&format!("{NEW}  /boot/initrd.img-{NEW}  has kup's hook")),
        "{initrds}"
    );

    // The update.
    lab.exec(&format!("printf '{CONFIG}' > /etc/kup/kup.toml"));
    memcached::load(port, KEYS).expect("load memcached");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    lab.begin_switch("kupctl update");
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, NEW);
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "the update");

    // The boot ran initramfs-tools' init with kup's init-bottom script: its handoff message is in
    // the kernel log (dracut's would come from systemd in the initrd, which then switches root).
    let cmdline = lab.exec("cat /proc/cmdline");
    let id = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kup.handoff="))
        .unwrap_or_else(|| panic!("no kup.handoff= in {cmdline}"));
    // journald takes the "kup:" of a line written to /dev/kmsg as its syslog identifier.
    let kernel_log = lab.exec("journalctl -b -k -t kup -o cat --no-pager");
    assert!(
        kernel_log.contains(&format!("handoff {id} pending")),
        "no handoff message from init-bottom/kup in the kernel log:\n{kernel_log}"
    );
    let switched = lab.exec("journalctl -b -o cat --no-pager | grep -c 'Switching root' || true");
    assert_eq!(switched, "0", "this boot's initrd ran systemd (dracut)");
    assert_eq!(
        lab.exec("test -e /run/kup/refused && cat /run/kup/refused || echo none"),
        "none"
    );

    // Purge: the postrm rebuilds every initrd that carries kup's hook (NEW's, OLD's dracut one),
    // with initramfs-tools, and kup's hook is gone from them.
    let purge = lab.exec("dpkg --purge kup 2>&1");
    for version in [OLD, NEW] {
        assert!(
            purge.contains(&format!(
                "kup: rebuilding the initrd of {version} (without kup's early-boot hook)"
            )),
            "{purge}"
        );
        let files = initrd_files(&lab, version);
        assert!(
            files.iter().any(|f| f == "conf/initramfs.conf"),
            "the initrd of {version} is not initramfs-tools' after the purge: {files:?}"
        );
        let kup = kup_files(&files);
        assert!(
            kup.is_empty(),
            "the initrd of {version} still carries kup: {kup:?}"
        );
    }
    let left = lab.exec(
        "ls -d /usr/share/initramfs-tools/hooks/kup /usr/share/initramfs-tools/scripts/init-bottom/kup 2>/dev/null || true",
    );
    assert!(left.is_empty(), "{left}");
}
