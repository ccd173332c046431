//! Regenerates the values table of charts/ringmaster/README.md from values.yaml's
//! comments (`cargo test -p ringmaster-e2e --test chart` fails when it is stale).

fn main() -> std::io::Result<()> {
    let path = ringmaster_e2e::repo_root().join("charts/ringmaster/README.md");
    std::fs::write(&path, ringmaster_e2e::chart::readme_with_values_table())?;
    println!("wrote {}", path.display());
    Ok(())
}
