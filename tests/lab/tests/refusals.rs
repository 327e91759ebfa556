//! Lab acceptance tests: every failure before the kernel switch leaves the services running untouched,
//! with all their data, and tells the caller why (checked from the host).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, MAJOR, NEW, OLD, free_port, memcached};

const KEYS: u32 = 20_000;

/// memcached is marked first, so a later unit's failure must put the already-dumped memcached back.
const CONFIG: &str =
    "[[unit]]\nname = \"memcached.service\"\n\n[[unit]]\nname = \"kup-test-extsock.service\"\n";

/// A service CRIU refuses: it holds a unix socket to journald on a descriptor kup does not declare.
const EXTSOCK_UNIT: &str =
    "[Service]\nExecStart=/bin/sh -c 'sleep infinity | nc -U /run/systemd/journal/stdout'\n";

struct Case<'a> {
    name: &'a str,
    /// Shell run in the guest before the update (sets the failure up).
    setup: &'a str,
    /// The update command.
    cmd: &'a str,
    /// Fragments the error must contain.
    expect: &'a [&'a str],
    /// Shell run after, to undo the setup.
    undo: &'a str,
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn failures_before_the_switch_leave_services_running_with_their_data() {
    let tree = common::install_tree("refusals", CONFIG);
    let unit_dir = tree.join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::write(unit_dir.join("kup-test-extsock.service"), EXTSOCK_UNIT).unwrap();
    let lab = Lab::new("refusals");
    let port = free_port();
    lab.boot_old(&tree, port);
    lab.exec("systemctl daemon-reload && systemctl start kup-test-extsock && useradd -m kupuser");
    memcached::load(port, KEYS).expect("load memcached");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");

    let cases = [
        Case {
            name: "CRIU refuses a resource of the second unit; the first is restored in place",
            setup: "",
            cmd: &format!("kupctl update --kernel {NEW}"),
            expect: &[
                "checkpoint of kup-test-extsock.service failed",
                "every unit was left running",
                "External socket",
            ],
            undo: "",
        },
        Case {
            name: "kernel not installed",
            setup: "",
            cmd: "kupctl update --kernel 9.9.9-nonexistent",
            expect: &["kernel 9.9.9-nonexistent is not installed", NEW],
            undo: "",
        },
        Case {
            name: "kernel image is not a kernel",
            setup: "head -c 100000 /dev/urandom > /boot/vmlinuz-6.6.6-fake && cp /boot/initrd.img-6.12.117+deb13-cloud-amd64 /boot/initrd.img-6.6.6-fake",
            cmd: "kupctl update --kernel 6.6.6-fake",
            expect: &["/boot/vmlinuz-6.6.6-fake", "not a Linux kernel image"],
            undo: "rm -f /boot/vmlinuz-6.6.6-fake /boot/initrd.img-6.6.6-fake",
        },
        Case {
            name: "target initrd without kup's dracut module",
            setup: &format!(
                "cp /boot/initrd.img-{MAJOR} /root/initrd.saved && echo | cpio -o -H newc 2>/dev/null | gzip > /boot/initrd.img-{MAJOR}"
            ),
            cmd: &format!("kupctl update --kernel {MAJOR}"),
            expect: &[
                "lacks kup's dracut module",
                &format!("dracut -f --kver {MAJOR}"),
            ],
            undo: &format!("mv /root/initrd.saved /boot/initrd.img-{MAJOR}"),
        },
        Case {
            name: "a marked unit is not running",
            setup: "systemctl stop kup-test-extsock",
            cmd: &format!("kupctl update --kernel {NEW}"),
            expect: &[
                "kup-test-extsock.service cannot be checkpointed",
                "not running",
                "systemctl start kup-test-extsock.service",
            ],
            undo: "systemctl start kup-test-extsock",
        },
        Case {
            name: "no space for the images",
            setup: "mkdir -p /mnt/tiny && mount -t tmpfs -o size=2m tmpfs /mnt/tiny && mkdir -p /etc/kup/kup.d && printf '[update]\\nimage_dir = \"/mnt/tiny\"\\n' > /etc/kup/kup.d/90-tiny.toml",
            cmd: &format!("kupctl update --kernel {NEW}"),
            expect: &[
                "the image directory /mnt/tiny has 2 MiB free",
                "nothing was touched",
            ],
            undo: "rm /etc/kup/kup.d/90-tiny.toml && umount /mnt/tiny",
        },
        Case {
            name: "a unit in a user namespace (Debian's redis-server.service, PrivateUsers=yes)",
            setup: "mkdir -p /etc/kup/kup.d && printf '[[unit]]\\nname = \"redis-server.service\"\\n' > /etc/kup/kup.d/50-redis.toml",
            cmd: &format!("kupctl update --kernel {NEW}"),
            expect: &[
                "redis-server.service cannot be checkpointed",
                "user namespace",
                "CAP_CHECKPOINT_RESTORE",
            ],
            undo: "rm /etc/kup/kup.d/50-redis.toml",
        },
        Case {
            name: "another update is running",
            setup: "mkdir -p /run/kup && (flock -o /run/kup/update.lock sleep 120 >/dev/null 2>&1 &) && sleep 1",
            cmd: &format!("kupctl update --kernel {NEW}"),
            expect: &["another update is running"],
            undo: "pkill -x flock; true",
        },
        Case {
            name: "a user polkit does not grant org.kup.update",
            setup: "",
            cmd: &format!("runuser -u kupuser -- kupctl update --kernel {NEW}"),
            expect: &["org.kup.update"],
            undo: "",
        },
    ];
    for c in &cases {
        eprintln!("== {}", c.name);
        let ext_pid = lab.exec("systemctl show -p MainPID --value kup-test-extsock");
        if !c.setup.is_empty() {
            lab.exec(c.setup);
        }
        let (code, out, err) = lab.try_exec(c.cmd);
        let text = format!("{out}{err}");
        eprint!("{text}");
        assert_ne!(code, 0, "{}: the update was not refused", c.name);
        assert_ne!(code, 255, "{}: the guest went away", c.name);
        for e in c.expect {
            assert!(text.contains(e), "{}: {e:?} not in:\n{text}", c.name);
        }
        if !c.undo.is_empty() {
            lab.exec(c.undo);
        }
        // Still on the old kernel, every service as it was, all data there.
        assert_eq!(lab.exec("uname -r"), OLD, "{}", c.name);
        assert_eq!(
            lab.exec("systemctl is-active memcached"),
            "active",
            "{}",
            c.name
        );
        assert_eq!(
            lab.exec("systemctl show -p MainPID --value memcached"),
            pid,
            "{}: memcached keeps its PID",
            c.name
        );
        assert_eq!(
            memcached::verify(port, KEYS).unwrap(),
            (KEYS, 0),
            "{}: memcached keeps every key",
            c.name
        );
        assert_eq!(
            lab.exec("systemctl is-active kup-test-extsock"),
            "active",
            "{}",
            c.name
        );
        if !c.setup.contains("stop kup-test-extsock") {
            assert_eq!(
                lab.exec("systemctl show -p MainPID --value kup-test-extsock"),
                ext_pid,
                "{}",
                c.name
            );
        }
        assert_eq!(
            lab.exec("test -e /var/lib/kup/handoff && echo left || echo clean"),
            "clean",
            "{}: no handoff left behind",
            c.name
        );
        assert_eq!(
            lab.exec("systemctl show -p DropInPaths --value memcached"),
            "",
            "{}: no drop-in left behind",
            c.name
        );
    }
}
