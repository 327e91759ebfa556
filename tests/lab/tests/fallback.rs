//! Lab acceptance tests of fallback (a), the restore fails on the new kernel: the new kernel sends
//! every unit back to the kernel it came from, which restores them there; the administrator finds
//! the old kernel running, memcached with the same PID and every key (checked from the host, on a
//! connection opened before the update), and `kupctl status` saying what failed on the new kernel.
//! One row per injected fault (docs/RELIABILITY.md).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Instant;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// memcached marked with a health command that fails on the new kernel only (a service that is
/// not healthy there), restored lazily.
fn unhealthy_on_new() -> String {
    format!(
        "[update]\nrestore = \"lazy\"\ngrace = 3\n\n[[unit]]\nname = \"memcached.service\"\nhealth = \"test \\\"$(uname -r)\\\" != {NEW} || {{ echo unhealthy on {NEW}; exit 1; }}\"\n"
    )
}

/// memcached marked, restored eagerly, with a health command that passes everywhere.
const EAGER: &str = "[update]\nrestore = \"eager\"\ngrace = 3\n\n[[unit]]\nname = \"memcached.service\"\nhealth = \"printf 'stats\\\\r\\\\nquit\\\\r\\\\n' | nc -q1 127.0.0.1 11211 | grep -q curr_items\"\n";

/// Runs an update to NEW that must fail there and come back to OLD; checks what the administrator
/// finds. `why` is a piece of the reason kup must report for the failure on NEW.
fn falls_back(lab: &Lab, port: u16, config: &str, cmd: &str, why: &str) {
    lab.exec(&format!("cat > /etc/kup/kup.toml <<'EOF'\n{config}EOF"));
    assert_eq!(lab.exec("uname -r"), OLD);
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");
    assert!(kept.get_matches(3).unwrap());
    let t0 = Instant::now();
    lab.begin_switch(cmd);
    // Two kernel switches: to NEW, which fails and falls back, then to OLD.
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "600"]));
    eprintln!(
        "{cmd}: back at multi-user on {kernel} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(kernel, OLD, "the guest fell back to the previous kernel");
    // The boot before this one was NEW, and it failed the way the test made it fail.
    let prev = lab.exec("journalctl -b -1 -k -o cat --no-pager | grep -m1 'Linux version' || true");
    assert!(prev.contains(NEW), "the previous boot ran {NEW}: {prev}");
    let finish = lab.exec("journalctl -b -1 -u kup-restore-finish -o cat --no-pager");
    eprintln!("on {NEW}:\n{finish}");
    assert!(finish.contains("failed on this kernel"), "{finish}");
    assert!(finish.contains(why), "{finish}");
    assert!(
        finish.contains(&format!("falling back to {OLD}")),
        "{finish}"
    );
    let phase = lab.exec("journalctl -b -1 KUP_PHASE=fallback -o cat --no-pager");
    assert!(
        phase.contains(why),
        "journal records with KUP_PHASE=fallback: {phase}"
    );

    // The service, as the same unit and process, with every key, on the same connection.
    common::assert_memcached_kept(lab, port, &pid, KEYS, "both switches");
    kept.assert_answers(3, "the fallback");
    kept.assert_answers(KEYS - 1, "the fallback");

    // What kupctl says: the fallback, the kernel that failed and why.
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"fell-back\""), "{status}");
    assert!(
        status.contains(&format!("\"kernel\": \"{NEW}\"")),
        "{status}"
    );
    assert!(status.contains(why), "{status}");
    let text = lab.exec("kupctl status");
    assert!(text.contains(&format!("fell-back on {OLD}")), "{text}");
    // The fallback handoff is finished: nothing pending, images released, no drop-ins left.
    assert_eq!(
        lab.exec("test -e /run/kup/pending && echo pending || echo none"),
        "none"
    );
    assert_eq!(
        lab.exec("for i in $(seq 120); do [ -z \"$(ls -A /var/lib/kup/images)\" ] && break; sleep 0.5; done; ls -A /var/lib/kup/images"),
        "",
        "every image is released once the fallback is restored"
    );
    assert_eq!(
        lab.exec("systemctl show -p DropInPaths --value memcached"),
        ""
    );
    assert_eq!(lab.exec("nft list tables | grep -c kup_ || true"), "0");
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn a_restore_that_fails_on_the_new_kernel_falls_back_to_the_previous_one() {
    let tree = common::install_tree("fallback", EAGER);
    let lab = Lab::new("fallback");
    let port = free_port();
    lab.boot_old(&tree, port);
    memcached::load(port, KEYS).expect("load memcached from the host");
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));

    // Row "health check fails": memcached is restored on NEW, lazily, but its health command fails
    // there; it is checkpointed again on NEW (every page in first) and restored on OLD.
    falls_back(
        &lab,
        port,
        &unhealthy_on_new(),
        &format!("kupctl update --kernel {NEW}"),
        &format!("unhealthy on {NEW}"),
    );
    // Row "CRIU restore fails": a failpoint makes memcached's restore fail on NEW; it goes back
    // to OLD from its images, untouched since OLD.
    falls_back(
        &lab,
        port,
        EAGER,
        &format!("kupctl update --kernel {NEW} --append kup.failpoints=restore-exec=return"),
        "failpoint restore-exec",
    );
    // Row "PID already taken": on NEW, a process gets memcached's PID before its restore; kup's
    // own check refuses to restore onto it.
    falls_back(
        &lab,
        port,
        EAGER,
        &format!("kupctl update --kernel {NEW} --append kup.failpoints=pid-taken=return"),
        "that memcached.service needs is taken by",
    );
    let cmdline = lab.exec("cat /proc/cmdline");
    assert!(
        !cmdline.contains("kup.failpoints"),
        "the fallback boots the previous kernel with its own command line: {cmdline}"
    );
}

