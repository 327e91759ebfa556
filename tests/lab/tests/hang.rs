//! Lab acceptance test of the fault row "new kernel hangs" (docs/RELIABILITY.md): the lab guest has a
//! hardware watchdog (QEMU's i6300esb, reset on expiry) and boots with `watchdog.stop_on_reboot=0`;
//! kup has systemd arm the watchdog for its kexec. A new kernel whose boot never gets anywhere stops
//! feeding it, the machine resets, the firmware boots the default kernel (the lab's -kernel, OLD), and
//! its early boot restores the unfinished handoff. The restoring boot then disarms the watchdog once
//! it has decided, so the machine stays up. Every check on the service is made from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Instant;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// memcached marked, restored eagerly; the new kernel has 60 s to take the watchdog over.
const CONFIG: &str = "[update]\nrestore = \"eager\"\ngrace = 2\nkexec_watchdog = 60\n\n[[unit]]\nname = \"memcached.service\"\n";

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn a_new_kernel_that_hangs_is_reset_into_the_previous_one_with_every_service() {
    let tree = common::install_tree("hang", CONFIG);
    let lab = Lab::new("hang");
    let port = free_port();
    lab.boot_old(&tree, port);
    memcached::load(port, KEYS).expect("load memcached from the host");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");
    assert_eq!(
        lab.exec("cat /sys/module/watchdog/parameters/stop_on_reboot; test -c /dev/watchdog0 && echo device"),
        "0\ndevice",
        "the lab machine is set up for hang protection"
    );

    // The new kernel never comes up: its root filesystem does not exist (the later root= on its
    // command line wins), so its initrd waits for it, forever as far as the watchdog can tell.
    let t0 = Instant::now();
    lab.begin_switch(&format!(
        "kupctl update --kernel {NEW} --append root=LABEL=kup-no-such-root"
    ));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "600"]));
    eprintln!(
        "back at multi-user on {kernel} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(kernel, OLD, "the watchdog reset the machine into OLD");
    let console = lab.ok(&["console"]);
    let new_at = console
        .find(&format!("Linux version {NEW}"))
        .expect("NEW booted");
    assert!(
        console[new_at..].contains("kup-no-such-root"),
        "NEW waited for its missing root"
    );
    assert!(
        console[new_at..].contains(&format!("Linux version {OLD}")),
        "then OLD booted"
    );
    let armed =
        lab.exec("journalctl -b -1 -u kupd -o cat --no-pager | grep -m1 'watchdog' || true");
    assert!(
        armed.contains("the hardware watchdog is armed for the switch: the new kernel has 60 s"),
        "the updating boot armed the watchdog: {armed}"
    );

    // memcached is back from the images, as the same unit and process, on the same connection.
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "the hang and the reset");
    kept.assert_answers(7, "the hang and the reset");
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"resumed\""), "{status}");
    assert!(status.contains("watchdog reset"), "{status}");

    // The restoring boot took the watchdog over and disarmed it once it had decided: the machine
    // stays up well past the watchdog's timeout (the driver's 30 s).
    let fed = lab.exec(
        "for i in $(seq 60); do systemctl is-active -q kup-watchdog || break; sleep 1; done; journalctl -b -u kup-watchdog -o cat --no-pager",
    );
    assert!(fed.contains("feeding /dev/watchdog0"), "{fed}");
    assert!(fed.contains("/dev/watchdog0 disarmed"), "{fed}");
    let before = lab.exec("cat /proc/sys/kernel/random/boot_id");
    lab.exec("sleep 45");
    assert_eq!(
        lab.exec("cat /proc/sys/kernel/random/boot_id"),
        before,
        "no second reset"
    );
}
