//! The trainer's OCI image as `images/oci.py` writes it without Docker: the same binary
//! gives the same digest, every blob matches its digest, the config's layer ids match the
//! layers, and the image's files alone run the binary as the non-root user (under
//! `chroot` when the test runs as root, else through the image's own dynamic loader).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn build(out: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/oci.py");
    let run = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ringmaster"))
        .arg("ghcr.io/ringmaster-dev/ringmaster:test")
        .arg(out)
        .output()
        .expect("python3 runs images/oci.py");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "ghcr.io/ringmaster-dev/ringmaster:test"
    );
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let data = std::fs::read(&path).unwrap();
    assert_eq!(
        format!("sha256:{:x}", Sha256::digest(&data)),
        digest,
        "{}",
        path.display()
    );
    data
}

fn json(data: &[u8]) -> serde_json::Value {
    serde_json::from_slice(data).unwrap()
}

#[test]
fn the_trainer_image_is_reproducible_valid_and_self_sufficient() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a"), dir.path().join("b"));
    let digest = build(&first);
    assert_eq!(build(&second), digest, "same binary, same digest");
    assert_eq!(
        std::fs::read(first.join("image.tar")).unwrap(),
        std::fs::read(second.join("image.tar")).unwrap(),
        "same archive, byte for byte"
    );

    let manifest = json(&blob(&first, &digest));
    let config = json(&blob(
        &first,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(config["config"]["User"], "65532:65532");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "base and binary");
    for (layer, diff_id) in layers
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
    {
        let compressed = blob(&first, layer["digest"].as_str().unwrap());
        assert_eq!(layer["size"].as_u64().unwrap(), compressed.len() as u64);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(
            format!("sha256:{:x}", Sha256::digest(&tar)),
            diff_id.as_str().unwrap()
        );
        let unpacked = Command::new("tar")
            .arg("-xf")
            .arg("-")
            .arg("-C")
            .arg(&rootfs)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&tar)?;
                child.wait()
            })
            .unwrap();
        assert!(unpacked.success());
    }
    let tmp_mode = std::fs::metadata(rootfs.join("tmp")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        tmp_mode.permissions().mode() & 0o7777,
        0o1777,
        "a writable /tmp"
    );
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());

    let output = if unsafe { libc::geteuid() } == 0 {
        Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&rootfs)
            .args(["/usr/local/bin/ringmaster", "--version"])
            .output()
            .unwrap()
    } else {
        let lib_dirs: Vec<PathBuf> = ["lib/x86_64-linux-gnu", "lib64", "usr/lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| rootfs.join(d))
            .collect();
        Command::new(rootfs.join("lib64/ld-linux-x86-64.so.2"))
            .arg("--inhibit-cache")
            .arg("--library-path")
            .arg(std::env::join_paths(lib_dirs).unwrap())
            .arg(rootfs.join("usr/local/bin/ringmaster"))
            .arg("--version")
            .output()
            .unwrap()
    };
    assert!(
        output.status.success()
            && String::from_utf8_lossy(&output.stdout).starts_with("ringmaster "),
        "the image's files do not run the binary: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
