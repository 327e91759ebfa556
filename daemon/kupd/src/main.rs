//! The `kupd` binary: a shim over [`kupd::daemon::main`].

fn main() -> std::process::ExitCode {
    kupd::daemon::main()
}
