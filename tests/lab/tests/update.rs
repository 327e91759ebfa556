//! Lab acceptance tests of the first real kernel update (disk backend): marked units come back on the
//! new kernel with every key, the same PIDs and as the same units, checked from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Lab, MAJOR, NEW, free_port, memcached, up_line};

/// memcached marked, with pre-copy, restored lazily: every round writes its pages in place into
/// FOAM (`store = "auto"` picks it for a lazy restore), the final dump only what changed since the
/// rounds, memcached resumes before its memory is back, and kup's lazy-pages server brings each
/// page in from its address in FOAM (on fault, then in the background).
const LAZY: &str =
    "[update]\nprecopy_rounds = 3\nrestore = \"lazy\"\n\n[[unit]]\nname = \"memcached.service\"\n";
/// memcached marked, with pre-copy into FOAM (the final dump writes only what changed since) and an
/// eager restore: the new kernel copies the pages from FOAM into CRIU's pages files first.
const PRECOPY: &str = "[update]\nprecopy_rounds = 3\nrestore = \"eager\"\nstore = \"foam\"\n\n[[unit]]\nname = \"memcached.service\"\n";
/// Keys loaded into memcached: ~280 MB of values of 100..5000 bytes.
const KEYS: u32 = 110_000;

/// Everything a user checks after an update, from the host.
fn check_restored(lab: &Lab, port: u16, kernel: &str, pid_before: &str, config: &str) {
    assert_eq!(lab.exec("uname -r"), kernel);
    assert_eq!(lab.exec("systemctl is-active memcached"), "active");
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value memcached"),
        pid_before,
        "memcached keeps its PID"
    );
    let t = Instant::now();
    let (good, bad) = memcached::verify(port, KEYS).expect("read memcached from the host");
    eprintln!(
        "memcached: {good} keys identical, {bad} missing or different ({:.1} s to read)",
        t.elapsed().as_secs_f64()
    );
    assert_eq!((good, bad), (KEYS, 0));
    // Restored before normal services: the unit was active before multi-user.target was reached.
    let active: u64 = lab
        .exec("systemctl show -p ActiveEnterTimestampMonotonic --value memcached")
        .parse()
        .unwrap();
    let multi: u64 = lab
        .exec("systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target")
        .parse()
        .unwrap();
    assert!(
        active > 0 && active <= multi,
        "memcached active at {active} µs, multi-user.target at {multi} µs"
    );
    let journal = lab.exec("journalctl -b -u memcached -o cat --no-pager");
    assert!(
        journal.contains(&format!(
            "kup: memcached.service restored as PID {pid_before}"
        )),
        "{journal}"
    );
    // Lazy restore: every page came in from the images, which are then released (their CRIU logs kept).
    if config == LAZY {
        let lazy = lab.exec(
        "for i in $(seq 120); do s=$(cat /run/kup/lazy/memcached.service 2>/dev/null); [ -n \"$s\" ] && break; sleep 0.5; done; echo $s",
    );
        assert_eq!(lazy, "complete", "lazy restore state");
        eprintln!(
            "{}",
            lab.exec("journalctl -b -u memcached -o short-monotonic --no-pager | grep -E 'every page|lazy-pages' || true")
        );
    }
    assert_eq!(
        lab.exec("for i in $(seq 20); do [ -e /var/lib/kup/images/memcached.service ] || break; sleep 0.5; done; test -e /var/lib/kup/images/memcached.service && echo kept || echo released"),
        "released"
    );
    // CRIU's logs outlive the images: the restore's always, lazy-pages' when it served.
    let logs = lab.exec("ls /var/log/kup/memcached.service");
    assert!(logs.contains("restore.log"), "{logs}");
    assert_eq!(logs.contains("lazy-pages.log"), config == LAZY, "{logs}");
    // The kept connections' lock is lifted.
    assert_eq!(lab.exec("nft list tables | grep -c kup_ || true"), "0");
    // No residue: the handoff is finished, the restore drop-in is gone, the next start is a normal one.
    assert_eq!(
        lab.exec("systemctl show -p DropInPaths --value memcached"),
        ""
    );
    assert_eq!(
        lab.exec("test -e /run/kup/pending && echo pending || echo none"),
        "none"
    );
    assert_eq!(
        lab.exec("systemctl show -p Restart --value memcached"),
        "always"
    );
    // kupctl tells the administrator what happened and what it can do next.
    let status = lab.exec("kupctl status --json");
    assert!(
        status.contains(&format!("\"running_kernel\": \"{kernel}\"")),
        "{status}"
    );
    assert!(
        !status.contains("\"restored_handoff\": null"),
        "the restored handoff is reported: {status}"
    );
    let units = lab.exec("kupctl units --json");
    assert!(units.contains("\"name\": \"memcached.service\""), "{units}");
    assert!(units.contains("\"checkpointable\": true"), "{units}");
}

