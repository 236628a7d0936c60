//! The public data sets the zoo trains and evaluates on, read from the files `just
//! setup` prepares (ELPV) or from beside the repository (SKAB, not shipped): each reader
//! checks what it reads and names the file, line and field of anything wrong. The
//! Tennessee Eastman recordings use the `fogrec` format of `fogmesh_models::recording`,
//! which replay on a node reads too; their plant units are in [`crate::tep`].

pub mod elpv;
pub mod skab;
