//! The `kupctl` binary: a shim over [`kupctl::main`].

fn main() -> std::process::ExitCode {
    kupctl::main()
}
