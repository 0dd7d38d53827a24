//! Writes the hoard CRDs into a folder (default `chart/hoard/crds`), replacing stale files.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "chart/hoard/crds".into()));
    std::fs::create_dir_all(&dir)?;
    let files = hoard_api::crd::rendered()?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.ends_with(".hoard.dev.yaml") && !files.iter().any(|(f, _)| *f == name) {
            std::fs::remove_file(&path)?;
        }
    }
    for (name, body) in &files {
        std::fs::write(dir.join(name), body)?;
    }
    println!("wrote {} CRDs to {}", files.len(), dir.display());
    Ok(())
}
