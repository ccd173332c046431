//! Writes the generated CRD YAML into `crds/` and the Helm chart, and the API reference
//! into docs/crd-reference.md (all checked in; `cargo test` fails when one is stale).

fn main() -> std::io::Result<()> {
    for dir in ringmaster_crds::crd_dirs() {
        for (file, crd) in ringmaster_crds::all_crds() {
            let path = dir.join(file);
            std::fs::write(&path, ringmaster_crds::crd_yaml(&crd))?;
            println!("wrote {}", path.display());
        }
    }
    let reference = ringmaster_crds::reference_path();
    std::fs::write(&reference, ringmaster_crds::reference_markdown())?;
    println!("wrote {}", reference.display());
    Ok(())
}
