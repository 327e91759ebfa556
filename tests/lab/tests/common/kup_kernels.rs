//! kup's own kernels for the lab tests: the KHO/LUO-enabled Debian packages `kernel-patches/build`
//! makes (cached in ~/.cache/kup-kernels), handed to the guest in the payload tree and installed there
//! with `dpkg -i`, as a kernel update arrives on a real machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `uname -r` of kup's 7.2 kernel (`kernel-patches/build --source 7.2`).
pub const KUP_72: &str = "7.2.13-kup";
/// `uname -r` of kup's 7.3 kernel (`kernel-patches/build --source 7.3`).
pub const KUP_73: &str = "7.3.4-kup";
/// The kernel arguments that turn KHO and LUO on (`/dev/liveupdate` exists only with both).
pub const LUO_ARGS: &str = "kho=on liveupdate=on";
/// Where the payload tree puts the packages in the guest.
pub const GUEST_DIR: &str = "/var/lib/kup-lab/kernels";

/// The `linux-image-*-kup` packages of kup's 7.2 and 7.3 kernels, in that order: `kernel-patches/build
/// --source 7.2` and `--source 7.3` (the cached paths at once; a build of ~40 min per series when the
/// cache is cold).
pub fn kup_kernel_debs() -> Vec<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    ["7.2", "7.3"]
        .iter()
        .map(|series| {
            let out = Command::new(repo.join("kernel-patches/build"))
                .args(["--source", series])
                .output()
                .expect("run kernel-patches/build");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "kernel-patches/build --source {series} failed ({}); its log is in ~/.cache/kup-kernels (kernel-patches/README.md):\n{}",
                out.status,
                kup_lab::console::last_lines(&stderr, 30)
            );
            let deb = stdout
                .lines()
                .map(PathBuf::from)
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("linux-image-"))
                })
                .unwrap_or_else(|| {
                    panic!("kernel-patches/build --source {series} printed no linux-image-*.deb: {stdout:?}")
                });
            assert!(deb.is_file(), "{} does not exist", deb.display());
            deb
        })
        .collect()
}

/// Copies kup's kernel packages ([`kup_kernel_debs`]) into the payload `tree`, at [`GUEST_DIR`] in
/// the guest; returns their guest paths.
pub fn add_kup_kernels(tree: &Path) -> Vec<String> {
    let dir = tree.join(GUEST_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    kup_kernel_debs()
        .iter()
        .map(|deb| {
            let name = deb.file_name().unwrap();
            std::fs::copy(deb, dir.join(name)).unwrap();
            format!("{GUEST_DIR}/{}", name.to_string_lossy())
        })
        .collect()
}

/// A guest command that installs the packages [`add_kup_kernels`] put in [`GUEST_DIR`] with one
/// `dpkg -i`, then lists /boot. Each package's postinst runs the kernel hooks: dracut's (the initrd,
/// with kup's module), Debian's systemd-boot one (the ESP entry) and kup's `zz-kup` (`kupctl stage`).
/// kup's own package must be installed first, or nothing stages the kernels: the payload's install
/// hook installs it early in the first boot, before the lab's agent answers, so the command only
/// checks that. dpkg's output is in `GUEST_DIR/dpkg.log` and printed when it fails.
pub fn install_kup_kernels() -> String {
    format!(
        "set -e; s=$(dpkg-query -W -f='${{Status}}' kup 2>/dev/null || true); \
         [ \"$s\" = 'install ok installed' ] || {{ echo \"kup's package is not installed ($s): the payload tree needs it (common::install_tree)\" >&2; exit 1; }}; \
         if ! DEBIAN_FRONTEND=noninteractive dpkg -i {GUEST_DIR}/*.deb > {GUEST_DIR}/dpkg.log 2>&1; then \
         cat {GUEST_DIR}/dpkg.log >&2; echo 'dpkg -i of the kup kernels failed' >&2; exit 1; fi; \
         ls /boot"
    )
}
