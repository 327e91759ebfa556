//! The command line of kupd: no arguments besides --help and --version. Its clap definition is
//! also the source of the kupd(8) man page (crate `kup-docs`).

use clap::Command;

/// kupd's command line, with the text of `kupd --help` and of the man page.
#[must_use]
pub fn command() -> Command {
    Command::new("kupd")
        .version(env!("CARGO_PKG_VERSION"))
        .about("kup's kernel update service: org.kup.Manager1 on the system bus")
        .long_about(
            "kupd is kup's system service. It owns org.kup.Manager1 on the system bus and runs \
             kernel updates for its callers (kupctl, kup-update.service, desktop updaters): it \
             checkpoints the systemd units marked in /etc/kup/kup.toml with CRIU, switches to \
             the new kernel with kexec, and the units come back as the same units on it.\n\n\
             systemd starts kupd (kupd.service) or D-Bus activates it (org.kup.Manager1); it \
             takes no arguments. Every caller is checked with polkit (actions org.kup.update \
             and org.kup.dry-run).",
        )
        .after_long_help(
            "ENVIRONMENT:\n  KUP_LOG   tracing filter, e.g. kupd=debug (default: info)\n\n\
             LOGGING:\n  kupd logs to the journal with structured fields: UNIT=, KUP_PHASE=, \
             KUP_UPDATE_ID=, KUP_TARGET=; e.g. journalctl -u kupd KUP_PHASE=dump\n\n\
             FILES:\n  /etc/kup/kup.toml, /etc/kup/kup.d/*.toml, /usr/lib/kup/kup.toml  \
             configuration, see kup.toml(5)\n  /var/lib/kup  handoff manifest and images\n\n\
             SEE ALSO:\n  kupctl(8), kup.toml(5), docs/DBUS.md",
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_is_consistent() {
        super::command().debug_assert();
    }

    #[test]
    fn arguments_are_refused() {
        let err = super::command()
            .try_get_matches_from(["kupd", "--frobnicate"])
            .expect_err("kupd takes no arguments");
        assert!(err.to_string().contains("--frobnicate"), "{err}");
    }
}