/// Waits until memcached is no longer running in the guest and the handoff lists it as dumped
/// (in the manifest's second copy: the test damages the first).
fn wait_dumped(lab: &Lab) {
    let state = lab.exec(
        "for i in $(seq 600); do grep -q '\"state\": \"dumped\"' /var/lib/kup/handoff/manifest.copy.json 2>/dev/null && \
         [ \"$(systemctl show -p MainPID --value memcached)\" = 0 ] && echo dumped && exit 0; sleep 0.5; done; echo still-running",
    );
    assert_eq!(state, "dumped");
}

/// After a boot kup did not make: memcached is back as before, from the images, and kupctl says
/// the handoff was resumed.
fn check_resumed(lab: &Lab, port: u16, pid: &str, kept: &mut memcached::Kept) {
    assert_eq!(lab.exec("uname -r"), OLD);
    common::assert_memcached_kept(lab, port, pid, KEYS, "the unplanned boot");
    kept.assert_answers(5, "the unplanned boot");
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"resumed\""), "{status}");
    assert!(status.contains("did not finish"), "{status}");
    let early =
        lab.exec("journalctl -b -o cat --no-pager | grep 'kup: unfinished handoff' || true");
    assert!(
        early.contains("restoring it here"),
        "the early boot says why it restores: {early}"
    );
    assert_eq!(
        lab.exec("test -e /var/lib/kup/handoff && echo unfinished || echo finished"),
        "finished"
    );
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn a_boot_kup_did_not_make_restores_the_unfinished_handoff() {
    // The memory in FOAM: what a power cut leaves must restore from it, and a damaged FOAM file
    // must fail the image check.
    let config = EAGER.replace("grace = 3\n", "grace = 3\nstore = \"foam\"\n");
    assert!(config.contains("store = \"foam\""));
    let tree = common::install_tree("resume", &config);
    let lab = Lab::new("resume");
    let port = free_port();
    lab.boot_old(&tree, port);
    memcached::load(port, KEYS).expect("load memcached from the host");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");

    // Row "power cut right after the final dump": on NEW (reached by an ordinary update that arms a
    // failpoint holding the next update just before its switch), an update back to OLD dumps
    // memcached (and a failpoint damages manifest.json after it was written); then the machine is
    // reset with no shutdown and no sync (sysrq b, as a power cut).
    // The firmware boots the default kernel (OLD, the lab's -kernel), whose early boot finds the
    // unfinished handoff and restores memcached there.
    lab.begin_switch(&format!(
        "kupctl update --kernel {NEW} --append 'kup.failpoints=images-corrupt=1*return;manifest-corrupt=return;switch=sleep(600000)'"
    ));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, NEW);
    assert_eq!(lab.exec("systemctl show -p MainPID --value memcached"), pid);

    // Row "image corrupted before the switch": the first update from NEW finds a page of
    // memcached's fresh checkpoint lost from FOAM (a failpoint punches it out) while CRIU still
    // holds the tree; the dump fails, CRIU resumes memcached, and nothing is switched.
    let (code, out, err) = lab.try_exec(&format!("kupctl update --kernel {OLD}"));
    eprint!("{out}{err}");
    assert!(code != 0 && code != 255, "the update must fail: {out}{err}");
    assert!(err.contains("images are not whole"), "{err}");
    assert!(
        err.contains("FOAM store") && err.contains("are listed but not stored"),
        "{err}"
    );
    assert!(err.contains("keeps running"), "{err}");
    assert_eq!(lab.exec("uname -r"), NEW);
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value memcached"),
        pid,
        "memcached was never stopped"
    );
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));
    assert!(
        kept.get_matches(4).unwrap(),
        "the kept connection still answers"
    );
    assert_eq!(
        lab.exec("test -e /var/lib/kup/handoff && echo left || echo none"),
        "none"
    );
    lab.exec(&format!(
        "systemd-run --unit kup-test-update --no-block kupctl update --kernel {OLD}"
    ));
    wait_dumped(&lab);
    let journal = lab.exec(
        "journalctl -b -u kupd -o cat --no-pager | grep -E 'failpoints armed|final dump' || true",
    );
    assert!(
        journal.contains("failpoints armed: images-corrupt, manifest-corrupt, switch"),
        "{journal}"
    );
    // In the background: the agent's answer must leave before the machine goes.
    lab.exec("nohup sh -c 'sleep 1; echo b > /proc/sysrq-trigger' >/dev/null 2>&1 &");
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, OLD);
    check_resumed(&lab, port, &pid, &mut kept);
    // Row "manifest corrupted": the failpoint damaged manifest.json after the final dump; the
    // restore read the second copy.
    let copy =
        lab.exec("journalctl -b -o cat --no-pager | grep -m1 'using its second copy' || true");
    assert!(copy.contains("manifest.json is corrupt"), "{copy}");

    // Row "the new kernel panics": a failpoint crashes NEW while it restores memcached; kup gave NEW
    // panic=10, so it reboots, into OLD, which restores the unfinished handoff.
    lab.begin_switch(&format!(
        "kupctl update --kernel {NEW} --append kup.failpoints=restore-panic=return"
    ));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "500", "--crash-ok"]));
    assert_eq!(kernel, OLD);
    let console = lab.ok(&["console"]);
    assert!(
        console.contains("Kernel panic - not syncing: sysrq triggered crash"),
        "NEW panicked"
    );
    assert!(
        console.contains(&format!("Linux version {NEW}")) && console.contains(" panic=10"),
        "NEW booted with panic=10"
    );
    check_resumed(&lab, port, &pid, &mut kept);
}
