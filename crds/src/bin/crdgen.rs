//! Writes the generated CRD YAML into `crds/` and the Helm chart (both checked in;
//! `cargo test` fails when either is stale).

fn main() -> std::io::Result<()> {
    for dir in ringmaster_crds::crd_dirs() {
        for (file, crd) in ringmaster_crds::all_crds() {
            let path = dir.join(file);
            std::fs::write(&path, ringmaster_crds::crd_yaml(&crd))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
