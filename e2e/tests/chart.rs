//! The Helm chart renders, and the API server accepts every object it renders.

use std::io::Write;
use std::process::Stdio;

use ringmaster_e2e::{client, delete_namespace, helm, kubectl, namespace, repo_root};

#[tokio::test]
async fn chart_renders_objects_the_api_server_accepts() {
    let client = client().await;
    let ns = namespace(&client, "chart").await;
    let chart = repo_root().join("charts/ringmaster");
    let lint = helm().arg("lint").arg(&chart).output().unwrap();
    assert!(
        lint.status.success(),
        "helm lint:\n{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let rendered = helm()
        .args(["template", "ringmaster"])
        .arg(&chart)
        .args(["--namespace", &ns, "--set", "operator.watchNamespace=ml"])
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let manifests = String::from_utf8(rendered.stdout).unwrap();
    for kind in [
        "kind: Deployment",
        "kind: ClusterRole",
        "name: ringmaster-scheduler",
        "--namespace=ml",
    ] {
        assert!(manifests.contains(kind), "rendered chart lacks {kind:?}");
    }

    // Server-side dry run: every object is validated by the real API server, RBAC included.
    let mut apply = kubectl()
        .args(["apply", "--dry-run=server", "-n", &ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(manifests.as_bytes())
        .unwrap();
    let out = apply.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "API server rejected the chart:\n{said}"
    );
    assert!(
        said.contains("deployment.apps/ringmaster-operator created (server dry run)"),
        "{said}"
    );
    delete_namespace(&client, &ns).await;
}

#[test]
fn chart_readme_values_table_is_current() {
    let path = repo_root().join("charts/ringmaster/README.md");
    assert!(
        std::fs::read_to_string(&path).unwrap()
            == ringmaster_e2e::chart::readme_with_values_table(),
        "{} is stale: run `cargo run -p ringmaster-e2e --bin chart-docs` and commit the result",
        path.display()
    );
}
