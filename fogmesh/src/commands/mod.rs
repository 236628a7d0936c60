//! One file per subcommand of `fogmesh`: its flags and the library calls it makes.

pub mod alerts;
pub mod bench;
pub mod ca;
pub mod demo;
pub mod eval;
pub mod identity;
pub mod merge;
pub mod mesh;
pub mod models;
pub mod node;
pub mod sim;
pub mod train;
