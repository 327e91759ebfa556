//! Lab acceptance test of kup as a Debian package: installed with dpkg on a guest without kup, a
//! kernel package installed with `dpkg -i` is staged by kup's /etc/kernel/postinst.d hook and the
//! update runs from kup-update.timer, memcached keeps every key across it; the D-Bus interface
//! and its polkit refusal, the man pages; then `dpkg --purge` leaves nothing of kup behind, not
//! even in the regenerated initrds. Checked from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// What an administrator writes: memcached marked, updates in kup-update.timer's window.
const CONFIG: &str = "[update]\nauto = \"timer\"\n\n[[unit]]\nname = \"memcached.service\"\n";

/// The maintenance window of this test: a few seconds after the kernel install starts the timer.
const WINDOW: &str = "[Timer]\nOnCalendar=\nOnActiveSec=3s\nAccuracySec=1s\n";

/// Rebuilds the installed package `linux-image-NEW` as a .deb from dpkg's own records (what
/// dpkg-repack does), so the test can remove it and install it again with `dpkg -i`, the kernel
/// package path of an `apt upgrade`. Uncompressed: xz under TCG would take minutes.
fn repack_kernel() -> String {
    format!(
        "set -e; p=linux-image-{NEW}; d=/var/tmp/repack; rm -rf $d; mkdir -p $d/DEBIAN; \
         dpkg-query -L $p | while read -r f; do if [ -L \"$f\" ] || [ -f \"$f\" ]; then cp -a --parents \"$f\" $d; fi; done; \
         dpkg-query -s $p | grep -v -e '^Status:' -e '^Conffiles:' > $d/DEBIAN/control; \
         for s in preinst postinst prerm postrm; do [ ! -f /var/lib/dpkg/info/$p.$s ] || cp /var/lib/dpkg/info/$p.$s $d/DEBIAN/; done; \
         dpkg-deb -Znone --root-owner-group -b $d /var/tmp/$p.deb >/dev/null; rm -rf $d; echo /var/tmp/$p.deb"
    )
}

