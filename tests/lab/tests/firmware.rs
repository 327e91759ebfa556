//! Lab acceptance test of the firmware boot path (docs/LAB.md, `lab start --firmware`): OVMF boots
//! systemd-boot from the guest's ESP, one BLS entry per kernel, the `--kernel`'s the default. A
//! one-shot entry (`bootctl set-oneshot`) is booted by the next reboot only and then gone; the reboot
//! after it is the default entry's again: what kup's fallback relies on the firmware for.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, MAJOR, NEW, OLD, free_port, up_line};
use kup_lab::recipe::entry_id;

/// The systemd-boot loader interface's EFI variables (vendor GUID of the Boot Loader Interface).
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// A guest command printing the loader's EFI variable NAME (UTF-16 after 4 bytes of attributes) as
/// text, or `absent` (efivarfs files cannot seek: read them whole).
fn efivar(name: &str) -> String {
    format!(
        "f=/sys/firmware/efi/efivars/{name}-{LOADER_GUID}; if [ -e $f ]; then cat $f | tail -c +5 | tr -d '\\0'; else echo absent; fi"
    )
}

/// Reboots the guest through systemd (in the background, so the agent's answer leaves first) and
/// waits for the new boot; returns the kernel it runs.
fn reboot(lab: &Lab) -> String {
    lab.exec("nohup sh -c 'sleep 1; systemctl reboot' >/dev/null 2>&1 &");
    up_line(&lab.ok(&["wait", "--timeout", "400"])).0
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn the_firmware_boots_the_default_entry_and_a_one_shot_entry_once() {
    let tree = common::package_tree("firmware");
    let lab = Lab::new("firmware");
    let port = free_port();
    lab.boot_firmware(&tree, port, OLD);

    assert_eq!(lab.exec("uname -r"), OLD);
    lab.exec("test -d /sys/firmware/efi");
    let status = lab.exec("bootctl status --no-pager 2>&1");
    assert!(
        status.contains("Product: systemd-boot"),
        "booted by systemd-boot:\n{status}"
    );
    let list = lab.exec("bootctl list --no-pager 2>&1");
    for k in [OLD, NEW, MAJOR] {
        assert!(
            list.contains(&format!("id: {}", entry_id(k))),
            "an entry for {k}:\n{list}"
        );
    }
    assert_eq!(lab.exec(&efivar("LoaderEntrySelected")), entry_id(OLD));
    assert_eq!(lab.exec(&efivar("LoaderEntryDefault")), "absent");
    assert_eq!(
        lab.exec("findmnt -n -o FSTYPE,LABEL /boot/efi"),
        "vfat KUP-ESP",
        "the ESP is mounted"
    );

    // One-shot: the next boot only.
    lab.exec(&format!("bootctl set-oneshot {}", entry_id(NEW)));
    assert_eq!(lab.exec(&efivar("LoaderEntryOneShot")), entry_id(NEW));
    assert_eq!(reboot(&lab), NEW, "the one-shot entry boots");
    assert_eq!(lab.exec(&efivar("LoaderEntrySelected")), entry_id(NEW));
    assert_eq!(
        lab.exec(&efivar("LoaderEntryOneShot")),
        "absent",
        "systemd-boot consumed the one-shot entry"
    );
    assert_eq!(reboot(&lab), OLD, "then the default entry again");
    assert_eq!(lab.exec(&efivar("LoaderEntrySelected")), entry_id(OLD));
}
