//! Lab test of the luo backend on kup's own kernels (KHO/LUO built in, `kernel-patches/build`),
//! installed in a guest from their Debian packages. kup.toml asks for `backend = "luo"`. Hop 1,
//! Debian's 6.12 -> 7.2.13-kup: the running kernel has no LUO, so kup says so and goes through the
//! disk, and gives the target `kho=on liveupdate=on`. Hop 2, 7.2.13-kup -> 7.3.4-kup: the
//! checkpoint stays in RAM across the kexec (LUO), nothing of it is written to disk, and the
//! services' memory is not even copied: kup's kernels carry the PPP patch, so with
//! `luo_disk_copy = false` and the lazy restore the processes' pages are kept where they are
//! (`luo_in_place`), and the checkpoint files hold only CRIU's metadata. memcached keeps
//! its PID and every key across both. The disk-write probe reports what the root disk wrote from
//! just before each `kupctl update` to the kexec, read from the serial console on the host. Hop 3,
//! the luo row of the fault matrix: 7.3.4-kup -> 7.2.13-kup with the images in RAM, where
//! memcached's health command fails; kup falls back to 7.3.4-kup through the disk (the units
//! restored from RAM are checkpointed again onto the disk) with every key of both services. Hop 4,
//! the disk copy (`luo_disk_copy`, off in the hops before so that they write no image bytes): the
//! update to 7.2.13-kup keeps the images in RAM and a copy on disk, the new kernel panics while it
//! restores, the firmware boots Debian's 6.12 (RAM is gone), which restores both services from the
//! disk copy. Hop 5, a target kernel without LUO: back to 7.3.4-kup (through the disk: 6.12 has no
//! LUO), then an update to 7.2.13-kup booted with `liveupdate=off` (no /dev/liveupdate there): the
//! images kept in RAM cannot be taken back, and kup-luo.service restores both services from the
//! disk copy.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::kup_kernels::{self, KUP_72, KUP_73, LUO_ARGS};
use common::{Lab, OLD, disk_probe, free_port, memcached, up_line};

/// memcached marked, luo backend, pre-copy and lazy restore. `kexec_watchdog = 0`: kup's lab kernels have no driver for the
/// lab's i6300esb watchdog (`kernel-patches/lab-modules` lacks it), so a watchdog armed for the
/// switch on Debian's kernel would reset the guest ~180 s into the kup kernel.
const CONFIG: &str = "[update]\nbackend = \"luo\"\nluo_disk_copy = false\nprecopy_rounds = 3\nrestore = \"lazy\"\nkexec_watchdog = 0\n\n[[unit]]\nname = \"memcached.service\"\n\n[[unit]]\nname = \"redis-server.service\"\n";
/// redis as the administrator runs it for kup: Debian's unit without its user namespace (kup
/// refuses `PrivateUsers=`: docs/ARCHITECTURE.md), no RDB snapshots (their disk writes are not the
/// images', and the test counts what reaches the disk).
const REDIS_SETUP: &str = "mkdir -p /etc/systemd/system/redis-server.service.d && \
     printf '[Service]\\nPrivateUsers=no\\n' > /etc/systemd/system/redis-server.service.d/50-kup-lab.conf && \
     sed -i 's/^save .*//' /etc/redis/redis.conf && printf 'save \"\"\\n' >> /etc/redis/redis.conf && \
     systemctl daemon-reload && systemctl restart redis-server && systemctl is-active redis-server";
/// memcached's memory cap raised above the image's 1 GiB, for more than 1 GiB of data.
const MEMCACHED_SETUP: &str = "sed -i 's/^-m .*/-m 1800/' /etc/memcached.conf && systemctl restart memcached && systemctl is-active memcached";
/// Keys loaded into redis: ~100 MB.
const REDIS_KEYS: u32 = 40_000;
/// Keys loaded into memcached: ~1.07 GiB of values of 100..5000 bytes.
const KEYS: u32 = 440_000;
/// Guest memory: memcached (~1.3 GiB) and redis, their checkpoint in RAM beside them (the luo
/// backend's tmpfs), KHO's scratch (kho=on reserves ~400 MB as CMA, movable pages still use it).
const MEM_MIB: u32 = 4096;