/// Files of kup an installed system has; none may remain after the purge.
const KUP_PATHS: &[&str] = &[
    "/usr/sbin/kupd",
    "/usr/bin/kupctl",
    "/usr/lib/kup",
    "/usr/lib/systemd/system/kupd.service",
    "/usr/lib/systemd/system/kup-update.service",
    "/usr/lib/systemd/system/kup-update.timer",
    "/usr/lib/systemd/system/kup-restore.target",
    "/usr/lib/systemd/system-generators/kup-generator",
    "/usr/lib/dracut/modules.d/90kup",
    "/usr/lib/dracut/dracut.conf.d/50-kup.conf",
    "/usr/share/initramfs-tools/hooks/kup",
    "/usr/lib/kernel/install.d/92-kup.install",
    "/etc/kernel/postinst.d/zz-kup",
    "/etc/kernel/postrm.d/zz-kup",
    "/usr/share/dbus-1/system.d/org.kup.Manager1.conf",
    "/usr/share/dbus-1/system-services/org.kup.Manager1.service",
    "/usr/share/polkit-1/actions/org.kup.policy",
    "/usr/lib/tmpfiles.d/kup.conf",
    "/usr/share/man/man8/kupctl.8.gz",
    "/etc/kup",
    "/var/lib/kup",
];

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn the_package_installs_updates_through_the_kernel_hook_and_purges_clean() {
    let tree = common::package_tree("package");
    let lab = Lab::new("package");
    let port = free_port();
    lab.ok(&[
        "start",
        "--kernel",
        OLD,
        "--forward",
        &format!("{port}:11211"),
        "--payload-tree",
        tree.to_str().unwrap(),
    ]);
    assert_eq!(
        lab.exec("dpkg-query -W -f '${Status}' kup"),
        "install ok installed"
    );

    // The documentation is there and renders.
    let man = lab.exec("MANWIDTH=80 man -P cat kupctl 2>&1");
    assert!(man.contains("stage") && man.contains("update"), "{man}");
    let man = lab.exec("MANWIDTH=80 man -P cat kup.toml 2>&1");
    assert!(man.contains("auto") && man.contains("[[unit]]"), "{man}");
    assert!(lab.exec("man -w kupd").ends_with("kupd.8.gz"));

    // The D-Bus interface is the documented one, and polkit refuses an unprivileged caller.
    let introspect = lab.exec("busctl introspect --no-pager org.kup.Manager1 /org/kup/Manager1");
    for member in [".Update", ".CanUpdate", ".Status", ".Units"] {
        assert!(
            introspect.contains(member),
            "{member} missing:\n{introspect}"
        );
    }
    let (code, _, err) = lab.try_exec(
        "useradd -m kupuser && runuser -u kupuser -- busctl call org.kup.Manager1 /org/kup/Manager1 \
         org.kup.Manager1 Update 'sa{sv}' '' 0",
    );
    assert_ne!(code, 0, "an unprivileged caller must be refused");
    assert!(err.contains("not authorized"), "{err}");
    let can = lab.exec(&format!(
        "runuser -u kupuser -- busctl call org.kup.Manager1 /org/kup/Manager1 org.kup.Manager1 CanUpdate s {NEW}"
    ));
    assert!(can.starts_with("bss false"), "nothing is marked yet: {can}");

    // The administrator marks memcached and asks for updates in the maintenance window.
    lab.exec(&format!(
        "printf '{CONFIG}' > /etc/kup/kup.toml && mkdir -p /etc/systemd/system/kup-update.timer.d && \
         printf '{WINDOW}' > /etc/systemd/system/kup-update.timer.d/window.conf && systemctl daemon-reload"
    ));
    memcached::load(port, KEYS).expect("load memcached");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");

    // A kernel package arrives: dpkg -i runs its postinst, the initrd generator's hook, then kup's.
    let deb = lab.exec(&repack_kernel());
    lab.exec(&format!("dpkg -r linux-image-{NEW} >/dev/null 2>&1"));
    assert!(
        lab.exec(&format!("ls /boot/vmlinuz-{NEW} 2>/dev/null || true"))
            .is_empty()
    );
    let install = lab.exec(&format!("dpkg -i {deb} 2>&1"));
    assert!(
        install.contains(&format!("kupctl: kernel {NEW} staged")),
        "{install}"
    );
    assert!(install.contains("kup-update.timer"), "{install}");
    // kup-update.service fires from the timer, waits for dpkg, and the machine switches kernel.
    let up = lab.ok(&["wait", "--timeout", "600"]);
    let (kernel, _) = up_line(&up);
    assert_eq!(kernel, NEW);
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value memcached"),
        pid,
        "memcached is back as the same process"
    );
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));
    let journal = lab.exec("journalctl -b -1 -u kup-update.service --no-pager -o cat");
    assert!(journal.contains(NEW), "{journal}");

    // Purge: nothing of kup remains, and the regenerated initrds no longer carry its hook. The
    // lab image's own dracut configuration asks for the kup module; a stock machine's does not.
    lab.exec("sed -i '/kup/d' /etc/dracut.conf.d/10-kup-lab.conf");
    let purge = lab.exec("dpkg --purge kup 2>&1");
    assert!(purge.contains("rebuilding the initrd"), "{purge}");
    for path in KUP_PATHS {
        let (code, _, _) = lab.try_exec(&format!("test ! -e {path}"));
        assert_eq!(code, 0, "{path} remains after dpkg --purge kup");
    }
    assert!(
        lab.exec("systemctl list-unit-files 'kup*' --no-legend")
            .is_empty()
    );
    let hooks = lab.exec(
        "for i in /boot/initrd.img-*; do /usr/lib/dracut/skipcpio $i | zstd -dcq | grep -ac kup-handoff.sh || true; done",
    );
    assert!(
        hooks.lines().all(|n| n.trim() == "0"),
        "an initrd still carries kup's hook: {hooks}"
    );
}