/// Runs one update with `cmd` in the guest and waits for the new kernel; returns (switch, outage).
fn update(lab: &Lab, port: u16, cmd: &str, kernel: &str, config: &str) {
    lab.exec(&format!("printf '%s' '{config}' > /etc/kup/kup.toml"));
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let (_, boot_before) = up_line(&format!(
        "lab: up kernel=? boot={}",
        lab.exec("cat /proc/sys/kernel/random/boot_id")
    ));
    // A client connected before the update keeps its connection: same socket, correct answers.
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");
    assert!(kept.get_matches(7).unwrap());
    let probe = memcached::Outage::start(port);
    let t0 = Instant::now();
    lab.begin_switch(cmd);
    let waited = lab.ok(&["wait", "--timeout", "400"]);
    let switch = t0.elapsed();
    let (k, boot) = up_line(&waited);
    assert_eq!(k, kernel);
    assert_ne!(boot, boot_before);
    while !memcached::answers(port) && t0.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let outage = probe.finish();
    let t_kept = Instant::now();
    kept.assert_answers(7, "the update");
    kept.assert_answers(KEYS - 1, "the update");
    eprintln!(
        "kept connection {}: answers on the new kernel ({:.1} s after the service was back)",
        kept.local_addr(),
        t_kept.elapsed().as_secs_f64()
    );
    eprintln!(
        "update to {kernel}: command -> new kernel at multi-user {:.1} s; memcached downtime seen by the host {:.1} s",
        switch.as_secs_f64(),
        outage.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
    );
    // Where the time went, as kupd logged it on the kernel it left and kup-restore on the new one.
    let dump_log = lab.exec("journalctl -b -1 -u kupd -o cat --no-pager | grep 'kup: ' || true");
    eprintln!("{dump_log}");
    assert_eq!(
        dump_log.contains("kup: pre-copy of memcached.service round 1"),
        config.contains("precopy_rounds = 3"),
        "pre-copy ran exactly when configured:\n{dump_log}"
    );
    // Every round and the final dump went into FOAM, which passed kup's image check at the dump
    // (post-dump, before the switch) and again before the restore (a failed check fails either).
    assert!(
        dump_log.contains("kup: final dump of memcached.service into FOAM"),
        "the dump went into FOAM:\n{dump_log}"
    );
    eprintln!("{}", lab.exec("journalctl -b -u memcached -o short-monotonic --no-pager | grep -E 'Starting|restored as|every page' || true"));
    check_restored(lab, port, kernel, &pid, config);
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn updates_forward_to_a_point_release_and_a_major_release_then_back_down() {
    let tree = common::install_tree("update", LAZY);
    // An administrator who is not root, granted org.kup.update by a polkit rule.
    let rules = tree.join("etc/polkit-1/rules.d");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("50-kup-test.rules"),
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.kup.update\" && subject.user == \"kupadmin\") return polkit.Result.YES;\n});\n",
    )
    .unwrap();
    let lab = Lab::new("update");
    let port = free_port();
    lab.boot_old(&tree, port);
    lab.exec("useradd -m kupadmin");
    let bytes = memcached::load_checked(port, KEYS);
    assert!(bytes >= 256 << 20);

    // 1. kupctl update to the stable point release, by a non-root user polkit grants it to.
    update(
        &lab,
        port,
        &format!("runuser -u kupadmin -- kupctl update --kernel {NEW}"),
        NEW,
        LAZY,
    );
    // 2. systemctl start kup-update: the newest installed kernel, a major release.
    update(&lab, port, "systemctl start kup-update", MAJOR, PRECOPY);
    // 3. Back down to the older kernel, by root, with an extra kernel argument: as ordinary as
    //    going forward.
    update(
        &lab,
        port,
        &format!("kupctl update --kernel {NEW} --append kup.test=back-down"),
        NEW,
        LAZY,
    );
    let cmdline = lab.exec("cat /proc/cmdline");
    assert!(cmdline.contains(" kup.test=back-down"), "{cmdline}");
    assert_eq!(
        cmdline.matches("kup.handoff=").count(),
        1,
        "one handoff id on the command line: {cmdline}"
    );
}
