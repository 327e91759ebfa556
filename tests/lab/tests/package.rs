//! Lab acceptance test of kup as a Debian package: installed with dpkg on a guest without kup, a
//! kernel package installed with `dpkg -i` is staged by kup's /etc/kernel/postinst.d hook and the
//! update runs from kup-update.timer, memcached keeps every key across it; the D-Bus interface
//! and its polkit refusal, the man pages; then `dpkg --purge` leaves nothing of kup behind, not
//! even in the regenerated initrds. Checked from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, NEW, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// What an administrator writes: memcached marked, updates in kup-update.timer's window.
const CONFIG: &str = "[update]\nauto = \"timer\"\n\n[[unit]]\nname = \"memcached.service\"\n";

/// The maintenance window of this test: a few seconds after the kernel install starts the timer.
const WINDOW: &str = "[Timer]\nOnCalendar=\nOnActiveSec=3s\nAccuracySec=1s\n";

/// The file list of every initrd in /boot, each after a `== PATH` line (dracut's zstd cpio, read
/// with the tools the image has, so it works with kup purged).
const LIST_INITRDS: &str = "for i in /boot/initrd.img-*; do echo \"== $i\"; \
     /usr/lib/dracut/skipcpio $i | zstd -dcq | cpio -it --quiet; done";

/// (initrd, file list) pairs of `LIST_INITRDS` output.
fn initrds(listing: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in listing.lines() {
        if let Some(path) = line.strip_prefix("== ") {
            out.push((path.to_owned(), Vec::new()));
        } else if let Some((_, files)) = out.last_mut() {
            files.push(line.to_owned());
        }
    }
    out
}

/// The methods of interface org.kup.Manager1 in `busctl introspect` output: (name, signature,
/// result), sorted.
fn manager_methods(introspect: &str) -> Vec<(String, String, String)> {
    let mut methods = Vec::new();
    let mut inside = false;
    for line in introspect.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.as_slice() {
            [name, "interface", ..] => inside = *name == "org.kup.Manager1",
            [name, "method", sig, result, ..] if inside => methods.push((
                name.trim_start_matches('.').to_owned(),
                (*sig).to_owned(),
                (*result).to_owned(),
            )),
            _ => {}
        }
    }
    methods.sort();
    methods
}

/// Files of kup an installed and used system has (after an update: CRIU's logs in /var/log/kup);
/// none may remain after the purge.
const KUP_PATHS: &[&str] = &[
    "/usr/sbin/kupd",
    "/usr/bin/kupctl",
    "/usr/lib/kup",
    "/usr/lib/systemd/system/kupd.service",
    "/usr/lib/systemd/system/kup-update.service",
    "/usr/lib/systemd/system/kup-update.timer",
    "/usr/lib/systemd/system/kup-restore.target",
    "/usr/lib/systemd/system/kup-restore-finish.service",
    "/usr/lib/systemd/system/kup-netlock.service",
    "/usr/lib/systemd/system/kup-watchdog.service",
    "/usr/lib/systemd/system/kup-luo.service",
    "/usr/lib/systemd/system-generators/kup-generator",
    "/usr/lib/dracut/modules.d/90kup",
    "/usr/lib/dracut/dracut.conf.d/50-kup.conf",
    "/usr/share/initramfs-tools/hooks/kup",
    "/usr/share/initramfs-tools/scripts/init-bottom/kup",
    "/usr/lib/kernel/install.d/92-kup.install",
    "/etc/kernel/postinst.d/zz-kup",
    "/etc/kernel/postrm.d/zz-kup",
    "/usr/share/dbus-1/system.d/org.kup.Manager1.conf",
    "/usr/share/dbus-1/system-services/org.kup.Manager1.service",
    "/usr/share/dbus-1/interfaces/org.kup.Manager1.xml",
    "/usr/share/polkit-1/actions/org.kup.policy",
    "/usr/lib/tmpfiles.d/kup.conf",
    "/usr/share/man/man8/kupctl.8.gz",
    "/usr/share/man/man5/kup.toml.5.gz",
    "/etc/kup",
    "/var/lib/kup",
    "/var/log/kup",
    "/run/kup",
];