/// One kup update with `cmd` to `kernel`, the disk-write probe marked `label` just before it; checks
/// everything from the host afterwards.
/// Which backend a hop is expected to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Disk,
    Ram,
}

fn hop(lab: &Lab, port: u16, pids: (&str, &str), redis: u16, kernel: &str, label: &str, via: Via) {
    let pid = pids.0;
    let cmd = format!("kupctl update --kernel {kernel}");
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
    lab.begin_switch(&cmd);
    let waited = lab.ok(&["wait", "--timeout", "400"]);
    let switch = t0.elapsed();
    let (k, boot) = up_line(&waited);
    if k != kernel {
        // A fallback: what kup recorded about the kernel that failed.
        eprintln!(
            "{}",
            lab.exec("kupctl status; cat /var/lib/kup/last-handoff.json; journalctl -b -1 -o short-monotonic --no-pager | grep -Ei 'kup|oom|killed|luo' | tail -60")
        );
    }
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
    let images = writes.bytes();
    let rss = rss_kib * 1024;
    let old_journal = lab.exec(
        "journalctl -b -1 -o cat --no-pager _SYSTEMD_UNIT=kupd.service | grep 'kup:' || true",
    );
    eprintln!("kupd on the old kernel:\n{old_journal}");
    match via {
        // The running kernel has no LUO: kup says so and writes memcached's memory as image files.
        Via::Disk => {
            assert!(
                old_journal.contains(
                    "backend \"luo\" cannot be used for this update, the images go to disk"
                ) && old_journal.contains("/dev/liveupdate is missing"),
                "kup says why it did not keep the images in RAM"
            );
            assert!(
                images >= rss / 2,
                "the images ({images} bytes written) are on disk for a memcached of {rss_kib} KiB"
            );
        }
        // LUO: the checkpoint stays in RAM; the disk sees the manifest and the journal, not the
        // memory.
        Via::Ram => {
            assert!(
                old_journal.contains("kup: kept in RAM (LUO): "),
                "the holder preserved the images"
            );
            // PPP (kup's kernels carry the patch, luo_disk_copy is off, the restore lazy): the
            // processes' memory stayed where it was, the checkpoint files hold almost nothing.
            let (files_mib, kept) = in_place_summary(&old_journal);
            assert!(
                kept >= 2 && files_mib * 1024 < rss_kib / 8,
                "memcached's and redis's memory kept in place, not copied ({files_mib} MiB of checkpoint files, {kept} processes kept)"
            );
            assert!(
                images < rss / 8,
                "only {images} bytes may reach the disk for a memcached of {rss_kib} KiB: no image bytes"
            );
            let claim = lab.exec("journalctl -b -o cat --no-pager -u kup-luo.service");
            eprintln!("kup-luo.service:\n{claim}");
            assert!(claim.contains("of LUO session kup-"), "{claim}");
            // The session was taken in the initramfs, before anything of the real root ran, and
            // kup-luo.service took it over from the early claim's process, which is gone.
            assert!(
                claim.contains("back in the initramfs")
                    && claim.contains("taken over from its PID"),
                "the initramfs claimed the LUO session:\n{claim}\n{}",
                lab.exec(
                    "journalctl -b -o cat --no-pager -u dracut-pre-pivot.service | grep kup || true"
                )
            );
            assert_eq!(
                lab.exec("ps -eo args= | grep -c '^@kup-luo-claim' || true"),
                "0",
                "the early claim's process ended once kup-luo.service took the session over"
            );
        }
    }

    assert_eq!(lab.exec("uname -r"), kernel);
    assert_eq!(lab.exec("systemctl is-active redis-server"), "active");
    both_kept(lab, port, pids, redis, &format!("the update to {kernel}"));
    // Every page came in (lazy restore), then the images were released: on the luo path that frees
    // the memory the old kernel handed over, and kup-luo.service finishes the session and ends.
    let images_dir = if via == Via::Ram {
        "/run/kup/luo"
    } else {
        "/var/lib/kup/images"
    };
    for unit in ["memcached.service", "redis-server.service"] {
        assert_eq!(
            lab.exec(&format!("for i in $(seq 240); do s=$(cat /run/kup/lazy/{unit} 2>/dev/null); [ -n \"$s\" ] && break; sleep 0.5; done; echo $s")),
            "complete",
            "lazy restore state of {unit}"
        );
        assert_eq!(
            lab.exec(&format!("for i in $(seq 40); do [ -e {images_dir}/{unit} ] || break; sleep 0.5; done; test -e {images_dir}/{unit} && echo kept || echo released")),
            "released",
            "{unit}'s images"
        );
    }
    if via == Via::Ram {
        for (prop, want) in [("ActiveState", "inactive"), ("Result", "success")] {
            assert_eq!(
                lab.exec(&format!("for i in $(seq 20); do systemctl is-active -q kup-luo.service || break; sleep 0.5; done; systemctl show -p {prop} --value kup-luo.service")),
                want,
                "kup-luo.service finished the session once the images were released"
            );
        }
        eprintln!(
            "{}",
            lab.exec("journalctl -b -o short-monotonic --no-pager -u kup-luo.service -u memcached -u redis-server | grep -E 'kup:|Start' || true")
        );
    }
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

/// From kupd's journal line `kup: kept in RAM (LUO): N files, M MiB, and the memory of K
/// process(es) kept in place, ...`: (M, K).
fn in_place_summary(journal: &str) -> (u64, u64) {
    let line = journal
        .lines()
        .find(|l| l.contains("kup: kept in RAM (LUO): "))
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |w: &str| {
        words
            .iter()
            .position(|x| x.trim_end_matches(',') == w)
            .and_then(|i| words.get(i.checked_sub(1)?))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {w:?} in {line:?}"))
    };
    (before("MiB"), before("process(es)"))
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn luo_keeps_the_checkpoint_in_ram_across_the_kexec_on_kup_kernels() {
    let tree = common::install_tree("luo", CONFIG);
    let debs = kup_kernels::add_kup_kernels(&tree);
    eprintln!("kup kernels in the payload: {debs:?}");
    let lab = Lab::new("luo");
    let port = free_port();
    let redis = free_port();
    let t = Instant::now();
    let (k, _) = up_line(&lab.boot_old_mem(&tree, port, MEM_MIB, Some(redis)));
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

    assert_eq!(lab.exec(MEMCACHED_SETUP), "active");
    assert_eq!(lab.exec(REDIS_SETUP), "active");
    memcached::load_checked(port, KEYS);
    let bytes = common::redis::load(redis, REDIS_KEYS).expect("load redis from the host");
    eprintln!(
        "loaded {REDIS_KEYS} keys, {} MiB of values, into redis",
        bytes >> 20
    );
    assert_eq!(
        common::redis::verify(redis, REDIS_KEYS).unwrap(),
        (REDIS_KEYS, 0)
    );
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let redis_pid = lab.exec("systemctl show -p MainPID --value redis-server");

    // kup gives a target kernel that has LUO `kho=on liveupdate=on` itself (asserted in `hop`).
    let pids = (pid.as_str(), redis_pid.as_str());
    hop(&lab, port, pids, redis, KUP_72, "hop1", Via::Disk);
    hop(&lab, port, pids, redis, KUP_73, "hop2", Via::Ram);
    falls_back_from_ram(&lab, port, pids, redis);
    resumes_from_the_disk_copy(&lab, port, pids, redis);
    hop(&lab, port, pids, redis, KUP_73, "hop5", Via::Disk);
    a_target_without_luo_takes_the_disk_copy(&lab, port, pids, redis);
}

/// Hop 3: an update with the images in RAM to 7.2.13-kup, where memcached's health command fails.
/// kup checkpoints both units again there (every page in first) onto the disk and kexecs back to
/// 7.3.4-kup, which restores them: same PIDs, every key, `fell-back` with the reason.
fn falls_back_from_ram(lab: &Lab, port: u16, pids: (&str, &str), redis: u16) {
    let unhealthy = format!(
        "[[unit]]\nname = \"memcached.service\"\nhealth = \"test \\\"$(uname -r)\\\" != {KUP_72} || {{ echo unhealthy on {KUP_72}; exit 1; }}\"\n"
    );
    lab.exec(&format!(
        "mkdir -p /etc/kup/kup.d && cat > /etc/kup/kup.d/50-unhealthy.toml <<'EOF'\n{unhealthy}EOF"
    ));
    let t0 = Instant::now();
    lab.begin_switch(&format!("kupctl update --kernel {KUP_72}"));
    // Two kernel switches: to 7.2.13-kup, which fails and falls back, then to 7.3.4-kup.
    let (k, _) = up_line(&lab.ok(&["wait", "--timeout", "900"]));
    eprintln!(
        "luo update to {KUP_72} failing there: back at multi-user on {k} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let finish = lab.exec("journalctl -b -1 -u kup-restore-finish -o cat --no-pager");
    eprintln!("on {KUP_72}:\n{finish}");
    let old = lab.exec(
        "journalctl -b -2 -o cat --no-pager _SYSTEMD_UNIT=kupd.service | grep 'kup:' || true",
    );
    assert!(
        old.contains("kup: kept in RAM (LUO): "),
        "the update to {KUP_72} kept the images in RAM:\n{old}"
    );
    assert_eq!(k, KUP_73, "the guest fell back to the previous kernel");
    assert!(
        finish.contains(&format!("unhealthy on {KUP_72}"))
            && finish.contains(&format!("falling back to {KUP_73}")),
        "{finish}"
    );
    both_kept(lab, port, pids, redis, "the fallback from RAM");
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"fell-back\""), "{status}");
    assert!(
        status.contains(&format!("unhealthy on {KUP_72}")),
        "{status}"
    );
    images_released(lab);
}

/// Hop 4: `luo_disk_copy = true`. The update to 7.2.13-kup keeps the images in RAM and copies them
/// to disk (the pre-copy rounds while the units serve, the final dumps frozen); 7.2.13-kup panics
/// while it restores (a failpoint), and the firmware boots the lab's default kernel, Debian's 6.12,
/// where RAM did not survive: the early boot and kup-luo.service take the disk copy, and both
/// services come back with their PIDs and every key; the copy is removed once they are restored.
fn resumes_from_the_disk_copy(lab: &Lab, port: u16, pids: (&str, &str), redis: u16) {
    lab.exec(
        "rm -f /etc/kup/kup.d/50-unhealthy.toml && printf '[update]\\nluo_disk_copy = true\\n' > /etc/kup/kup.d/60-disk-copy.toml",
    );
    assert!(
        lab.exec("cat /etc/kup/kup.d/60-disk-copy.toml")
            .contains("luo_disk_copy = true"),
        "the drop-in is in place"
    );
    let t0 = Instant::now();
    lab.begin_switch(&format!(
        "kupctl update --kernel {KUP_72} --append kup.failpoints=restore-panic=return"
    ));
    let (k, _) = up_line(&lab.ok(&["wait", "--timeout", "900", "--crash-ok"]));
    eprintln!(
        "luo update with a disk copy to {KUP_72}, which panics: back at multi-user on {k} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let console = lab.ok(&["console"]);
    assert!(
        console.contains(&format!("Linux version {KUP_72}"))
            && console.contains("Kernel panic - not syncing: sysrq triggered crash"),
        "{KUP_72} booted and panicked"
    );
    assert_eq!(k, OLD, "the firmware booted the lab's default kernel");
    let copies = lab.exec(
        "journalctl -o cat --no-pager _SYSTEMD_UNIT=kupd.service | grep -E 'kup: (disk copy|kept in RAM)' | tail -n 3",
    );
    eprintln!("kupd on {KUP_73}:\n{copies}");
    assert!(
        copies.contains("kup: disk copy (pre-copy rounds, the units serving): ")
            && copies.contains("kup: disk copy (final dumps, the units frozen): ")
            && copies.contains("kup: kept in RAM (LUO): "),
        "the images were kept in RAM and copied to disk: {copies}"
    );
    let early = lab.exec("journalctl -b -o cat --no-pager | grep -E 'kup: (unfinished handoff|handoff .* disk copy)' || true");
    assert!(early.contains("takes them from the disk copy"), "{early}");
    let claim = lab.exec("journalctl -b -o cat --no-pager -u kup-luo.service");
    eprintln!("kup-luo.service on {OLD}:\n{claim}");
    assert!(
        claim.contains("they come from the disk copy in /var/lib/kup/images/luo-copy"),
        "{claim}"
    );
    both_kept(lab, port, pids, redis, "the boot through the firmware");
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"resumed\""), "{status}");
    images_released(lab);
}

