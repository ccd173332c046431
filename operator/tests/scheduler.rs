//! ringmaster-scheduler against a real kube-apiserver and kwok. Each test has its own
//! namespace, its own kwok nodes (labelled `ringmaster.dev/test-pool=<ns>`, which its
//! pods select, so other tests' pods on the shared nodes do not matter) and its own
//! scheduler process, which only schedules that namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::{GANG, GANG_SIZE, GPU_INDICES, RACK_ANNOTATION, ZONE_ANNOTATION};
use ringmaster_e2e::{
    POOL, Pool, ServedProcess, bind, client, delete_namespace, kubectl, kubectl_apply as apply,
    namespace, wait_until,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const ZONE: &str = "topology.kubernetes.io/zone";

/// A running `ringmaster-scheduler` for one test's namespace.
fn start_scheduler(ns: &str, identity: &str, extra: &[&str]) -> ServedProcess {
    let mut args = vec!["--identity", identity, "--lease-duration-seconds", "3"];
    args.extend(extra);
    ServedProcess::start(env!("CARGO_BIN_EXE_ringmaster-scheduler"), ns, &args)
}

async fn setup(prefix: &str) -> (Client, String, Pool) {
    let client = client().await;
    let ns = namespace(&client, prefix).await;
    let pool = Pool::new(&ns);
    (client, ns, pool)
}

/// A pod for our scheduler on this test's pool asking for `gpus` whole GPUs.
fn pod(
    ns: &str,
    name: &str,
    gang: Option<(&str, usize)>,
    gpus: u32,
    annotations: &[(&str, &str)],
) -> Pod {
    let mut labels = BTreeMap::new();
    let mut notes: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some((g, size)) = gang {
        labels.insert(GANG.to_string(), g.to_string());
        notes.insert(GANG_SIZE.to_string(), size.to_string());
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": notes},
        "spec": {
            "schedulerName": "ringmaster-scheduler",
            "nodeSelector": {POOL: ns},
            // The local control plane's node lifecycle controller keeps kwok nodes tainted
            // not-ready; kube-scheduler would refuse them just the same.
            // The pool's own taint keeps other tests' pods off these nodes.
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"},
                {"key": POOL, "operator": "Exists", "effect": "NoSchedule"},
            ],
            "containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                              "limits": {"nvidia.com/gpu": gpus.to_string()}}}],
        }
    }))
    .unwrap()
}

async fn create_gang(
    client: &Client,
    ns: &str,
    gang: &str,
    size: usize,
    gpus: u32,
    annotations: &[(&str, &str)],
) {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    for i in 0..size {
        let p = pod(
            ns,
            &format!("{gang}-{i}"),
            Some((gang, size)),
            gpus,
            annotations,
        );
        api.create(&PostParams::default(), &p)
            .await
            .expect("create pod");
    }
}

async fn gang_pods(client: &Client, ns: &str, gang: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{GANG}={gang}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

async fn bound_count(client: &Client, ns: &str, gang: &str) -> usize {
    gang_pods(client, ns, gang)
        .await
        .iter()
        .filter(|p| node_of(p).is_some())
        .count()
}

async fn wait_bound(client: &Client, ns: &str, gang: &str, size: usize) -> Vec<Pod> {
    wait_until(WAIT, &format!("gang {gang} bound"), || async {
        bound_count(client, ns, gang).await == size
    })
    .await;
    gang_pods(client, ns, gang).await
}

fn unschedulable_message(pod: &Pod) -> Option<String> {
    not_scheduled_message(pod, "Unschedulable")
}

/// The message of the pod's `PodScheduled=False` condition with this reason.
fn not_scheduled_message(pod: &Pod, reason: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some(reason)
        })
        .and_then(|c| c.message.clone())
}

/// Waits until every member says why it waits, and returns the message.
async fn wait_explained(client: &Client, ns: &str, gang: &str, size: usize) -> String {
    wait_until(WAIT, &format!("gang {gang} explained"), || async {
        let pods = gang_pods(client, ns, gang).await;
        pods.len() == size && pods.iter().all(|p| unschedulable_message(p).is_some())
    })
    .await;
    unschedulable_message(&gang_pods(client, ns, gang).await[0]).unwrap()
}

