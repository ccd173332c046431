//! GitOps: Argo CD's Lua health checks (examples/gitops/argocd) and Flux's kstatus read
//! each state of real TrainingJobs and InferenceServices as a user expects (both through
//! the tools' own code: e2e/gitops-health); and applying the examples server-side as a
//! GitOps controller does is idempotent, never fights the operator over fields, and a
//! spec change from git is picked up.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use ringmaster_crds::{InferenceService, TrainingJob};
use ringmaster_e2e::{
    ServedProcess, client, delete_namespace, exit_pod, gitops_health, kubectl, namespace,
    repo_root, spawn_binder, wait_until,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn start_operator(ns: &str) -> ServedProcess {
    ServedProcess::start(
        env!("CARGO_BIN_EXE_ringmaster-operator"),
        ns,
        &["--identity", ns, "--restart-backoff-seconds", "0.5"],
    )
}

/// (Argo CD health, kstatus) of `object`, as the two tools compute them.
fn health(kind: &str, object: &Value) -> (String, String) {
    let script = repo_root().join(format!(
        "examples/gitops/argocd/{}-health.lua",
        kind.to_lowercase()
    ));
    let mut child = gitops_health()
        .arg("--lua")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gitops-health (built by e2e/build-binaries.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "gitops-health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    let argo = &verdict["argo"];
    let kstatus = &verdict["kstatus"];
    assert!(
        argo["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an Argo CD health without a message: {verdict}"
    );
    (
        argo["status"].as_str().unwrap().to_string(),
        kstatus["status"].as_str().unwrap().to_string(),
    )
}

async fn json_of<K>(api: &Api<K>, name: &str) -> Value
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

/// Waits until both tools read `name` as `expected`; panics with the last reading.
async fn wait_health<K>(api: &Api<K>, kind: &str, name: &str, expected: (&str, &str))
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut last = (String::new(), String::new());
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            last = health(kind, &json_of(api, name).await);
            if (last.0.as_str(), last.1.as_str()) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{kind} {name}: (Argo CD, kstatus) stayed {last:?}, expected {expected:?}; object: {:#}",
        json_of(api, name).await
    );
}

fn job_yaml(name: &str, extra: &str) -> TrainingJob {
    serde_yaml::from_str(&format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\n\
         spec:\n  model: {{architecture: bert, source: /models/minilm, labels: [ham, spam]}}\n  \
         data: {{train: /data/train.csv, format: csv}}\n  distribution: {{workers: 2}}\n{extra}"
    ))
    .unwrap()
}

#[tokio::test]
async fn argo_cd_and_flux_read_every_state_of_a_job_and_a_service() {
    let client = client().await;
    let ns = namespace(&client, "gitops-health").await;
    let mut operator = start_operator(&ns);
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let services = Api::<InferenceService>::namespaced(client.clone(), &ns);
    let pp = Default::default();

    // Pending: pods exist but nothing has placed them.
    // Its output on a volume that outlives the pods, for a service to serve.
    let output = "  volumes: [{name: out, persistentVolumeClaim: {claimName: out}}]\n  \
                  volumeMounts: [{name: out, mountPath: /output}]";
    jobs.create(&pp, &job_yaml("train", output)).await.unwrap();
    wait_health(&jobs, "TrainingJob", "train", ("Progressing", "InProgress")).await;
    let waiting: InferenceService = serde_yaml::from_str(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: waiting}\n\
         spec: {model: {architecture: bert, trainingJobRef: {name: train}, labels: [ham, spam]}}",
    )
    .unwrap();
    services.create(&pp, &waiting).await.unwrap();
    wait_health(
        &services,
        "InferenceService",
        "waiting",
        ("Progressing", "InProgress"),
    )
    .await;

    // Running: a batch run is Progressing for Argo CD (like a Job) and Current for kstatus.
    let binder = spawn_binder(client.clone(), ns.clone());
    wait_health(&jobs, "TrainingJob", "train", ("Progressing", "Current")).await;

    // Failed for good (restartPolicy Never): Degraded and Failed; and so is a service of
    // the failed job.
    let never = "  runPolicy: {restartPolicy: Never}";
    jobs.create(&pp, &job_yaml("broken", never)).await.unwrap();
    wait_until(WAIT, "broken running", || async {
        jobs.get("broken")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            == Some(ringmaster_crds::JobPhase::Running)
    })
    .await;
    exit_pod(&client, &ns, "broken-worker-1", 1).await;
    wait_health(&jobs, "TrainingJob", "broken", ("Degraded", "Failed")).await;
    let orphan: InferenceService = serde_yaml::from_str(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: orphan}\n\
         spec: {model: {architecture: bert, trainingJobRef: {name: broken}, labels: [ham, spam]}}",
    )
    .unwrap();
    services.create(&pp, &orphan).await.unwrap();
    wait_health(
        &services,
        "InferenceService",
        "orphan",
        ("Degraded", "Failed"),
    )
    .await;

    // Suspended.
    jobs.create(&pp, &job_yaml("paused", "  runPolicy: {suspend: true}"))
        .await
        .unwrap();
    wait_health(&jobs, "TrainingJob", "paused", ("Suspended", "Current")).await;

    // Succeeded: Healthy, and its service turns Healthy once a replica serves the model.
    exit_pod(&client, &ns, "train-worker-0", 0).await;
    exit_pod(&client, &ns, "train-worker-1", 0).await;
    wait_health(&jobs, "TrainingJob", "train", ("Healthy", "Current")).await;
    wait_health(
        &services,
        "InferenceService",
        "waiting",
        ("Healthy", "Current"),
    )
    .await;

    // A generation the operator has not seen yet is in progress for both, whatever the
    // last status said.
    operator.kill();
    let resume = serde_json::json!({"spec": {"runPolicy": {"suspend": false}}});
    jobs.patch("paused", &PatchParams::default(), &Patch::Merge(resume))
        .await
        .unwrap();
    let stale = json_of(&jobs, "paused").await;
    assert_eq!(
        health("TrainingJob", &stale),
        ("Progressing".into(), "InProgress".into())
    );
    // So is an object the operator has never seen (its status reads observedGeneration 0:
    // without it kstatus would call an object with no status Current).
    jobs.create(&pp, &job_yaml("unseen", "")).await.unwrap();
    let unseen = json_of(&jobs, "unseen").await;
    assert_eq!(
        health("TrainingJob", &unseen),
        ("Progressing".into(), "InProgress".into())
    );
    let mut unseen_service = waiting.clone();
    unseen_service.metadata.name = Some("unseen".into());
    services.create(&pp, &unseen_service).await.unwrap();
    let unseen = json_of(&services, "unseen").await;
    assert_eq!(
        health("InferenceService", &unseen),
        ("Progressing".into(), "InProgress".into())
    );
    let _operator = start_operator(&ns);
    wait_health(&jobs, "TrainingJob", "paused", ("Progressing", "Current")).await;

    binder.abort();
    delete_namespace(&client, &ns).await;
}

