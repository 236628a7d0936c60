//! Links libtorch (rpath, CUDA backend where present) into this package's binaries and tests.

fn main() {
    fogmesh_build_support::link_libtorch();
}
