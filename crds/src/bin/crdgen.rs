//! Writes the generated CRD YAML into `crds/` (checked in; `cargo test` fails when stale).

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, crd) in ringmaster_crds::all_crds() {
        std::fs::write(dir.join(file), ringmaster_crds::crd_yaml(&crd))?;
        println!("wrote crds/{file}");
    }
    Ok(())
}
