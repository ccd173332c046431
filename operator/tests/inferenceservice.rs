//! The InferenceService controller against a real kube-apiserver and kube-controller-manager
//! (Deployments, ReplicaSets, the autoscaler, garbage collection) with kwok running the
//! replicas. Each test has its own namespace and operator; the test binds the replicas
//! itself, standing in for the scheduler.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Container, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use ringmaster_crds::keys::{MODEL_VERSION, PLACEMENT, TRAINER_FIELD_MANAGER};
use ringmaster_crds::{InferenceService, TrainingJob, find_condition};
use ringmaster_e2e::{
    ServedProcess, client, delete_namespace, namespace, spawn_binder, wait_until,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn start_operator(ns: &str) -> ServedProcess {
    ServedProcess::start(
        env!("CARGO_BIN_EXE_ringmaster-operator"),
        ns,
        &["--identity", ns],
    )
}

fn isvc(name: &str, spec: &str) -> InferenceService {
    serde_yaml::from_str(&format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: InferenceService\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    ))
    .unwrap()
}

async fn create<K>(client: &Client, ns: &str, obj: &K)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), obj)
        .await
        .expect("create");
}

/// Merges `spec` into the service's spec, as `kubectl patch --type merge` does.
async fn patch_spec(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    Api::<InferenceService>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .expect("patch the service");
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// Waits until `check` holds for the object `name` (absent counts as not holding) and
/// returns it; on timeout, panics showing the last one seen.
async fn wait_for<K, F>(client: &Client, ns: &str, name: &str, what: &str, check: F) -> K
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    F: Fn(&K) -> bool,
{
    let start = Instant::now();
    loop {
        let last = get::<K>(client, ns, name).await;
        if let Some(obj) = last.as_ref().filter(|o| check(o)) {
            return obj.clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; last seen: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn server(d: &Deployment) -> &Container {
    &d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

fn args(d: &Deployment) -> String {
    server(d).args.clone().unwrap_or_default().join(" ")
}

fn model_version(d: &Deployment) -> Option<String> {
    let template = d.spec.as_ref()?.template.metadata.as_ref()?;
    template.annotations.as_ref()?.get(MODEL_VERSION).cloned()
}

/// The Ready condition's status and reason.
fn ready(isvc: &InferenceService) -> Option<(String, String)> {
    let c = find_condition(&isvc.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

fn is_ready(isvc: &InferenceService) -> bool {
    isvc.metadata.generation == isvc.status.as_ref().and_then(|s| s.observed_generation)
        && ready(isvc).is_some_and(|(status, _)| status == "True")
}

/// Whether the operator's applied configuration of `d` sets `spec.replicas`.
fn operator_owns_replicas(d: &Deployment) -> bool {
    d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some("ringmaster-operator-inferenceservice")
            && m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec")?.get("f:replicas"))
                .is_some()
    })
}

async fn event_reasons(client: &Client, ns: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn service_from_a_source_follows_its_spec_and_goes_with_it() {
    let client = client().await;
    let ns = namespace(&client, "isvc-source").await;
    let _operator = start_operator(&ns);
    let binder = spawn_binder(client.clone(), ns.clone());
    create(
        &client,
        &ns,
        &isvc(
            "spam",
            "  model: {architecture: bert, source: 'hf://org/minilm@v2', labels: [ham, spam]}
  replicas: {min: 2, max: 4}
  autoscaling: {metric: concurrency, target: 16}
  batching: {maxBatchSize: 32, maxDelayMs: 5}
  gpus: 1
  resources: {requests: {cpu: '1'}}
",
        ),
    )
    .await;

    // The Deployment runs the server as the serving contract says.
    let d: Deployment = wait_for(&client, &ns, "spam", "the Deployment", |_| true).await;
    assert_eq!(
        args(&d),
        "serve --model hf://org/minilm@v2 --name spam --port 8080 --max-batch-size 32 \
         --max-delay-ms 5 --labels ham,spam"
    );
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("InferenceService", Some(true))
    );
    let spec = d.spec.as_ref().unwrap();
    let rolling = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    let template = &spec.template;
    let annotations = template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations[MODEL_VERSION], "hf://org/minilm@v2");
    assert_eq!(annotations[PLACEMENT], "spread");
    let pod = template.spec.as_ref().unwrap();
    assert_eq!(pod.scheduler_name.as_deref(), Some("ringmaster-scheduler"));
    let c = server(&d);
    assert_eq!(c.command.as_deref(), Some(&["ringmaster".to_string()][..]));
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("http"), 8080)
    );
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref()?.path.clone())
    };
    assert_eq!(
        probe_path(c.readiness_probe.as_ref()).as_deref(),
        Some("/v2/health/ready")
    );
    assert_eq!(
        probe_path(c.liveness_probe.as_ref()).as_deref(),
        Some("/v2/health/live")
    );
    assert!(c.startup_probe.as_ref().unwrap().failure_threshold.unwrap() >= 60);
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert!(pre_stop.sleep.as_ref().unwrap().seconds > 0);
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    let security = c.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );

    // The Service: port 80 and the server's port, both to `http`.
    let svc: Service = wait_for(&client, &ns, "spam", "the Service", |_| true).await;
    let svc_spec = svc.spec.unwrap();
    assert_eq!(svc_spec.type_.as_deref(), Some("ClusterIP"));
    let ports: BTreeMap<i32, IntOrString> = svc_spec
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.port, p.target_port.unwrap()))
        .collect();
    let http = IntOrString::String("http".into());
    assert_eq!(ports, BTreeMap::from([(80, http.clone()), (8080, http)]));

    // The autoscaler owns the count: the operator never sets it, the HPA raises it to min.
    let hpa: HorizontalPodAutoscaler = wait_for(&client, &ns, "spam", "the HPA", |_| true).await;
    let hpa_spec = hpa.spec.unwrap();
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(2), 4));
    let metric = hpa_spec.metrics.unwrap()[0].pods.clone().unwrap();
    assert_eq!(metric.metric.name, "ringmaster_serve_in_flight_requests");
    assert_eq!(metric.target.average_value.unwrap().0, "16");
    assert_eq!(
        hpa_spec
            .behavior
            .unwrap()
            .scale_down
            .unwrap()
            .stabilization_window_seconds,
        Some(300)
    );
    let d: Deployment = wait_for(
        &client,
        &ns,
        "spam",
        "the HPA's 2 replicas",
        |d: &Deployment| d.spec.as_ref().unwrap().replicas == Some(2),
    )
    .await;
    assert!(
        !operator_owns_replicas(&d),
        "{:#?}",
        d.metadata.managed_fields
    );

    // Ready once kwok runs both replicas.
    let served: InferenceService = wait_for(
        &client,
        &ns,
        "spam",
        "Ready on 2 replicas",
        |s: &InferenceService| is_ready(s) && s.status.as_ref().unwrap().ready_replicas == 2,
    )
    .await;
    let status = served.status.clone().unwrap();
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://spam.{ns}.svc.cluster.local").as_str())
    );
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    assert_eq!(status.replicas_display.as_deref(), Some("2/2"));
    assert_eq!(status.model_version.as_deref(), Some("hf://org/minilm@v2"));
    for c in &status.conditions {
        assert_eq!(c.observed_generation, served.metadata.generation, "{c:?}");
    }

    // A new batching setting rolls out; a higher minimum moves the autoscaler.
    patch_spec(
        &client,
        &ns,
        "spam",
        json!({"batching": {"maxBatchSize": 8}, "replicas": {"min": 3}}),
    )
    .await;
    wait_for(
        &client,
        &ns,
        "spam",
        "the new batch size",
        |d: &Deployment| args(d).contains("--max-batch-size 8 "),
    )
    .await;
    wait_for(
        &client,
        &ns,
        "spam",
        "HPA min 3",
        |h: &HorizontalPodAutoscaler| h.spec.as_ref().unwrap().min_replicas == Some(3),
    )
    .await;
    wait_for(
        &client,
        &ns,
        "spam",
        "3 replicas ready on the new version",
        |s: &InferenceService| is_ready(s) && s.status.as_ref().unwrap().ready_replicas == 3,
    )
    .await;

    // Bounds that meet: a fixed count the operator sets, and no autoscaler.
    patch_spec(
        &client,
        &ns,
        "spam",
        json!({"replicas": {"min": 3, "max": 3}}),
    )
    .await;
    wait_until(WAIT, "the HPA deleted", || async {
        get::<HorizontalPodAutoscaler>(&client, &ns, "spam")
            .await
            .is_none()
    })
    .await;
    let d: Deployment = get(&client, &ns, "spam").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    assert!(operator_owns_replicas(&d));

    // Back to a range: the count is handed to the new autoscaler, never reset to 1 between.
    patch_spec(
        &client,
        &ns,
        "spam",
        json!({"replicas": {"min": 2, "max": 5}, "autoscaling": {"metric": "cpu", "target": 70}}),
    )
    .await;
    let hpa: HorizontalPodAutoscaler =
        wait_for(&client, &ns, "spam", "the cpu HPA", |_| true).await;
    let resource = hpa.spec.unwrap().metrics.unwrap()[0]
        .resource
        .clone()
        .unwrap();
    assert_eq!(
        (resource.name.as_str(), resource.target.average_utilization),
        ("cpu", Some(70))
    );
    let watch_from = Instant::now();
    while watch_from.elapsed() < Duration::from_secs(3) {
        let d: Deployment = get(&client, &ns, "spam").await.unwrap();
        assert_eq!(
            d.spec.as_ref().unwrap().replicas,
            Some(3),
            "the count kept through the handover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d: Deployment = get(&client, &ns, "spam").await.unwrap();
    assert!(
        !operator_owns_replicas(&d),
        "{:#?}",
        d.metadata.managed_fields
    );

    // Deleting the service takes its children along (garbage collection).
    Api::<InferenceService>::namespaced(client.clone(), &ns)
        .delete("spam", &DeleteParams::background())
        .await
        .unwrap();
    wait_until(WAIT, "Deployment, Service and HPA collected", || async {
        get::<Deployment>(&client, &ns, "spam").await.is_none()
            && get::<Service>(&client, &ns, "spam").await.is_none()
            && get::<HorizontalPodAutoscaler>(&client, &ns, "spam")
                .await
                .is_none()
    })
    .await;
    binder.abort();
    delete_namespace(&client, &ns).await;
}

/// A job whose output volume is a PersistentVolumeClaim; suspended, it runs no workers.
fn training_job(name: &str, suspend: bool) -> TrainingJob {
    serde_yaml::from_str(&format!(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  model: {{architecture: bert, source: /models/minilm, labels: [ham, spam]}}
  data: {{train: /data/train.csv, format: csv}}
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
  - {{name: out, persistentVolumeClaim: {{claimName: out}}}}
  volumeMounts:
  - {{name: data, mountPath: /data}}
  - {{name: out, mountPath: /output}}
  runPolicy: {{suspend: {suspend}}}
"#
    ))
    .unwrap()
}

/// Writes a job's status as its run would: the phase (the operator's part) and, as the
/// trainer does, the best model's path.
async fn finish_job(
    client: &Client,
    ns: &str,
    name: &str,
    phase: &str,
    completed: &str,
    best: &str,
) {
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), ns);
    let status = json!({"status": {"phase": phase, "completionTime": completed}});
    jobs.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let progress = json!({
        "apiVersion": "ringmaster.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "status": {"progress": {"bestCheckpoint": best}},
    });
    jobs.patch_status(
        name,
        &PatchParams::apply(TRAINER_FIELD_MANAGER).force(),
        &Patch::Apply(progress),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn service_of_a_training_job_waits_for_it_then_serves_each_best_model() {
    let client = client().await;
    let ns = namespace(&client, "isvc-job").await;
    let _operator = start_operator(&ns);
    let binder = spawn_binder(client.clone(), ns.clone());
    let spec =
        "  model: {architecture: bert, trainingJobRef: {name: spam-job}, labels: [ham, spam]}\n";
    create(&client, &ns, &isvc("spam", spec)).await;

    // No job yet, then a job that has not succeeded: no Deployment, and the reason says so.
    wait_for(
        &client,
        &ns,
        "spam",
        "TrainingJobNotFound",
        |s: &InferenceService| ready(s) == Some(("False".into(), "TrainingJobNotFound".into())),
    )
    .await;
    create(&client, &ns, &training_job("spam-job", true)).await;
    // The job is suspended, so its phase stays put while the message is read.
    wait_for(
        &client,
        &ns,
        "spam",
        "WaitingForTrainingJob naming the job and its phase",
        |s: &InferenceService| {
            let Some(c) = find_condition(&s.status.as_ref().unwrap().conditions, "Ready") else {
                return false;
            };
            c.status == "False"
                && c.reason == "WaitingForTrainingJob"
                && c.message.contains("TrainingJob spam-job")
                && c.message.contains("phase Suspended")
        },
    )
    .await;
    assert!(get::<Deployment>(&client, &ns, "spam").await.is_none());
    assert!(
        get::<Service>(&client, &ns, "spam").await.is_some(),
        "the URL works from the start"
    );

    // Succeeded: the best model, from the job's output volume only, read-only.
    finish_job(
        &client,
        &ns,
        "spam-job",
        "Succeeded",
        "2025-01-01T10:00:00Z",
        "/output/best",
    )
    .await;
    let d: Deployment = wait_for(&client, &ns, "spam", "the Deployment", |_| true).await;
    assert!(
        args(&d).starts_with("serve --model /output/best --name spam "),
        "{}",
        args(&d)
    );
    assert_eq!(
        model_version(&d).as_deref(),
        Some("spam-job@/output/best#2025-01-01T10:00:00Z")
    );
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let claims: Vec<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect();
    assert_eq!(
        claims,
        ["out"],
        "the volume holding the model, not the dataset"
    );
    let mount = server(&d)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "out")
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/output", Some(true))
    );
    let served = wait_for(&client, &ns, "spam", "Ready", is_ready).await;
    let status = served.status.unwrap();
    assert_eq!(
        status.model_version.as_deref(),
        Some("spam-job@/output/best#2025-01-01T10:00:00Z")
    );
    let resolved = find_condition(&status.conditions, "ModelResolved").unwrap();
    assert_eq!(resolved.status, "True");

    // A better model (the job run again): a new version rolls out.
    finish_job(
        &client,
        &ns,
        "spam-job",
        "Succeeded",
        "2025-01-02T10:00:00Z",
        "/output/run2/best",
    )
    .await;
    let d: Deployment = wait_for(
        &client,
        &ns,
        "spam",
        "the new model version",
        |d: &Deployment| {
            model_version(d).as_deref() == Some("spam-job@/output/run2/best#2025-01-02T10:00:00Z")
        },
    )
    .await;
    assert!(
        args(&d).starts_with("serve --model /output/run2/best "),
        "{}",
        args(&d)
    );
    wait_for(
        &client,
        &ns,
        "spam",
        "Ready on the new version",
        |s: &InferenceService| {
            is_ready(s)
                && s.status.as_ref().unwrap().model_version.as_deref()
                    == Some("spam-job@/output/run2/best#2025-01-02T10:00:00Z")
        },
    )
    .await;
    let reasons = event_reasons(&client, &ns).await;
    for reason in [
        "TrainingJobNotFound",
        "WaitingForTrainingJob",
        "Serving",
        "NewModelVersion",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event in {reasons:?}"
        );
    }

    // A job that failed: the reason carries over, and nothing is deployed.
    create(&client, &ns, &training_job("broken-job", true)).await;
    create(
        &client,
        &ns,
        &isvc(
            "broken",
            "  model: {architecture: bert, trainingJobRef: {name: broken-job}}\n",
        ),
    )
    .await;
    finish_job(
        &client,
        &ns,
        "broken-job",
        "Failed",
        "2025-01-01T10:00:00Z",
        "/output/best",
    )
    .await;
    wait_for(
        &client,
        &ns,
        "broken",
        "TrainingJobFailed",
        |s: &InferenceService| ready(s) == Some(("False".into(), "TrainingJobFailed".into())),
    )
    .await;
    assert!(get::<Deployment>(&client, &ns, "broken").await.is_none());
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_name_a_training_job_holds_is_not_taken_over() {
    let client = client().await;
    let ns = namespace(&client, "isvc-clash").await;
    let _operator = start_operator(&ns);
    create(&client, &ns, &training_job("clash", false)).await;
    wait_for(
        &client,
        &ns,
        "clash",
        "the job's headless Service",
        |_: &Service| true,
    )
    .await;
    create(
        &client,
        &ns,
        &isvc(
            "clash",
            "  model: {architecture: bert, source: /models/minilm}\n",
        ),
    )
    .await;

    // Both want the Service `clash`: the API server refuses a second controller, and the
    // service says which object is in the way.
    let refused = wait_for(
        &client,
        &ns,
        "clash",
        "InvalidSpec",
        |s: &InferenceService| ready(s) == Some(("False".into(), "InvalidSpec".into())),
    )
    .await;
    let message = find_condition(&refused.status.unwrap().conditions, "Ready")
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("Service clash") && message.contains("TrainingJob"),
        "{message}"
    );
    let svc: Service = get(&client, &ns, "clash").await.unwrap();
    assert_eq!(
        svc.spec.unwrap().cluster_ip.as_deref(),
        Some("None"),
        "still the job's"
    );
    let owners = svc.metadata.owner_references.unwrap();
    assert_eq!(
        owners.iter().map(|o| o.kind.as_str()).collect::<Vec<_>>(),
        ["TrainingJob"]
    );
    assert!(get::<Deployment>(&client, &ns, "clash").await.is_none());
    delete_namespace(&client, &ns).await;
}