/// The TrainingJobs and InferenceServices of examples/gitops and every example, the
/// first of each name (the volume variants of an example share its name).
fn example_manifests() -> String {
    let mut files = Vec::new();
    for dir in ["examples/gitops/workloads", "examples"] {
        let mut in_dir: Vec<_> = std::fs::read_dir(repo_root().join(dir))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        in_dir.sort();
        files.extend(in_dir);
    }
    let mut names = std::collections::BTreeSet::new();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in text.split("\n---") {
            let value: Value = match serde_yaml::from_str(doc) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if matches!(
                value["kind"].as_str(),
                Some("TrainingJob" | "InferenceService")
            ) && names.insert(format!("{}/{}", value["kind"], value["metadata"]["name"]))
            {
                docs.push(doc.trim().to_string());
            }
        }
    }
    assert!(docs.len() >= 7, "too few examples found: {}", docs.len());
    docs.join("\n---\n")
}

/// `kubectl apply --server-side` as GitOps controller `manager` does it.
fn gitops_apply(ns: &str, manager: &str, yaml: &str) {
    let mut child = kubectl()
        .args([
            "apply",
            "--server-side",
            "--field-manager",
            manager,
            "-n",
            ns,
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{manager}'s apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every object of the examples in `ns`, as dynamic objects.
async fn applied(client: &Client, ns: &str) -> Vec<DynamicObject> {
    let mut out = Vec::new();
    for kind in ["TrainingJob", "InferenceService"] {
        let gvk = GroupVersionKind::gvk("ringmaster.dev", "v1alpha1", kind);
        let resource = ApiResource::from_gvk(&gvk);
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource);
        out.extend(api.list(&Default::default()).await.unwrap().items);
    }
    out
}

fn entry<'a>(object: &'a DynamicObject, manager: &str) -> Option<&'a ManagedFieldsEntry> {
    object
        .managed_fields()
        .iter()
        .find(|e| e.manager.as_deref() == Some(manager) && e.subresource.is_none())
}

