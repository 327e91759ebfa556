//! Lab test of kup's own kernels (KHO/LUO built in, `kernel-patches/build`): installed in a guest
//! from their Debian packages, then two kup updates with the disk backend, Debian's 6.12 ->
//! 7.2.13-kup -> 7.3.4-kup with `kho=on liveupdate=on`, memcached kept across both and
//! `/dev/liveupdate` on each new kernel. The disk-write probe reports what the root disk wrote from
//! just before each `kupctl update` to the kexec: the checkpoint images here, the number the RAM
//! backend's test holds against it.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::kup_kernels::{self, KUP_72, KUP_73, LUO_ARGS};
use common::{Lab, OLD, disk_probe, free_port, memcached, up_line};

/// memcached marked, disk backend. `kexec_watchdog = 0`: kup's lab kernels have no driver for the
/// lab's i6300esb watchdog (`kernel-patches/lab-modules` lacks it), so a watchdog armed for the
/// switch on Debian's kernel would reset the guest ~180 s into the kup kernel.
const CONFIG: &str =
    "[update]\nbackend = \"disk\"\nkexec_watchdog = 0\n\n[[unit]]\nname = \"memcached.service\"\n";
/// Keys loaded into memcached: ~50 MB of values of 100..5000 bytes.
const KEYS: u32 = 20_000;
/// Guest memory: room for KHO's scratch (kho=on reserves ~400 MB as CMA) beside memcached.
const MEM_MIB: u32 = 3072;

/// One kup update with `cmd` to `kernel`, the disk-write probe marked `label` just before it; checks
/// everything from the host afterwards.
fn hop(lab: &Lab, port: u16, pid: &str, cmd: &str, kernel: &str, label: &str) {
    lab.exec(&disk_probe::start());
    let boot_before = lab.exec("cat /proc/sys/kernel/random/boot_id");
    let rss_kib: u64 = lab
        .exec(&format!("ps -o rss= -p {pid}"))
        .trim()
        .parse()
        .unwrap();
    let outage = memcached::Outage::start(port);
    let at_mark = lab.exec(&disk_probe::mark(label));
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
    let outage = outage.finish();
    eprintln!(
        "update to {kernel}: command -> new kernel at multi-user {:.1} s; memcached downtime seen by the host {:.1} s",
        switch.as_secs_f64(),
        outage.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
    );

    let writes = disk_probe::writes_since(lab, label);
    eprintln!(
        "disk probe {label}: the root disk ({}) wrote {} MiB ({} sectors: {} at the marker, {} at the last line) from the marker to the kexec; {} probe lines, the shutdown hook's last: {}; memcached RSS {} MiB",
        writes.disk,
        writes.bytes() >> 20,
        writes.last - writes.at_mark,
        writes.at_mark,
        writes.last,
        writes.samples,
        writes.final_seen,
        rss_kib >> 10
    );
    assert_eq!(at_mark, writes.at_mark.to_string());
    assert!(
        writes.final_seen,
        "the probe's systemd-shutdown line reached the console: {writes:?}"
    );
    // The disk backend writes memcached's memory as image files before the kexec.
    assert!(
        writes.bytes() >= rss_kib * 1024 / 2,
        "the images ({} bytes written) are on disk for a memcached of {rss_kib} KiB",
        writes.bytes()
    );

    assert_eq!(lab.exec("uname -r"), kernel);
    common::assert_memcached_kept(lab, port, pid, KEYS, &format!("the update to {kernel}"));
    let cmdline = lab.exec("cat /proc/cmdline");
    assert!(cmdline.contains(LUO_ARGS), "{cmdline}");
    assert_eq!(
        lab.exec("test -c /dev/liveupdate && echo char device || ls -l /dev/liveupdate 2>&1"),
        "char device",
        "/dev/liveupdate on {kernel}"
    );
    eprintln!(
        "{}",
        lab.exec("journalctl -b -u memcached -o cat --no-pager | grep 'restored as' || true")
    );
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn kup_kernels_install_in_the_guest_and_take_updates_with_the_disk_backend() {
    let tree = common::install_tree("kupkernels", CONFIG);
    let debs = kup_kernels::add_kup_kernels(&tree);
    eprintln!("kup kernels in the payload: {debs:?}");
    let lab = Lab::new("kupkernels");
    let port = free_port();
    let t = Instant::now();
    let (k, _) = up_line(&lab.boot_old_mem(&tree, port, MEM_MIB));
    eprintln!(
        "boot of {k} with kup's package and kernels in the payload: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(k, OLD);

    // Install both kernels as a kernel update would: their postinst makes the initrds (dracut, with
    // kup's module), the ESP entries and stages them with kup.
    let t = Instant::now();
    let boot = lab.exec(&kup_kernels::install_kup_kernels());
    eprintln!(
        "dpkg -i of {KUP_72} and {KUP_73} in the guest: {:.1} s\n/boot: {}",
        t.elapsed().as_secs_f64(),
        boot.replace('\n', " ")
    );
    for v in [KUP_72, KUP_73] {
        for f in ["vmlinuz", "initrd.img", "config"] {
            assert!(
                boot.lines().any(|l| l == format!("{f}-{v}")),
                "/boot/{f}-{v} after dpkg -i: {boot}"
            );
        }
    }
    eprintln!(
        "{}",
        lab.exec(&format!(
            "grep -i kup {}/dpkg.log || true; cat /run/kup/kup.d/50-staged.toml 2>/dev/null || true",
            kup_kernels::GUEST_DIR
        ))
    );

    let t = Instant::now();
    let bytes = memcached::load(port, KEYS).expect("load memcached from the host");
    eprintln!(
        "loaded {KEYS} keys, {} MiB of values, in {:.1} s",
        bytes >> 20,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));
    let pid = lab.exec("systemctl show -p MainPID --value memcached");

    hop(
        &lab,
        port,
        &pid,
        &format!("kupctl update --kernel {KUP_72} --append '{LUO_ARGS}'"),
        KUP_72,
        "hop1",
    );
    // The kup kernel's command line carries kho=on liveupdate=on on: kup keeps the running command
    // line, so no --append is needed for the second switch.
    hop(
        &lab,
        port,
        &pid,
        &format!("kupctl update --kernel {KUP_73}"),
        KUP_73,
        "hop2",
    );
}
