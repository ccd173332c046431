//! The checked-in CRD YAML and API reference must match the Rust types.

#[test]
fn checked_in_crd_yaml_is_current() {
    for dir in ringmaster_crds::crd_dirs() {
        for (file, crd) in ringmaster_crds::all_crds() {
            let path = dir.join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == ringmaster_crds::crd_yaml(&crd),
                "{} is stale: run `cargo run -p ringmaster-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn checked_in_api_reference_is_current() {
    let path = ringmaster_crds::reference_path();
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == ringmaster_crds::reference_markdown(),
        "{} is stale: run `cargo run -p ringmaster-crds --bin crdgen` and commit the result",
        path.display()
    );
}
