//! Tidy checks over the workspace's own sources, the way rust-analyzer's `tidy` runs
//! them: every `.rs` file opens with a `//!` paragraph that says what lives there.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Folders that hold no fogmesh source: build output, generated data, git.
    const SKIPPED: [&str; 4] = ["target", "data", ".git", "node_modules"];

    fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                if !SKIPPED.contains(&name) && !name.starts_with('.') {
                    rust_files(&path, found);
                }
            } else if name.ends_with(".rs") {
                found.push(path);
            }
        }
    }

    #[test]
    fn every_rust_file_opens_with_a_module_doc() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        rust_files(&root, &mut files);
        assert!(
            files.len() > 100,
            "found only {} .rs files under {}",
            files.len(),
            root.display()
        );
        let undocumented: Vec<String> = files
            .iter()
            .filter(|path| {
                let text = std::fs::read_to_string(path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                !text.trim_start().starts_with("//!")
            })
            .map(|path| {
                path.strip_prefix(&root)
                    .unwrap_or(path)
                    .display()
                    .to_string()
            })
            .collect();
        assert!(
            undocumented.is_empty(),
            "these files do not open with a `//!` paragraph: {undocumented:?}"
        );
    }
}
