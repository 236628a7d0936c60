//! The GPU build: libtorch registers its CUDA backend only when `libtorch_cuda.so` is
//! loaded, and nothing in fogmesh calls into it directly, so a linker running with
//! `--as-needed` drops it and `Device::cuda_if_available()` answers CPU on a GPU node.
//! These tests read the dynamic section of the `fogmesh` binary and of this test
//! executable and fail when the PyTorch wheel they were built against has the CUDA
//! library but they do not need it.

use std::path::Path;

use crate::fixtures::fogmesh_binary;

/// The libraries `binary` names as needed (`DT_NEEDED`).
fn needed_libraries(binary: &Path) -> Vec<String> {
    let bytes = std::fs::read(binary).unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let elf = goblin::elf::Elf::parse(&bytes)
        .unwrap_or_else(|e| panic!("{} is not an ELF file: {e}", binary.display()));
    elf.libraries.iter().map(|l| l.to_string()).collect()
}

fn assert_links_libtorch(binary: &Path) {
    let libtorch = Path::new(env!("FOGMESH_LIBTORCH_LIB"));
    let needed = needed_libraries(binary);
    assert!(
        needed.iter().any(|l| l == "libtorch_cpu.so"),
        "{} does not need libtorch_cpu.so: {needed:?}",
        binary.display()
    );
    if libtorch.join("libtorch_cuda.so").exists() {
        assert!(
            needed.iter().any(|l| l == "libtorch_cuda.so"),
            "{} has libtorch_cuda.so but {} does not need it, so libtorch would never \
             register CUDA: {needed:?}",
            libtorch.display(),
            binary.display()
        );
    }
}

#[test]
fn the_fogmesh_binary_needs_libtorch_cuda_whenever_the_wheel_has_it() {
    assert_links_libtorch(fogmesh_binary());
}

#[test]
fn test_executables_need_libtorch_cuda_whenever_the_wheel_has_it() {
    assert_links_libtorch(&std::env::current_exe().expect("the test knows its own path"));
}
