//! Embeds the libtorch folder as an rpath for this package's binaries and tests.

fn main() {
    fogmesh_build_support::embed_libtorch_rpath();
}
