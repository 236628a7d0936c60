//! Build-script helper shared by every fogmesh crate that links libtorch.
//!
//! `torch-sys` finds libtorch inside the PyTorch wheel (`LIBTORCH_USE_PYTORCH=1`) and
//! passes its folder to direct dependents as `DEP_TCH_LIBTORCH_LIB`. Cargo's link
//! arguments only reach the binaries and test executables of the package whose build
//! script prints them, so each such package calls [`embed_libtorch_rpath`] from its own
//! `build.rs`. The result: `fogmesh` and every test binary start without
//! `LD_LIBRARY_PATH`, on CPU-only and CUDA machines alike.

/// Prints the linker arguments that embed the libtorch folder as a runtime search path.
///
/// Panics (failing the build with the message) when `torch-sys` did not report the
/// folder, which means the package forgot its direct `torch-sys` dependency.
pub fn embed_libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: the package calling embed_libtorch_rpath \
             must depend on torch-sys directly"
        )
    });
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
}
