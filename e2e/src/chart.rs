//! The Helm chart as the tests use it: rendered with the pinned helm, its components'
//! RBAC installed in the release namespace, and credentials of its ServiceAccounts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use crate::{helm, kubectl, repo_root, token_kubeconfig_yaml};

/// Where the tests install the chart's RBAC, as `helm install e2e -n ringmaster-system`
/// would: the components' ServiceAccounts and leader leases live here.
pub const RELEASE_NAMESPACE: &str = "ringmaster-system";
/// The release name: not `ringmaster`, whose cluster-scoped names the upgrade test
/// installs with helm itself.
pub const RELEASE: &str = "e2e";

/// The ServiceAccount of `component` (`operator` or `scheduler`) in the tests' release.
pub fn service_account(component: &str) -> String {
    format!("{RELEASE}-ringmaster-{component}")
}

/// The chart's manifests rendered as release `release` in `namespace`, with `extra`
/// arguments for `helm template` (`--set ...`, `--show-only ...`).
pub fn render(release: &str, namespace: &str, extra: &[&str]) -> String {
    let out = helm()
        .args(["template", release])
        .arg(repo_root().join("charts/ringmaster"))
        .args(["--namespace", namespace])
        .args(extra)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// Installs the chart's ServiceAccounts, roles and bindings (what `helm install` would,
/// without the Deployments: the tests run the binaries themselves). Idempotent.
fn install_rbac() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let rbac = render(
            RELEASE,
            RELEASE_NAMESPACE,
            &[
                "--show-only",
                "templates/operator-rbac.yaml",
                "--show-only",
                "templates/scheduler-rbac.yaml",
            ],
        );
        let namespace = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {RELEASE_NAMESPACE}}}\n---\n"
        );
        apply_server_side(&(namespace + &rbac));
    });
}

/// `kubectl apply --server-side` of `yaml`; panics with kubectl's message if refused.
pub fn apply_server_side(yaml: &str) {
    crate::kubectl_apply_with(&["--server-side", "--force-conflicts"], yaml)
}

/// A token of ServiceAccount `account` in `namespace`, valid for two hours.
pub fn token(account: &str, namespace: &str) -> String {
    let out = kubectl()
        .args([
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--duration",
            "2h",
        ])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl create token {account}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a token is ASCII")
        .trim()
        .to_string()
}

/// A kubeconfig that authenticates as the chart's ServiceAccount of `component`
/// (`operator` or `scheduler`), as its pod would: one token per component and test
/// process (valid longer than any test binary runs), not one per process started.
pub fn kubeconfig(component: &str) -> PathBuf {
    static WRITTEN: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    install_rbac();
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    written
        .entry(component.to_string())
        .or_insert_with(|| account_kubeconfig(&service_account(component), RELEASE_NAMESPACE))
        .clone()
}

/// A kubeconfig that authenticates as ServiceAccount `account` of `namespace`.
pub fn account_kubeconfig(account: &str, namespace: &str) -> PathBuf {
    let token = token(account, namespace);
    let path = kubeconfig_dir().join(format!(
        "{namespace}-{account}-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(&path, token_kubeconfig_yaml(&token))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Beside the admin kubeconfig: the cluster's state directory, removed with it.
fn kubeconfig_dir() -> PathBuf {
    let admin = crate::kubeconfig();
    admin
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// The chart's values as a Markdown table, from the `# --` comments of values.yaml (the
/// helm-docs convention): key, default, description.
pub fn values_table() -> String {
    let text = std::fs::read_to_string(repo_root().join("charts/ringmaster/values.yaml"))
        .expect("read values.yaml");
    let values: serde_json::Value = serde_yaml::from_str(&text).expect("values.yaml parses");
    let mut out = String::from("| Key | Default | Description |\n|---|---|---|\n");
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut doc: Option<String> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let body = line.trim();
        if let Some(start) = body.strip_prefix("# --") {
            doc = Some(start.trim().to_string());
            continue;
        }
        if let (Some(more), Some(d)) = (body.strip_prefix('#'), doc.as_mut()) {
            d.push(' ');
            d.push_str(more.trim());
            continue;
        }
        let Some((key, _)) = body.split_once(':').filter(|_| !body.starts_with('#')) else {
            continue;
        };
        path.retain(|(depth, _)| *depth < indent);
        path.push((indent, key.trim().to_string()));
        if let Some(description) = doc.take() {
            let keys: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
            let default = keys
                .iter()
                .fold(&values, |v, k| &v[*k])
                .to_string()
                .replace('|', "\\|");
            out.push_str(&format!(
                "| `{}` | `{default}` | {} |\n",
                keys.join("."),
                description.replace('|', "\\|")
            ));
        }
    }
    out
}

/// charts/ringmaster/README.md with its values table replaced by `values_table()`.
pub fn readme_with_values_table() -> String {
    let readme = std::fs::read_to_string(repo_root().join("charts/ringmaster/README.md"))
        .expect("read charts/ringmaster/README.md");
    let (start, end) = ("<!-- values:start -->\n", "<!-- values:end -->");
    let (head, rest) = readme
        .split_once(start)
        .expect("the chart README marks its values table with <!-- values:start -->");
    let (_, tail) = rest.split_once(end).expect("<!-- values:end -->");
    format!("{head}{start}{}{end}{tail}", values_table())
}
