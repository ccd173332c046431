//! The operator under the chart's own RBAC, with a token of the chart's ServiceAccount as a
//! pod has, not as cluster admin: a TrainingJob gets its trainer Role and RoleBinding and
//! its whole gang, and an InferenceService its Deployment, Service and autoscaler (watched,
//! applied, deleted) and its status. Cluster admin skips the API server's escalation check
//! for RoleBindings, so every other test would pass while, under the chart, no job could
//! start (as happened when the RoleBinding was applied before its Role; found on the real
//! node).

use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use ringmaster_crds::keys::JOB_NAME;
use ringmaster_crds::{InferenceService, TrainingJob, find_condition};
use ringmaster_e2e::{
    client, delete_namespace, helm, kubeconfig, kubectl, kubectl_apply, namespace, repo_root,
    wait_until,
};

/// The operator process; killed when the test ends, passing or not.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chart's operator ServiceAccount, ClusterRole and ClusterRoleBinding for `ns`.
fn install_operator_rbac(ns: &str) {
    let rendered = helm()
        .args(["template", "ringmaster"])
        .arg(repo_root().join("charts/ringmaster"))
        .args(["--namespace", ns])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "helm template failed");
    let manifests = String::from_utf8(rendered.stdout).unwrap();
    let rbac: Vec<&str> = manifests
        .split("\n---")
        .filter(|doc| {
            doc.contains("name: ringmaster-operator\n")
                && [
                    "kind: ServiceAccount",
                    "kind: ClusterRole\n",
                    "kind: ClusterRoleBinding",
                ]
                .iter()
                .any(|kind| doc.contains(kind))
        })
        .collect();
    assert_eq!(
        rbac.len(),
        3,
        "the chart's operator RBAC:\n{}",
        rbac.join("\n---")
    );
    kubectl_apply(&rbac.join("\n---\n"));
}

/// A kubeconfig that authenticates as the chart's operator ServiceAccount.
fn service_account_kubeconfig(ns: &str) -> std::path::PathBuf {
    let token = kubectl()
        .args([
            "create",
            "token",
            "ringmaster-operator",
            "-n",
            ns,
            "--duration",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(token.status.success(), "kubectl create token");
    let token = String::from_utf8(token.stdout).unwrap();
    let admin = kube::config::Kubeconfig::read_from(kubeconfig()).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let path = std::env::temp_dir().join(format!("{ns}-operator.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: {:?}, certificate-authority: {:?}}}}}]\n\
             users: [{{name: u, user: {{token: {:?}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            cluster.server.unwrap_or_default(),
            cluster.certificate_authority.unwrap_or_default(),
            token.trim(),
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn operator_with_the_charts_credentials_starts_a_gang_and_serves_a_model() {
    let client = client().await;
    let ns = namespace(&client, "chart-rbac").await;
    install_operator_rbac(&ns);
    let config = service_account_kubeconfig(&ns);
    let _operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_ringmaster-operator"))
            .args([
                "--namespace",
                &ns,
                "--lease-namespace",
                &ns,
                "--identity",
                "chart-rbac",
            ])
            .args(["--listen", "127.0.0.1:0"])
            .env("KUBECONFIG", &config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );

    let job: TrainingJob = serde_yaml::from_str(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {name: rbac}
spec:
  model: {architecture: bert, source: /models/minilm, labels: [ham, spam]}
  data: {train: /data/train.csv, format: csv}
  distribution: {workers: 2}
"#,
    )
    .unwrap();
    Api::<TrainingJob>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let isvc: InferenceService = serde_yaml::from_str(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: InferenceService
metadata: {name: classifier}
spec:
  model: {architecture: bert, source: /models/minilm}
  replicas: {min: 1, max: 3}
"#,
    )
    .unwrap();
    let services = Api::<InferenceService>::namespaced(client.clone(), &ns);
    services
        .create(&PostParams::default(), &isvc)
        .await
        .unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    wait_until(
        Duration::from_secs(60),
        "both workers created and ungated by the operator running as the chart's ServiceAccount",
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&format!("{JOB_NAME}=rbac")))
                    .await
                    .unwrap();
                list.items.len() == 2
                    && list.items.iter().all(|p| {
                        p.spec
                            .as_ref()
                            .and_then(|s| s.scheduling_gates.as_ref())
                            .is_none_or(|gates| gates.is_empty())
                    })
            }
        },
    )
    .await;
    let (deployments, autoscalers) = (
        Api::<Deployment>::namespaced(client.clone(), &ns),
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns),
    );
    let service_objects = Api::<Service>::namespaced(client.clone(), &ns);
    wait_until(
        Duration::from_secs(60),
        "the service's Deployment, Service, autoscaler and status",
        || async {
            let status = services.get("classifier").await.unwrap().status;
            deployments.get_opt("classifier").await.unwrap().is_some()
                && service_objects
                    .get_opt("classifier")
                    .await
                    .unwrap()
                    .is_some()
                && autoscalers.get_opt("classifier").await.unwrap().is_some()
                && status.is_some_and(|s| find_condition(&s.conditions, "Ready").is_some())
        },
    )
    .await;
    let fixed = serde_json::json!({"spec": {"replicas": {"min": 2, "max": 2}}});
    services
        .patch("classifier", &PatchParams::default(), &Patch::Merge(fixed))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "the autoscaler deleted",
        || async { autoscalers.get_opt("classifier").await.unwrap().is_none() },
    )
    .await;
    // Not eventually, after failed reconciles and their 5-second requeues: at once.
    let events = kubectl()
        .args([
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "reason=ReconcileError",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&events.stdout).trim().is_empty(),
        "reconciles failed under the chart's credentials: {}",
        String::from_utf8_lossy(
            &kubectl()
                .args(["get", "events", "-n", &ns])
                .output()
                .unwrap()
                .stdout
        )
    );
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get("rbac-trainer")
        .await
        .expect("the trainer's RoleBinding");
    assert_eq!(binding.role_ref.name, "rbac-trainer");
    let _ = std::fs::remove_file(&config);
    delete_namespace(&client, &ns).await;
}