#[tokio::test]
async fn gitops_apply_is_idempotent_and_never_fights_the_operator() {
    let client = client().await;
    let manifests = example_manifests();
    for manager in ["argocd-controller", "kustomize-controller"] {
        let ns = namespace(&client, "gitops-apply").await;
        let _operator = start_operator(&ns);
        let binder = spawn_binder(client.clone(), ns.clone());
        gitops_apply(&ns, manager, &manifests);
        // Let the operator write its status and children before the second sync.
        wait_until(WAIT, "every example observed by the operator", || async {
            applied(&client, &ns)
                .await
                .iter()
                .all(|o| o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation)
        })
        .await;
        let first = applied(&client, &ns).await;
        tokio::time::sleep(Duration::from_millis(1100)).await; // managedFields times are in seconds

        gitops_apply(&ns, manager, &manifests);
        let second = applied(&client, &ns).await;
        assert_eq!(first.len(), second.len());
        for (before, after) in first.iter().zip(&second) {
            let name = before.name_any();
            assert_eq!(
                before.metadata.generation, after.metadata.generation,
                "{manager}: a second apply of {name} changed its spec"
            );
            let applied_at = |o: &DynamicObject| {
                entry(o, manager)
                    .unwrap_or_else(|| panic!("{manager} owns none of {name}'s fields"))
                    .time
                    .clone()
            };
            assert_eq!(
                applied_at(before),
                applied_at(after),
                "{manager}: a second apply of {name} wrote to it"
            );
            // The operator owns status, and nothing the user wrote.
            for other in after.managed_fields() {
                if other.manager.as_deref() == Some(manager) {
                    continue;
                }
                let fields = other
                    .fields_v1
                    .as_ref()
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                assert!(
                    other.subresource.as_deref() == Some("status")
                        && fields.get("f:spec").is_none(),
                    "{name}: {:?} owns fields outside status: {fields:#}",
                    other.manager
                );
            }
        }

        // A change committed to git: suspend the job. The new generation is observed and
        // acted on.
        let changed = manifests.replacen(
            "  name: spam-finetune\nspec:\n",
            "  name: spam-finetune\nspec:\n  runPolicy: {suspend: true}\n",
            1,
        );
        assert_ne!(
            changed, manifests,
            "the gitops TrainingJob example changed shape"
        );
        gitops_apply(&ns, manager, &changed);
        let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
        wait_until(WAIT, "the suspension observed and done", || async {
            let job = jobs.get("spam-finetune").await.unwrap();
            let status = job.status.clone().unwrap_or_default();
            job.metadata.generation == Some(2)
                && status.observed_generation == Some(2)
                && status.phase == Some(ringmaster_crds::JobPhase::Suspended)
        })
        .await;
        binder.abort();
        delete_namespace(&client, &ns).await;
    }
}

#[test]
fn argocd_config_map_carries_the_health_scripts_unchanged() {
    let dir = repo_root().join("examples/gitops/argocd");
    let config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("argocd-cm.yaml")).unwrap())
            .unwrap();
    for kind in ["TrainingJob", "InferenceService"] {
        let script =
            std::fs::read_to_string(dir.join(format!("{}-health.lua", kind.to_lowercase())))
                .unwrap();
        assert_eq!(
            config["data"][format!("resource.customizations.health.ringmaster.dev_{kind}")]
                .as_str(),
            Some(script.as_str()),
            "argocd-cm.yaml's {kind} script differs from {}-health.lua",
            kind.to_lowercase()
        );
    }
}
