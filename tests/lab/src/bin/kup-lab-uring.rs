//! kup-lab-uring: a lab service that holds an io_uring instance and sleeps, a service CRIU cannot
//! checkpoint (the dry-run test's unit that must be reported as not restorable).
#![allow(unsafe_code)] // io_uring_setup(2) has no safe wrapper in nix

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    // struct io_uring_params: 120 bytes, zeroed = default flags.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes only the params buffer, which is valid and 120
    // bytes long as the kernel expects; the returned descriptor is kept open for the process's life.
    let fd =
        unsafe { nix::libc::syscall(nix::libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        eprintln!(
            "kup-lab-uring: io_uring_setup failed: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    println!("kup-lab-uring: holding io_uring descriptor {fd}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