/// No two pods on one node share a GPU index.
fn assert_disjoint_gpus(pods: &[Pod]) {
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for p in pods {
        let indices = p
            .annotations()
            .get(GPU_INDICES)
            .expect("gpu indices written")
            .clone();
        for i in indices.split(',') {
            assert!(
                used.insert((node_of(p).unwrap(), i.to_string())),
                "GPU {i} given twice"
            );
        }
    }
}

#[tokio::test]
async fn gang_binds_all_or_nothing_and_explains() {
    let (client, ns, mut pool) = setup("sch-gang").await;
    pool.add(&client, 1, 6).await;
    let sched = start_scheduler(&ns, "s-gang", &[]);
    // 4 x 2 GPUs on one 6-GPU node: 3 would fit, so none may be bound.
    create_gang(&client, &ns, "g", 4, 2, &[]).await;
    let message = wait_explained(&client, &ns, "g", 4).await;
    assert!(
        message.contains("gang") && message.contains("nodes are available"),
        "{message}"
    );
    assert_eq!(
        bound_count(&client, &ns, "g").await,
        0,
        "partial gang bound"
    );
    let events = Api::<Event>::namespaced(client.clone(), &ns);
    wait_until(WAIT, "FailedScheduling event", || async {
        events.list(&ListParams::default()).await.is_ok_and(|l| {
            l.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("FailedScheduling"))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        bound_count(&client, &ns, "g").await,
        0,
        "partial gang bound"
    );

    pool.add(&client, 1, 6).await;
    let pods = wait_bound(&client, &ns, "g", 4).await;
    assert_disjoint_gpus(&pods);
    let (_, metrics) = sched.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("ringmaster_scheduler_gang_scheduling_latency_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ringmaster_scheduler_queue_depth"));
    delete_namespace(&client, &ns).await;
}

/// The Binding carries the node's zone and rack, which the API server copies onto the pod
/// (the trainer reads them through the downward API); a label the node lacks is left out.
#[tokio::test]
async fn binding_annotates_the_nodes_zone_and_rack() {
    let (client, ns, mut pool) = setup("sch-where").await;
    pool.add(&client, 2, 1).await;
    // Pool nodes are in zone-a (n0) and zone-b (n1); only n0 gets a rack.
    let racked = format!("{ns}-n0");
    let patch = json!({"metadata": {"labels": {"ringmaster.dev/rack": "rack-7"}}});
    Api::<Node>::all(client.clone())
        .patch(&racked, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("label the node's rack");
    let _sched = start_scheduler(&ns, "s-where", &[]);
    // One GPU per node and two one-GPU members: one member on each node.
    create_gang(&client, &ns, "w", 2, 1, &[]).await;
    let pods = wait_bound(&client, &ns, "w", 2).await;
    let placed: BTreeMap<String, BTreeMap<String, String>> = pods
        .iter()
        .map(|p| (node_of(p).unwrap(), p.annotations().clone()))
        .collect();
    let on = |node: &str| {
        placed
            .get(node)
            .unwrap_or_else(|| panic!("no member on {node}: {placed:?}"))
    };
    let n0 = on(&racked);
    assert_eq!(n0.get(ZONE_ANNOTATION).map(String::as_str), Some("zone-a"));
    assert_eq!(n0.get(RACK_ANNOTATION).map(String::as_str), Some("rack-7"));
    assert_eq!(n0.get(GPU_INDICES).map(String::as_str), Some("0"));
    let n1 = on(&format!("{ns}-n1"));
    assert_eq!(n1.get(ZONE_ANNOTATION).map(String::as_str), Some("zone-b"));
    assert_eq!(
        n1.get(RACK_ANNOTATION),
        None,
        "n1 has no rack label: {n1:?}"
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn competing_gangs_run_one_after_the_other() {
    let (client, ns, mut pool) = setup("sch-compete").await;
    pool.add(&client, 1, 8).await;
    let _sched = start_scheduler(&ns, "s-compete", &[]);
    create_gang(&client, &ns, "a", 2, 4, &[]).await;
    create_gang(&client, &ns, "b", 2, 4, &[]).await;
    wait_until(WAIT, "one gang bound", || async {
        let a = bound_count(&client, &ns, "a").await;
        let b = bound_count(&client, &ns, "b").await;
        a + b == 2 && (a == 2 || b == 2)
    })
    .await;
    let first = if bound_count(&client, &ns, "a").await == 2 {
        "a"
    } else {
        "b"
    };
    let second = if first == "a" { "b" } else { "a" };
    wait_explained(&client, &ns, second, 2).await;
    assert_eq!(bound_count(&client, &ns, second).await, 0);
    // The first gang finishes (kwok ends its pods); its GPUs go to the second.
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    for p in gang_pods(&client, &ns, first).await {
        let patch = json!({"metadata": {"annotations": {"ringmaster.dev/kwok-exit-code": "0"}}});
        api.patch(&p.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }
    wait_bound(&client, &ns, second, 2).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn topology_spread_and_pack() {
    let (client, ns, mut pool) = setup("sch-topo").await;
    pool.add(&client, 4, 4).await;
    let _sched = start_scheduler(&ns, "s-topo", &[]);
    // Spread alone would use all 4 nodes; the required zone keeps it to 2.
    let zoned = [
        ("ringmaster.dev/placement", "spread"),
        ("ringmaster.dev/required-topology-key", ZONE),
    ];
    create_gang(&client, &ns, "zoned", 4, 1, &zoned).await;
    let pods = wait_bound(&client, &ns, "zoned", 4).await;
    let nodes: BTreeSet<String> = pods.iter().filter_map(node_of).collect();
    let zones: BTreeSet<String> = nodes
        .iter()
        .map(|n| {
            let i: usize = n.rsplit('n').next().unwrap().parse().unwrap();
            if i.is_multiple_of(2) { "a" } else { "b" }.to_string()
        })
        .collect();
    assert_eq!(zones.len(), 1, "members in {nodes:?}");
    assert_eq!(nodes.len(), 2, "spread within the zone: {nodes:?}");
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn spread_uses_more_nodes_than_pack() {
    let (client, ns, mut pool) = setup("sch-pack").await;
    pool.add(&client, 4, 8).await;
    let _sched = start_scheduler(&ns, "s-pack", &[]);
    create_gang(
        &client,
        &ns,
        "spread",
        4,
        1,
        &[("ringmaster.dev/placement", "spread")],
    )
    .await;
    let spread: BTreeSet<String> = wait_bound(&client, &ns, "spread", 4)
        .await
        .iter()
        .filter_map(node_of)
        .collect();
    create_gang(
        &client,
        &ns,
        "pack",
        4,
        1,
        &[("ringmaster.dev/placement", "pack")],
    )
    .await;
    let pack: BTreeSet<String> = wait_bound(&client, &ns, "pack", 4)
        .await
        .iter()
        .filter_map(node_of)
        .collect();
    assert_eq!(spread.len(), 4, "spread over {spread:?}");
    assert!(pack.len() <= 2, "pack over {pack:?}");
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn impossible_gang_is_explained_in_numbers() {
    let (client, ns, mut pool) = setup("sch-huge").await;
    pool.add(&client, 2, 8).await;
    let _sched = start_scheduler(&ns, "s-huge", &[]);
    create_gang(&client, &ns, "huge", 2, 9, &[]).await;
    let message = wait_explained(&client, &ns, "huge", 2).await;
    assert!(
        message.contains("gang") && message.contains("(2 pods)"),
        "{message}"
    );
    assert!(message.contains("nodes are available"), "{message}");
    assert!(message.chars().any(|c| c.is_ascii_digit()), "{message}");
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn one_leader_binds_and_a_standby_takes_over() {
    let (client, ns, mut pool) = setup("sch-lease").await;
    pool.add(&client, 1, 8).await;
    let one = start_scheduler(&ns, "s-one", &[]);
    let two = start_scheduler(&ns, "s-two", &[]);
    wait_until(WAIT, "a leader", || async {
        one.leading().await || two.leading().await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        one.leading().await != two.leading().await,
        "exactly one leads"
    );
    let (mut leader, standby) = if one.leading().await {
        (one, two)
    } else {
        (two, one)
    };
    create_gang(&client, &ns, "first", 2, 1, &[]).await;
    wait_bound(&client, &ns, "first", 2).await;
    leader.kill();
    wait_until(WAIT, "the standby to lead", || async {
        standby.leading().await
    })
    .await;
    create_gang(&client, &ns, "second", 2, 1, &[]).await;
    let pods = wait_bound(&client, &ns, "second", 2).await;
    let mut all = gang_pods(&client, &ns, "first").await;
    all.extend(pods);
    assert_disjoint_gpus(&all);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn half_bound_gang_is_rolled_back_at_start() {
    let (client, ns, mut pool) = setup("sch-half").await;
    pool.add(&client, 1, 8).await;
    create_gang(&client, &ns, "half", 2, 1, &[]).await;
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let member = api.get("half-0").await.unwrap();
    bind(&client, &member, &format!("{ns}-n0"))
        .await
        .expect("bind by hand");
    let _sched = start_scheduler(&ns, "s-half", &[]);
    wait_until(WAIT, "the bound member deleted", || async {
        api.get_opt("half-0")
            .await
            .ok()
            .flatten()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    let _ = api.delete("half-1", &DeleteParams::default()).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_gang_broken_while_the_scheduler_runs_is_rolled_back_then_placed_whole() {
    let (client, ns, mut pool) = setup("sch-repair").await;
    pool.add(&client, 1, 8).await;
    let _sched = start_scheduler(&ns, "s-repair", &[]);
    create_gang(&client, &ns, "g", 2, 1, &[]).await;
    wait_bound(&client, &ns, "g", 2).await;
    // A member deleted and recreated (as a controller does) while the other stays bound:
    // a half-bound gang that no leader change will ever look at.
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let first_uid = api.get("g-0").await.unwrap().uid();
    api.delete("g-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_until(WAIT, "g-1 gone", || async {
        api.get_opt("g-1").await.unwrap().is_none()
    })
    .await;
    api.create(
        &PostParams::default(),
        &pod(&ns, "g-1", Some(("g", 2)), 1, &[]),
    )
    .await
    .unwrap();
    wait_until(WAIT, "the bound member rolled back", || async {
        api.get_opt("g-0")
            .await
            .unwrap()
            .is_none_or(|p| p.uid() != first_uid || p.metadata.deletion_timestamp.is_some())
    })
    .await;
    let message = wait_explained(&client, &ns, "g", 1).await;
    assert!(message.contains("partly bound"), "{message}");
    assert_eq!(bound_count(&client, &ns, "g").await, 0);
    // Its controller recreates the member: the gang is placed whole again.
    wait_until(WAIT, "g-0 gone", || async {
        api.get_opt("g-0").await.unwrap().is_none()
    })
    .await;
    api.create(
        &PostParams::default(),
        &pod(&ns, "g-0", Some(("g", 2)), 1, &[]),
    )
    .await
    .unwrap();
    wait_bound(&client, &ns, "g", 2).await;
    delete_namespace(&client, &ns).await;
}

fn invalid_gang_message(pod: &Pod) -> Option<String> {
    not_scheduled_message(pod, "InvalidGang")
}

#[tokio::test]
async fn malformed_and_conflicting_gangs_are_explained_and_never_bind() {
    let (client, ns, mut pool) = setup("sch-malformed").await;
    pool.add(&client, 1, 8).await;
    let _sched = start_scheduler(&ns, "s-malformed", &[]);
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    for (gang, raw) in [
        ("abc", "abc"),
        ("neg", "-3"),
        ("huge", "99999999999999999999999"),
    ] {
        for i in 0..2 {
            let mut p = pod(&ns, &format!("{gang}-{i}"), Some((gang, 2)), 1, &[]);
            p.annotations_mut().insert(GANG_SIZE.into(), raw.into());
            api.create(&PostParams::default(), &p).await.unwrap();
        }
    }
    // Two sets of pods under one gang label that disagree on the size.
    create_gang(&client, &ns, "mixed", 2, 1, &[]).await;
    let mut odd = pod(&ns, "mixed-x", Some(("mixed", 3)), 1, &[]);
    odd.labels_mut().insert(GANG.into(), "mixed".into());
    api.create(&PostParams::default(), &odd).await.unwrap();

    for (gang, raw) in [
        ("abc", "abc"),
        ("neg", "-3"),
        ("huge", "99999999999999999999999"),
    ] {
        wait_until(WAIT, &format!("gang {gang} explained"), || async {
            let pods = gang_pods(&client, &ns, gang).await;
            pods.len() == 2 && pods.iter().all(|p| invalid_gang_message(p).is_some())
        })
        .await;
        let message = invalid_gang_message(&gang_pods(&client, &ns, gang).await[0]).unwrap();
        assert!(
            message.contains(&format!("ringmaster.dev/gang-size={raw:?}"))
                && message.contains("not a positive integer"),
            "{message}"
        );
    }
    wait_until(WAIT, "mixed explained", || async {
        gang_pods(&client, &ns, "mixed")
            .await
            .iter()
            .all(|p| invalid_gang_message(p).is_some())
    })
    .await;
    let message = invalid_gang_message(&api.get("mixed-0").await.unwrap()).unwrap();
    assert!(
        message.contains("members disagree on ringmaster.dev/gang-size")
            && message.contains("say 2 (mixed-0, mixed-1)")
            && message.contains("say 3 (mixed-x)"),
        "{message}"
    );
    let events = Api::<Event>::namespaced(client.clone(), &ns);
    wait_until(WAIT, "InvalidGang events", || async {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        list.iter()
            .filter(|e| e.reason.as_deref() == Some("InvalidGang"))
            .count()
            >= 4
    })
    .await;
    // Room for all of them, yet nothing bound a member of a malformed gang.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for gang in ["abc", "neg", "huge", "mixed"] {
        assert_eq!(
            bound_count(&client, &ns, gang).await,
            0,
            "{gang} must not bind"
        );
    }
    // Once the gang agrees, it binds whole.
    api.delete("mixed-x", &DeleteParams::default())
        .await
        .unwrap();
    wait_bound(&client, &ns, "mixed", 2).await;
    delete_namespace(&client, &ns).await;
}

/// A pod that only a test binds (no scheduler serves its scheduler name).
fn manual_pod(ns: &str, name: &str, gpus: u32) -> Pod {
    let mut p = pod(ns, name, None, gpus, &[]);
    p.spec.as_mut().unwrap().scheduler_name = Some("manual".into());
    p
}

/// Lets kwok finish these pods (exit 0), which frees their resources.
async fn finish(client: &Client, ns: &str, names: &[String]) {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"annotations": {"ringmaster.dev/kwok-exit-code": "0"}}});
    for name in names {
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn small_gang_backfills_and_the_big_one_is_not_starved() {
    let (client, ns, mut pool) = setup("sch-backfill").await;
    pool.add(&client, 2, 8).await;
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    // Earlier work holds 4 GPUs on each node.
    for i in 0..2 {
        let filler = api
            .create(
                &PostParams::default(),
                &manual_pod(&ns, &format!("filler-{i}"), 4),
            )
            .await
            .unwrap();
        bind(&client, &filler, &format!("{ns}-n{i}")).await.unwrap();
    }
    let _sched = start_scheduler(&ns, "s-backfill", &["--starvation-threshold-seconds", "5"]);
    // The big gang needs both nodes whole; it waits.
    create_gang(&client, &ns, "big", 2, 8, &[]).await;
    wait_explained(&client, &ns, "big", 2).await;
    // A small gang that arrives later goes ahead of it (backfill).
    create_gang(&client, &ns, "small", 2, 1, &[]).await;
    wait_bound(&client, &ns, "small", 2).await;
    assert_eq!(bound_count(&client, &ns, "big").await, 0);

    // Past the threshold the big gang's nodes are reserved for it...
    wait_until(WAIT, "the big gang to reserve nodes", || async {
        gang_pods(&client, &ns, "big")
            .await
            .iter()
            .filter_map(unschedulable_message)
            .any(|m| m.contains("2 node(s) reserved for it"))
    })
    .await;
    // ...so a later small gang, which would fit in the free GPUs, waits too.
    create_gang(&client, &ns, "late", 2, 1, &[]).await;
    let message = wait_explained(&client, &ns, "late", 2).await;
    assert!(message.contains("2 untolerated taint"), "{message}");
    assert_eq!(bound_count(&client, &ns, "late").await, 0);

    // The earlier work ends; the big gang gets both nodes, before the late small gang.
    let mut done = vec!["filler-0".to_string(), "filler-1".to_string()];
    done.extend(
        gang_pods(&client, &ns, "small")
            .await
            .iter()
            .map(|p| p.name_any()),
    );
    finish(&client, &ns, &done).await;
    let big = wait_bound(&client, &ns, "big", 2).await;
    assert_disjoint_gpus(&big);
    assert_eq!(bound_count(&client, &ns, "late").await, 0, "no room left");
    delete_namespace(&client, &ns).await;
}

/// Adds labels and an `affinity` block to a pod.
fn with_affinity(mut p: Pod, labels: &[(&str, &str)], affinity: serde_json::Value) -> Pod {
    let l = p.metadata.labels.get_or_insert_default();
    for (k, v) in labels {
        l.insert(k.to_string(), v.to_string());
    }
    p.spec.as_mut().unwrap().affinity = Some(serde_json::from_value(affinity).unwrap());
    p
}

fn term(app: &str, key: &str) -> serde_json::Value {
    json!({"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": key, "labelSelector": {"matchLabels": {"app": app}}}
    ]})
}

#[tokio::test]
async fn pod_affinity_and_anti_affinity() {
    let (client, ns, mut pool) = setup("sch-affinity").await;
    pool.add(&client, 4, 8).await;
    let _sched = start_scheduler(&ns, "s-affinity", &[]);
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let create = |p: Pod| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &p).await.unwrap() }
    };
    let zone_of =
        |node: &str| -> usize { node.rsplit('n').next().unwrap().parse::<usize>().unwrap() % 2 };
    let bound_node = |name: &'static str| {
        let api = api.clone();
        async move {
            wait_until(WAIT, &format!("{name} bound"), || async {
                api.get(name).await.ok().and_then(|p| node_of(&p)).is_some()
            })
            .await;
            node_of(&api.get(name).await.unwrap()).unwrap()
        }
    };
    create(with_affinity(
        pod(&ns, "db", None, 1, &[]),
        &[("app", "db")],
        json!({}),
    ))
    .await;
    let db = bound_node("db").await;
    // Three replicas, each in db's zone and none on a node with another replica.
    let names = ["web-0", "web-1", "web-2"];
    for name in names {
        let affinity = json!({
            "podAffinity": term("db", ZONE),
            "podAntiAffinity": term("web", "kubernetes.io/hostname"),
        });
        create(with_affinity(
            pod(&ns, name, None, 1, &[]),
            &[("app", "web")],
            affinity,
        ))
        .await;
    }
    let mut web_nodes = BTreeSet::new();
    for name in names.iter().take(2) {
        let node = bound_node(name).await;
        assert_eq!(zone_of(&node), zone_of(&db), "{name} on {node}, db on {db}");
        web_nodes.insert(node);
    }
    assert_eq!(
        web_nodes.len(),
        2,
        "one web replica per node: {web_nodes:?}"
    );
    // The zone has two nodes: the third replica has nowhere to go.
    wait_until(WAIT, "web-2 explained", || async {
        api.get("web-2")
            .await
            .ok()
            .and_then(|p| unschedulable_message(&p))
            .is_some_and(|m| m.contains("node selector/affinity mismatch"))
    })
    .await;
    assert!(node_of(&api.get("web-2").await.unwrap()).is_none());
    // An existing pod's anti-affinity keeps newcomers away from its node.
    let guard = with_affinity(
        pod(&ns, "guard", None, 1, &[]),
        &[("app", "guard")],
        json!({"podAntiAffinity": term("batch", "kubernetes.io/hostname")}),
    );
    create(guard).await;
    let guard_node = bound_node("guard").await;
    for i in 0..4 {
        let name = format!("batch-{i}");
        create(with_affinity(
            pod(&ns, &name, None, 1, &[]),
            &[("app", "batch")],
            json!({}),
        ))
        .await;
    }
    for i in 0..4 {
        let name = format!("batch-{i}");
        wait_until(WAIT, &format!("{name} bound"), || async {
            api.get(&name)
                .await
                .ok()
                .and_then(|p| node_of(&p))
                .is_some()
        })
        .await;
        let node = node_of(&api.get(&name).await.unwrap()).unwrap();
        assert_ne!(node, guard_node, "{name} next to the guard");
    }
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_failed_bind_rolls_the_whole_gang_back() {
    let (client, ns, mut pool) = setup("sch-bindfail").await;
    pool.add(&client, 1, 8).await;
    // The API server refuses to bind g-2 (and the probes): an admission policy, so one
    // member's bind fails for real while the others succeed.
    let policy = format!("deny-bind-{ns}");
    apply(&format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {policy}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
    resourceRules:
    - {{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods/binding]}}
  validations:
  - expression: "object.metadata.name != 'g-2' && !object.metadata.name.startsWith('probe')"
    message: "binding refused by the test"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {policy}}}
spec: {{policyName: {policy}, validationActions: [Deny]}}
"#
    ));
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let node = format!("{ns}-n0");
    // The policy takes effect within a second or so: probe until a bind is refused.
    let mut probe = 0;
    wait_until(WAIT, "the admission policy to refuse binds", || {
        probe += 1;
        let p = manual_pod(&ns, &format!("probe-{probe}"), 0);
        let (api, client, node) = (api.clone(), client.clone(), node.clone());
        async move {
            let p = api.create(&PostParams::default(), &p).await.unwrap();
            bind(&client, &p, &node).await.is_err()
        }
    })
    .await;

    let sched = start_scheduler(&ns, "s-bindfail", &[]);
    create_gang(&client, &ns, "g", 4, 1, &[]).await;
    let g2_uid = api.get("g-2").await.unwrap().uid();
    // Three binds succeed, one fails: the three are deleted, g-2 stays unbound.
    wait_until(WAIT, "the bound members rolled back", || async {
        let pods = gang_pods(&client, &ns, "g").await;
        let gone = ["g-0", "g-1", "g-3"].iter().all(|name| {
            pods.iter()
                .find(|p| p.name_any() == *name)
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        });
        gone && !pods.is_empty()
    })
    .await;
    let g2 = api.get("g-2").await.unwrap();
    assert!(node_of(&g2).is_none(), "g-2 was bound");
    assert_eq!(g2.uid(), g2_uid, "g-2 is the original pod");
    let (_, metrics) = sched.get("/metrics").await.expect("metrics");
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringmaster_scheduler_bind_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{metrics}");
    assert!(metrics.contains("result=\"bind_error\""), "{metrics}");

    // Without the policy, the recreated members and g-2 bind whole.
    let _ = kubectl()
        .args([
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            &policy,
        ])
        .stdout(Stdio::null())
        .status();
    wait_until(WAIT, "the admission policy gone", || {
        probe += 1;
        let p = manual_pod(&ns, &format!("probe-{probe}"), 0);
        let (api, client, node) = (api.clone(), client.clone(), node.clone());
        async move {
            let p = api.create(&PostParams::default(), &p).await.unwrap();
            bind(&client, &p, &node).await.is_ok()
        }
    })
    .await;
    // Standing in for a controller: the deleted members come back.
    for name in ["g-0", "g-1", "g-3"] {
        wait_until(WAIT, &format!("{name} deleted"), || async {
            api.get_opt(name).await.ok().flatten().is_none()
        })
        .await;
        let p = pod(&ns, name, Some(("g", 4)), 1, &[]);
        api.create(&PostParams::default(), &p).await.unwrap();
    }
    let pods = wait_bound(&client, &ns, "g", 4).await;
    assert_disjoint_gpus(&pods);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn impossible_training_job_is_scheduled_false_with_the_explanation() {
    use ringmaster_crds::{TrainingJob, find_condition};
    let (client, ns, mut pool) = setup("sch-tj").await;
    pool.add(&client, 1, 8).await;
    let _operator = ServedProcess::start(
        env!("CARGO_BIN_EXE_ringmaster-operator"),
        &ns,
        &["--identity", "op-tj"],
    );
    let _sched = start_scheduler(&ns, "s-tj", &[]);
    let job: TrainingJob = serde_yaml::from_str(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {name: huge}
spec:
  model: {architecture: bert, source: /models/minilm, labels: [ham, spam]}
  data: {train: /data/train.csv, format: csv}
  distribution: {workers: 2, gpusPerWorker: 9}
"#,
    )
    .unwrap();
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    wait_until(
        WAIT,
        "Scheduled=False with the scheduler's message",
        || async {
            jobs.get("huge").await.ok().is_some_and(|j| {
                j.status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Scheduled"))
                    .is_some_and(|c| c.status == "False" && c.reason == "Unschedulable")
            })
        },
    )
    .await;
    // The job mirrors its pods' latest explanation; nodes other tests add meanwhile change
    // the counts in it, so compare once the mirror has caught up.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let scheduled_message = || async {
        let job = jobs.get("huge").await.ok()?;
        let condition = find_condition(&job.status.as_ref()?.conditions, "Scheduled")?;
        Some(condition.message.clone())
    };
    let pod_message = || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        list.items.iter().find_map(unschedulable_message)
    };
    wait_until(
        WAIT,
        "the job's Scheduled message equal to its pod's",
        || async {
            let (job, pod) = (scheduled_message().await, pod_message().await);
            job.is_some() && job == pod
        },
    )
    .await;
    let m = &scheduled_message().await.expect("explained");
    assert!(m.contains("(2 pods) does not fit"), "{m}");
    assert!(m.contains("nodes are available"), "{m}");
    assert!(m.contains("not enough free GPU on any device"), "{m}");
    delete_namespace(&client, &ns).await;
}