/// Every path on the guest's root filesystem and in /run whose name says kup, less the lab's own
/// (kup-lab*, its payload disk kup-payload, its ESP disk kup-esp / KUP-ESP), man-db's cache of rendered pages (/var/cache/man,
/// man-db's to prune), names that merely contain the letters (backup, lookup) and the random suffix of
/// systemd's private tmp directories (systemd-private-…-logind.service-F10kUP was one).
const FIND_KUP: &str = "find / /run -xdev \\( -path /proc -o -path /sys -o -path /usr/lib/modules -o -path /var/cache/man \\) \
     -prune -o -iname '*kup*' -print | grep -v -e kup-lab -e kup-payload -e kup-esp -e KUP-ESP | awk -F/ '{ n = tolower($NF); if (n ~ /^systemd-private-/) sub(/-[a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9]$/, \"\", n); \
     if (n ~ /kup/ && n !~ /backup|lookup/) print }' | sort -u";

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn the_package_installs_updates_through_the_kernel_hook_and_purges_clean() {
    let tree = common::package_tree("package");
    let lab = Lab::new("package");
    let port = free_port();
    lab.boot_old(&tree, port);
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

    // The D-Bus interface is the documented one (docs/DBUS.md), and polkit refuses an
    // unprivileged caller.
    let introspect = lab.exec("busctl introspect --no-pager org.kup.Manager1 /org/kup/Manager1");
    let expected: Vec<(String, String, String)> = [
        ("CanUpdate", "s", "bss"),
        ("DryRun", "s", "s"),
        ("Status", "-", "s"),
        ("Units", "-", "s"),
        ("Update", "sa{sv}", "o"),
    ]
    .iter()
    .map(|(n, s, r)| ((*n).to_owned(), (*s).to_owned(), (*r).to_owned()))
    .collect();
    assert_eq!(manager_methods(&introspect), expected, "{introspect}");
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

    // A new kernel package: NEW, purged first so that `dpkg -i` installs it as new (preinst
    // install, postinst configure, the hooks in /etc/kernel/postinst.d), as apt does.
    let deb = lab.exec(&common::repack_kernel(NEW));
    let postinst = lab.exec(&format!("dpkg-deb -I {deb} postinst"));
    assert!(
        postinst.contains("linux-run-hooks image postinst"),
        "the repacked package lacks the kernel's postinst: {postinst}"
    );
    lab.exec(&format!("dpkg --purge linux-image-{NEW} >/dev/null 2>&1"));
    assert!(
        lab.exec(&format!(
            "ls -d /boot/vmlinuz-{NEW} /boot/initrd.img-{NEW} /usr/lib/modules/{NEW} 2>/dev/null || true"
        ))
        .is_empty(),
        "linux-image-{NEW} left files behind"
    );
    // dpkg -i runs the kernel's postinst: the initrd generator's hook (dracut), then kup's.
    let install = lab.exec(&format!("dpkg -i {deb} 2>&1"));
    let dracut = install
        .find(&format!("dracut: Generating /boot/initrd.img-{NEW}"))
        .unwrap_or_else(|| panic!("dracut's kernel hook did not run:\n{install}"));
    let staged = install
        .find(&format!("kupctl: kernel {NEW} staged"))
        .unwrap_or_else(|| panic!("kup's kernel hook did not stage {NEW}:\n{install}"));
    assert!(
        dracut < staged,
        "kup's hook ran before dracut's:\n{install}"
    );
    assert!(install[staged..].contains("kup-update.timer"), "{install}");
    // kup-update.service fires from the timer, waits for dpkg, and the machine switches kernel.
    let up = lab.ok(&["wait", "--timeout", "600"]);
    let (kernel, _) = up_line(&up);
    assert_eq!(kernel, NEW);
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "the update");
    let journal = lab.exec("journalctl -b -1 -u kup-update.timer -u kup-update.service --no-pager");
    assert!(
        journal.contains("kup-update.timer") && journal.contains(NEW),
        "kup-update.service did not run from its timer:\n{journal}"
    );
    // kupd's per-unit records carry the unit and the phase as journal fields.
    let dump = lab.exec(
        "journalctl -b -1 -u kupd KUP_PHASE=dump UNIT=memcached.service -o verbose --no-pager",
    );
    assert!(
        dump.contains("final dump of memcached.service")
            && dump.contains("KUP_UPDATE_ID=")
            && dump.contains(&format!("KUP_TARGET={NEW}")),
        "{dump}"
    );

    // Purge: nothing of kup remains, and the regenerated initrds no longer carry its hook. The
    // lab image's own dracut configuration asks for the kup module; a stock machine's does not.
    // The timer's window is the administrator's own file, which dpkg never removes.
    for path in KUP_PATHS {
        let (code, _, _) = lab.try_exec(&format!("test -e {path}"));
        assert_eq!(code, 0, "{path} is missing before the purge");
    }
    let before = initrds(&lab.exec(LIST_INITRDS));
    assert_eq!(before.len(), 3, "{before:?}");
    for (initrd, files) in &before {
        assert!(
            files.iter().any(|f| f.ends_with("kup-handoff.sh")),
            "{initrd} lacks kup's hook before the purge"
        );
    }
    // The test's unprivileged user goes too.
    lab.exec(
        "sed -i '/kup/d' /etc/dracut.conf.d/10-kup-lab.conf && \
         rm -r /etc/systemd/system/kup-update.timer.d && systemctl daemon-reload && userdel -r kupuser 2>/dev/null",
    );
    let purge = lab.exec("dpkg --purge kup 2>&1");
    assert!(purge.contains("rebuilding the initrd"), "{purge}");
    let status = lab.exec("dpkg-query -W -f '${Status}' kup 2>/dev/null || echo unknown");
    assert!(
        status == "unknown" || status.ends_with(" not-installed"),
        "dpkg still knows kup: {status}"
    );
    for path in KUP_PATHS {
        let (code, _, _) = lab.try_exec(&format!("test ! -e {path}"));
        assert_eq!(code, 0, "{path} remains after dpkg --purge kup");
    }
    let left = lab.exec(FIND_KUP);
    assert!(left.is_empty(), "left after dpkg --purge kup:\n{left}");
    let units = lab.exec("systemctl list-unit-files 'kup*' --no-legend | grep -v kup-lab || true");
    assert!(units.is_empty(), "unit files left: {units}");
    let after = initrds(&lab.exec(LIST_INITRDS));
    assert_eq!(after.len(), 3, "{after:?}");
    for (initrd, files) in &after {
        assert!(
            files.iter().any(|f| f == "init"),
            "{initrd} could not be read: {files:?}"
        );
        // kup's files are named kup*, in 90kup/ or under a kup/ directory ("lookup" is not kup).
        let kup: Vec<_> = files
            .iter()
            .filter(|f| f.split('/').any(|c| c.starts_with("kup") || c == "90kup"))
            .collect();
        assert!(kup.is_empty(), "{initrd} still carries kup: {kup:?}");
    }
}
