//! Build-script helper shared by every fogmesh crate that links libtorch.
//!
//! `torch-sys` finds libtorch inside the PyTorch wheel (`LIBTORCH_USE_PYTORCH=1`) and
//! passes its folder to direct dependents as `DEP_TCH_LIBTORCH_LIB`. Cargo's link
//! arguments only reach the binaries and test executables of the package whose build
//! script prints them, so each such package calls [`link_libtorch`] from its own
//! `build.rs`. The result: `fogmesh` and every test binary start without
//! `LD_LIBRARY_PATH`, and use a GPU wherever the wheel brings libtorch's CUDA backend.

use std::path::Path;

/// libtorch's CUDA backend. libtorch registers CUDA as a device only when this library
/// is loaded, and nothing in fogmesh calls into it directly, so a plain `-ltorch_cuda`
/// is dropped by linkers that default to `--as-needed` (Debian's and Ubuntu's do) and
/// `Device::cuda_if_available()` answers CPU on a GPU node.
pub const CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// Prints the linker arguments for this package's binaries and tests: the libtorch
/// folder as a runtime search path, and, when the wheel has it, libtorch's CUDA library
/// as a library the binary needs whether or not it calls into it. Also sets
/// `FOGMESH_LIBTORCH_LIB` for the package's code and tests, so a test can tell whether
/// the wheel it was built against has CUDA.
///
/// Panics (failing the build with the message) when `torch-sys` did not report the
/// folder, which means the package forgot its direct `torch-sys` dependency.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: the package calling link_libtorch \
             must depend on torch-sys directly"
        )
    });
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-env=FOGMESH_LIBTORCH_LIB={dir}");
    if Path::new(&dir).join(CUDA_LIBRARY).exists() {
        // `--no-as-needed` around this one library only: everything else keeps the
        // linker's default, so no other unused library becomes a start-up cost.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{dir},-ltorch_cuda,--as-needed");
    }
}