/// Hop 5: from 7.3.4-kup, with the disk copy on, an update to 7.2.13-kup with `liveupdate=off`
/// appended: the images go into RAM (the running kernel has LUO) and to the disk copy, but the
/// target has no /dev/liveupdate. kup-luo.service cannot take the session back, says so, and the
/// handoff goes on from the disk copy: both services with their PIDs and every key, `restored`.
fn a_target_without_luo_takes_the_disk_copy(lab: &Lab, port: u16, pids: (&str, &str), redis: u16) {
    let t0 = Instant::now();
    lab.begin_switch(&format!(
        "kupctl update --kernel {KUP_72} --append liveupdate=off"
    ));
    let (k, _) = up_line(&lab.ok(&["wait", "--timeout", "600"]));
    eprintln!(
        "luo update with a disk copy to {KUP_72} booted with liveupdate=off: at multi-user on {k} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(k, KUP_72);
    assert_eq!(
        lab.exec("test -e /dev/liveupdate && echo present || echo absent"),
        "absent",
        "liveupdate=off, appended after kup's liveupdate=on, leaves {KUP_72} without LUO: {}",
        lab.exec("cat /proc/cmdline")
    );
    let old = lab.exec(
        "journalctl -b -1 -o cat --no-pager _SYSTEMD_UNIT=kupd.service | grep -E 'kup: (disk copy|kept in RAM)' || true",
    );
    assert!(
        old.contains("kup: kept in RAM (LUO): ") && old.contains("kup: disk copy (final dumps"),
        "{old}"
    );
    let claim = lab.exec("journalctl -b -o cat --no-pager -u kup-luo.service");
    eprintln!("kup-luo.service on {KUP_72} without LUO:\n{claim}");
    assert!(
        claim.contains("cannot be taken back from RAM")
            && claim.contains("they come from the disk copy in /var/lib/kup/images/luo-copy"),
        "{claim}"
    );
    both_kept(lab, port, pids, redis, "the update to a kernel without LUO");
    let status = lab.exec("for i in $(seq 120); do [ -e /var/lib/kup/handoff ] || break; sleep 0.5; done; kupctl status --json");
    assert!(status.contains("\"result\": \"restored\""), "{status}");
    images_released(lab);
}

/// memcached and redis kept their PIDs (`pids`) and every key after `what`.
fn both_kept(lab: &Lab, port: u16, pids: (&str, &str), redis: u16, what: &str) {
    common::assert_memcached_kept(lab, port, pids.0, KEYS, what);
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value redis-server"),
        pids.1,
        "redis keeps its PID across {what}"
    );
    assert_eq!(
        common::redis::verify(redis, REDIS_KEYS).unwrap(),
        (REDIS_KEYS, 0),
        "redis keeps every key across {what}"
    );
}

/// Every image on disk (a fallback's, a disk copy) is released once the units are restored.
fn images_released(lab: &Lab) {
    assert_eq!(
        lab.exec("for i in $(seq 240); do [ -z \"$(ls -A /var/lib/kup/images)\" ] && break; sleep 0.5; done; ls -A /var/lib/kup/images"),
        "",
        "every image in /var/lib/kup/images is released once the units are restored"
    );
}
