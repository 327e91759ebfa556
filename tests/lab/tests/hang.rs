//! Lab acceptance test of the fault row "new kernel hangs" on the real boot path (docs/RELIABILITY.md):
//! the guest boots through UEFI firmware (OVMF) and systemd-boot, has a hardware watchdog (QEMU's
//! i6300esb, reset on expiry) and boots with `watchdog.stop_on_reboot=0`. As after a Debian kernel
//! install, the newest kernel is the boot loader's default entry. kup makes the kernel it updates from
//! the one-shot next boot and has systemd arm the watchdog for its kexec: a new kernel whose boot
//! never gets anywhere stops feeding the watchdog, the machine resets, the firmware and systemd-boot
//! boot the one-shot entry (not the default, the kernel that hung), and its early boot restores the
//! unfinished handoff. The restoring boot disarms the watchdog once it has decided. A good update
//! then clears the one-shot and, with `make_default`, makes the new kernel the default entry. Every
//! check on the service is made from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Instant;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// memcached marked, restored eagerly; the new kernel has 60 s to take the watchdog over, and once
/// blessed becomes the default entry.
const CONFIG: &str = "[update]\nrestore = \"eager\"\ngrace = 2\nkexec_watchdog = 60\nmake_default = true\n\n[[unit]]\nname = \"memcached.service\"\n";

/// systemd-boot's entry of kernel `version` in the lab image (kernel-install, entry token kup-lab).
fn entry(version: &str) -> String {
    format!("kup-lab-{version}.conf")
}

/// An EFI variable of systemd's loader interface, as text ("" when it is not set).
fn loader_var(lab: &Lab, name: &str) -> String {
    lab.exec(&format!(
        "f=/sys/firmware/efi/efivars/{name}-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f; test -e $f && cat $f | tail -c +5 | tr -d '\\000' || true"
    ))
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn a_new_kernel_that_hangs_is_reset_into_the_previous_one_with_every_service() {
    let tree = common::install_tree("hang", CONFIG);
    let lab = Lab::new("hang");
    let port = free_port();
    lab.boot_firmware(&tree, port, OLD);
    memcached::load(port, KEYS).expect("load memcached from the host");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");
    assert_eq!(
        lab.exec("cat /sys/module/watchdog/parameters/stop_on_reboot; test -c /dev/watchdog0 && echo device"),
        "0\ndevice",
        "the lab machine is set up for hang protection"
    );
    assert_eq!(loader_var(&lab, "LoaderEntrySelected"), entry(OLD));
    // As a kernel package install leaves a Debian machine: the newest kernel is the default entry.
    lab.exec(&format!("bootctl set-default {}", entry(NEW)));

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
    assert_eq!(
        kernel, OLD,
        "the watchdog reset the machine, and the firmware booted the one-shot entry, not the default"
    );
    assert_eq!(loader_var(&lab, "LoaderEntrySelected"), entry(OLD));
    assert_eq!(
        loader_var(&lab, "LoaderEntryOneShot"),
        "",
        "the one-shot was used up"
    );
    // The resumed boot was blessed, and make_default made the kernel it runs the default again.
    assert_eq!(loader_var(&lab, "LoaderEntryDefault"), entry(OLD));
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
    let switch = lab
        .exec("journalctl -b -1 -u kupd -o cat --no-pager | grep -E 'next boot|watchdog' || true");
    assert!(
        switch.contains(&format!("the firmware's next boot is {}", entry(OLD))),
        "the updating boot set the one-shot entry: {switch}"
    );
    assert!(
        switch.contains("the hardware watchdog is armed for the switch: the new kernel has 60 s"),
        "the updating boot armed the watchdog: {switch}"
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

    // A good update: blessed on NEW, the one-shot it set is cleared and NEW becomes the default
    // entry (make_default).
    lab.begin_switch(&format!("kupctl update --kernel {NEW}"));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, NEW);
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "the update to NEW");
    kept.assert_answers(8, "the update to NEW");
    // kup-restore-finish runs before multi-user.target, where `lab wait` returned.
    let blessed = lab.exec("journalctl -b -u kup-restore-finish -o cat --no-pager");
    assert!(
        blessed.contains(&format!(
            "the one-shot next boot is cleared and {} ({NEW}) is the default entry",
            entry(NEW)
        )),
        "{blessed}"
    );
    assert_eq!(loader_var(&lab, "LoaderEntryOneShot"), "");
    assert_eq!(loader_var(&lab, "LoaderEntryDefault"), entry(NEW));
}
