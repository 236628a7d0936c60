//! Everything that runs the `fogmesh` binary as a separate process, in one test binary:
//! the command line itself (`cli`: no `LD_LIBRARY_PATH`, signals, bad configs), meshes of
//! `fogmesh node` processes on their own loopback addresses (`mesh`: membership,
//! `kill -9`, partitions, re-placement), zones joined by a gateway with direct links
//! between them made impossible (`zones`), versions rolled across them (`rollout`), federated
//! rounds across them (`federation`), `fogmesh sim` on the bundled scenarios
//! (`simulation`) and a
//! node with an edge log killed again and again under load (`durability`).
//! The binary is the one cargo built for this package (`CARGO_BIN_EXE_fogmesh`).

mod cli;
mod durability;
mod federation;
mod fixtures;
mod linkage;
mod mesh;
mod rollout;
mod simulation;
mod zones;
