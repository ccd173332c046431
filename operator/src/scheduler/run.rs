//! Wiring: watches, the scheduling loop, leader election, and the health/metrics server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use ringmaster_placement::gorand::GoRand;
use ringmaster_placement::policy::{self, FragModel};
use ringmaster_placement::{
    ClusterState, GangPlacement, GangRequest, Placer, Scorer, place_gang_on,
};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use crate::memory;
use crate::serve::{Endpoints, serve, shutdown_signal, until_leading};

use super::affinity::{self, PlacedPod};
use super::cache::{self, Assumed};
use super::metrics::Metrics;
use super::queue::{self, Backoff, Gang};
use super::reserve::{self, Starvation};
use super::{Result, bind, explain};

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pods whose `spec.schedulerName` is this are ours.
    pub scheduler_name: String,
    /// Schedule pods of one namespace only (None: all). Every namespace is still
    /// watched, because any bound pod takes room on its node.
    pub namespace: Option<String>,
    pub listen: SocketAddr,
    pub identity: String,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// Policy for gangs without `placement: spread`.
    pub policy: String,
    /// How long a gang may wait while smaller ones go ahead before nodes are reserved
    /// for it.
    pub starvation_threshold: Duration,
    /// Gangs bound at the same time (each binds its members concurrently).
    pub bind_concurrency: usize,
}

/// Runs until SIGTERM/SIGINT or lost leadership. Only the lease holder schedules.
pub async fn run(client: Client, settings: Settings) -> Result<()> {
    // Fail at start, not at the first gang, on a misspelt policy.
    policy::by_name(
        &settings.policy,
        &FragModel::from_workload(&[]),
        GoRand::new(1),
    )?;
    let metrics = Metrics::new();
    let endpoints = Endpoints::new({
        let metrics = metrics.clone();
        move || metrics.render()
    });
    let server = tokio::spawn(serve(settings.listen, endpoints.clone()));
    let trimmer = memory::spawn_trimmer();

    let lease_secs = settings.lease_duration.as_secs().max(1);
    let lease = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(lease_secs)
        .with_grace(lease_secs.div_ceil(3))
        .build()
        .await?;
    let (mut leader, lease_task) = lease.watch().await;
    let mut shutdown = Box::pin(shutdown_signal());

    info!(identity = %settings.identity, "waiting for leadership");
    if !until_leading(&mut leader, &mut shutdown).await {
        server.abort();
        trimmer.abort();
        return Ok(());
    }
    info!(identity = %settings.identity, "leading: scheduling");

    let wake = Arc::new(Notify::new());
    let room = Arc::new(AtomicBool::new(false));
    let (nodes, node_writer) = reflector::store::<KubeNode>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let node_stream = watcher(
        Api::<KubeNode>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|node| node.managed_fields_mut().clear())
    .reflect(node_writer);
    // Finished pods leave the watch (a Delete event): they hold no resources.
    let pod_stream = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
    )
    .default_backoff()
    // managedFields are a third of a pod object and nothing here reads them.
    .modify(|pod| pod.managed_fields_mut().clear())
    .reflect(pod_writer);
    let watches = tokio::spawn(drive_watches(
        node_stream,
        pod_stream,
        wake.clone(),
        room.clone(),
    ));
    nodes.wait_until_ready().await.ok();
    pods.wait_until_ready().await.ok();
    // A leader that was killed a moment ago may have binds still landing; let the watch
    // show them before the first pass places those gangs a second time.
    tokio::time::sleep(TAKEOVER_SETTLE).await;

    let mut scheduler = Scheduler {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: settings.scheduler_name.clone(),
                instance: Some(settings.identity.clone()),
            },
        ),
        client,
        nodes,
        pods,
        assumed: HashMap::new(),
        backoff: Backoff::default(),
        starvation: Starvation::default(),
        half_bound_since: HashMap::new(),
        metrics,
        settings,
    };
    endpoints.set_ready(true);

    loop {
        if room.swap(false, Ordering::Relaxed) {
            scheduler.backoff.reset();
        }
        scheduler.pass().await;
        let due = scheduler
            .backoff
            .next_due()
            .map_or(Duration::from_secs(5), |at| {
                at.saturating_duration_since(Instant::now())
            });
        // A partly bound gang is looked at again when its grace ends.
        let due = if scheduler.half_bound_since.is_empty() {
            due
        } else {
            due.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = &mut shutdown => { info!("shutting down"); break; }
            changed = leader.changed() => if changed.is_err() || !*leader.borrow() {
                warn!("lost leadership: stopping");
                break;
            },
            _ = wake.notified() => {
                // Let a burst of watch events settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(due.max(Duration::from_millis(20))) => {}
        }
    }

    endpoints.set_ready(false);
    watches.abort();
    drop(lease_task); // dropping the task handle leaves the lease to expire or be released
    server.abort();
    trimmer.abort();
    Ok(())
}

/// Drives both reflectors; wakes the loop on any change, and flags `room` when a new
/// node appears or a pod goes away (gangs in backoff may fit now).
async fn drive_watches(
    nodes: impl futures::Stream<Item = watcher::Result<watcher::Event<KubeNode>>> + Send,
    pods: impl futures::Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send,
    wake: Arc<Notify>,
    room: Arc<AtomicBool>,
) {
    // Heartbeats change nothing; a new node or one turning Ready does.
    let mut known = HashMap::new();
    let nodes = nodes.map(move |event| {
        event.map(|event| match event {
            watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                let ready = cache::node_from_kube(&n).is_some();
                known.insert(n.name_any(), ready) != Some(ready)
            }
            watcher::Event::Delete(_) => true,
            watcher::Event::Init | watcher::Event::InitDone => false,
        })
    });
    let pods = pods.map(|event| event.map(|e| matches!(e, watcher::Event::Delete(_))));
    let mut events = futures::stream::select(nodes.boxed(), pods.boxed());
    while let Some(event) = events.next().await {
        match event {
            Ok(gained_room) => {
                if gained_room {
                    room.store(true, Ordering::Relaxed);
                }
                wake.notify_one();
            }
            Err(e) => warn!(error = %e, "watch error"),
        }
    }
}

struct Scheduler {
    client: Client,
    nodes: Store<KubeNode>,
    pods: Store<Pod>,
    /// Placements by pod uid that the watch has not shown bound yet.
    assumed: HashMap<String, Assumed>,
    backoff: Backoff,
    starvation: Starvation,
    /// When each gang was first seen partly bound (see `tend_broken`).
    half_bound_since: HashMap<queue::GangKey, Instant>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    settings: Settings,
}

/// A gang placed in this pass, being bound.
struct Placed {
    gang: Gang,
    request: GangRequest,
    placement: GangPlacement,
    /// What each bind writes onto its pod, in assignment order.
    annotations: Vec<BTreeMap<String, String>>,
}

impl Scheduler {
    /// One pass over the queue: every ready gang not in backoff, in order. A gang that
    /// does not fit does not block smaller ones behind it (backfill) until it has waited
    /// the starvation threshold; then the nodes it would use are reserved for it.
    /// Placement is sequential (each gang sees the ones before it); binds run
    /// concurrently, up to `bind_concurrency` gangs at a time, while placement goes on.
    async fn pass(&mut self) {
        let pods = self.pods.state();
        let nodes = self.nodes.state();
        let live: HashMap<&str, &Pod> = pods
            .iter()
            .filter_map(|p| Some((p.metadata.uid.as_deref()?, &**p)))
            .collect();
        self.assumed.retain(|uid, _| {
            live.get(uid.as_str())
                .is_some_and(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
        });
        let mut state = cache::build_state(
            nodes.iter().map(|n| &**n),
            pods.iter().map(|p| &**p),
            &self.assumed,
        );
        let capacity = state.gpu_capacity_milli();
        if capacity > 0 {
            self.metrics
                .gpu_allocation
                .set(state.gpu_used_milli() as f64 / capacity as f64);
        }
        let gangs = queue::gangs(
            &pods,
            &self.settings.scheduler_name,
            self.settings.namespace.as_deref(),
        );
        self.metrics.queue_depth.set(gangs.len() as i64);
        self.tend_broken(&gangs).await;
        self.starvation
            .retain(&gangs.iter().map(|g| &g.key).collect::<HashSet<_>>());
        self.starvation.apply(&mut state);
        self.metrics
            .reserving_gangs
            .set(self.starvation.reserving() as i64);
        let now = Instant::now();
        let ready: Vec<&Gang> = gangs
            .iter()
            .filter(|g| g.ready() && !self.backoff.waiting(&g.key, now))
            // Bound by us, but the watch has not shown it yet: not pending any more.
            .filter(|g| {
                !g.pending.iter().any(|p| {
                    p.metadata
                        .uid
                        .as_ref()
                        .is_some_and(|uid| self.assumed.contains_key(uid))
                })
            })
            .collect();
        if ready.is_empty() {
            return;
        }
        // FGD and fragpack score against the shapes of the running workload.
        let workload: Vec<_> = pods
            .iter()
            .filter(|p| cache::holds_resources(p))
            .map(|p| cache::pod_request(p))
            .collect();
        let typical = FragModel::from_workload(&workload);
        let mut placed_pods: Vec<PlacedPod> = pods
            .iter()
            .filter(|p| cache::holds_resources(p))
            .filter_map(|p| {
                let node = p.spec.as_ref()?.node_name.clone().or_else(|| {
                    self.assumed
                        .get(p.metadata.uid.as_deref()?)
                        .map(|a| a.node.clone())
                })?;
                Some(PlacedPod::new(p, &node))
            })
            .collect();
        let empty_nodes: Vec<_> = nodes
            .iter()
            .filter_map(|n| cache::node_from_kube(n))
            .collect();
        let requests: Vec<(GangRequest, String)> = ready
            .iter()
            .map(|gang| {
                cache::gang_request(&gang.key.to_string(), &gang.pending, &self.settings.policy)
            })
            .collect();
        let mut scorers: HashMap<String, Box<dyn Scorer>> = HashMap::new();
        for (_, policy) in &requests {
            if scorers.contains_key(policy) {
                continue;
            }
            match policy::by_name(policy, &typical, GoRand::new(1)) {
                Ok(s) => {
                    scorers.insert(policy.clone(), s);
                }
                Err(e) => warn!(policy, error = %e, "unknown policy"),
            }
        }
        // One placer per policy for the whole pass: scores of nodes no gang changed are
        // reused from gang to gang.
        let mut placers: HashMap<&str, Placer> = scorers
            .iter()
            .map(|(policy, scorer)| (policy.as_str(), Placer::new(scorer.as_ref())))
            .collect();
        let permits = Arc::new(Semaphore::new(self.settings.bind_concurrency.max(1)));
        let mut binding = Vec::new();
        let mut unschedulable = Vec::new();
        for (gang, (mut request, policy)) in ready.into_iter().zip(requests) {
            for (member, pod) in request.members.iter_mut().zip(&gang.pending) {
                affinity::constrain(member, pod, &placed_pods, &state);
            }
            reserve::tolerate_own(&mut request, &gang.key);
            let Some(placer) = placers.get_mut(policy.as_str()) else {
                continue;
            };
            let started = Instant::now();
            let decision = place_gang_on(&mut state, &request, placer);
            self.metrics
                .decision
                .observe(started.elapsed().as_secs_f64());
            match decision {
                Ok(placement) => {
                    self.starvation.placed(&gang.key);
                    for a in &placement.assignments {
                        let pod = &gang.pending[a.member];
                        placed_pods.push(PlacedPod::new(pod, &a.node_name));
                        if let Some(uid) = pod.metadata.uid.clone() {
                            let assumed = Assumed {
                                node: a.node_name.clone(),
                                gpus: a.gpus.clone(),
                            };
                            self.assumed.insert(uid, assumed);
                        }
                    }
                    let annotations = placement
                        .assignments
                        .iter()
                        .map(|a| bind::binding_annotations(&a.gpus, &state.node(a.node).labels))
                        .collect();
                    let placed = Placed {
                        gang: gang.clone(),
                        request,
                        placement,
                        annotations,
                    };
                    let (client, permits) = (self.client.clone(), permits.clone());
                    binding.push(tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        let results = bind_gang(&client, &placed).await;
                        (placed, results)
                    }));
                }
                Err(why) => {
                    let waited = self.starvation.blocked(&gang.key, now);
                    let mut why = why.to_string();
                    if waited >= self.settings.starvation_threshold {
                        why += &self.reserve(&state, &empty_nodes, gang, &request, placer.scorer());
                        self.starvation.apply(&mut state);
                    }
                    unschedulable.push((gang, why));
                }
            }
        }
        self.metrics
            .reserving_gangs
            .set(self.starvation.reserving() as i64);
        for (gang, _) in &unschedulable {
            self.metrics.attempt("unschedulable");
            self.backoff.failed(&gang.key, Instant::now());
        }
        futures::stream::iter(
            unschedulable
                .iter()
                .map(|(gang, why)| self.report(gang, why)),
        )
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
        for task in binding {
            let Ok((placed, results)) = task.await else {
                continue;
            };
            if self.finish_bind(&placed, &results).await {
                self.backoff.succeeded(&placed.gang.key);
                self.metrics.attempt("bound");
            } else {
                self.backoff.failed(&placed.gang.key, Instant::now());
                self.metrics.attempt("bind_error");
            }
        }
    }

    /// Reserves the nodes a starving gang would use (see `reserve`); returns the words
    /// added to its explanation.
    fn reserve(
        &mut self,
        state: &ClusterState,
        empty_nodes: &[ringmaster_placement::Node],
        gang: &Gang,
        request: &GangRequest,
        scorer: &dyn Scorer,
    ) -> String {
        let previous = self
            .starvation
            .reservation(&gang.key)
            .map(<[String]>::to_vec);
        let taken = self.starvation.held_by_others(&gang.key);
        let chosen = reserve::nodes_to_reserve(
            state,
            empty_nodes,
            request,
            scorer,
            previous.as_deref(),
            &taken,
        );
        drop(taken);
        match chosen {
            Some(nodes) => {
                if previous.as_deref() != Some(&nodes) {
                    info!(gang = %gang.key, nodes = ?nodes, "starving: reserving nodes");
                }
                let text = format!(
                    "; waited past the starvation threshold: {} node(s) reserved for it ({})",
                    nodes.len(),
                    nodes.join(", ")
                );
                self.starvation.set_reservation(&gang.key, nodes);
                text
            }
            None => {
                self.starvation.set_reservation(&gang.key, Vec::new());
                "; it would not fit even on empty nodes, so nothing is reserved for it".into()
            }
        }
    }

    /// Records a gang's bind outcome. On any failure deletes the members that were
    /// bound, so no gang runs partially. Returns whether all were bound.
    async fn finish_bind(&mut self, placed: &Placed, results: &[Result<()>]) -> bool {
        let Placed {
            gang,
            request,
            placement,
            annotations: _,
        } = placed;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed == 0 {
            let now = k8s_openapi::jiff::Timestamp::now();
            for pod in &gang.pending {
                if let Some(created) = &pod.metadata.creation_timestamp {
                    let age = now.duration_since(created.0).as_secs_f64().max(0.0);
                    self.metrics.pod_latency.observe(age);
                }
            }
            if let Some(created) = gang.created {
                let age = now.duration_since(created).as_secs_f64().max(0.0);
                self.metrics.gang_latency.observe(age);
            }
            info!(gang = %gang.key, pods = request.members.len(), domain = ?placement.domain, "bound");
            return true;
        }
        self.metrics.bind_failures.inc_by(failed as u64);
        if results
            .iter()
            .all(|r| r.as_ref().err().is_none_or(bind::already_bound))
        {
            // A leader that died mid-bind (or whose binds landed after we read) placed
            // these members already: deleting the ones we bound would fail a gang that
            // is, or is about to be, whole. Whatever is left partly bound is rolled back
            // by `tend_broken` after its grace.
            warn!(gang = %gang.key, failed, "members were already bound by a previous leader: keeping the gang");
            for (a, r) in placement.assignments.iter().zip(results) {
                if r.is_err()
                    && let Some(uid) = gang.pending[a.member].metadata.uid.as_deref()
                {
                    self.assumed.remove(uid);
                }
            }
            return true;
        }
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        warn!(gang = %gang.key, failed, errors = ?errors, "bind failed: rolling the gang back");
        let bound = placement
            .assignments
            .iter()
            .zip(results)
            .filter(|(_, r)| r.is_ok())
            .map(|(a, _)| &*gang.pending[a.member]);
        self.delete_members(&gang.key, bound).await;
        for a in &placement.assignments {
            if let Some(uid) = gang.pending[a.member].metadata.uid.as_deref() {
                self.assumed.remove(uid);
            }
        }
        false
    }

    /// Tells each member why the gang waits, and emits one Event per new explanation.
    async fn report(&self, gang: &Gang, why: &impl std::fmt::Display) {
        let message = explain::message(&gang.key.to_string(), gang.size, why);
        let reason = explain::UNSCHEDULABLE;
        self.tell(
            &gang.pending,
            &gang.key,
            reason,
            "FailedScheduling",
            &message,
        )
        .await;
    }

    /// Gangs no placement can help: inconsistent keys are explained (nothing binds until
    /// they agree); partly bound gangs (a leader died between binds, a member was deleted
    /// and recreated) are rolled back so that they are placed whole again. Runs on every
    /// pass, so a gang is repaired whenever it breaks, not only at a leader change.
    ///
    /// A gang is rolled back only once it has stayed partly bound for `HALF_BOUND_GRACE`:
    /// the binds of a leader that just died may still be landing, and deleting members
    /// of a gang that is about to be whole would fail a running job for nothing.
    async fn tend_broken(&mut self, gangs: &[Gang]) {
        let now = Instant::now();
        let mut still_half_bound = HashMap::new();
        for gang in gangs {
            if let Some(why) = &gang.invalid {
                let message = explain::invalid_message(&gang.key.to_string(), why);
                let reason = explain::INVALID_GANG;
                self.tell(&gang.pending, &gang.key, reason, reason, &message)
                    .await;
            } else if gang.half_bound() && !self.binding_now(gang) {
                let since = self.half_bound_since.get(&gang.key).copied().unwrap_or(now);
                if now.duration_since(since) >= HALF_BOUND_GRACE {
                    self.roll_back(gang).await;
                } else {
                    still_half_bound.insert(gang.key.clone(), since);
                }
            }
        }
        self.half_bound_since = still_half_bound;
    }

    /// Has this scheduler bound members of `gang` that the watch shows unbound yet?
    fn binding_now(&self, gang: &Gang) -> bool {
        gang.pending.iter().any(|p| {
            p.metadata
                .uid
                .as_ref()
                .is_some_and(|uid| self.assumed.contains_key(uid))
        })
    }

    async fn roll_back(&self, gang: &Gang) {
        warn!(gang = %gang.key, bound = gang.bound.len(), pending = gang.pending.len(), "partly bound gang: rolling back");
        self.metrics.attempt("rolled_back");
        self.delete_members(&gang.key, gang.bound.iter().map(|p| &**p))
            .await;
        let message = explain::rollback_message(&gang.key.to_string(), gang.size, gang.bound.len());
        let reason = explain::UNSCHEDULABLE;
        self.tell(&gang.pending, &gang.key, reason, "GangRolledBack", &message)
            .await;
    }

    /// Deletes bound members of a gang that cannot stay (UID precondition: a recreated
    /// pod of the same name is left alone), `BINDS_IN_FLIGHT` at a time; their
    /// controller recreates them and the gang is placed whole.
    async fn delete_members(&self, gang: &queue::GangKey, pods: impl Iterator<Item = &Pod>) {
        let deletes: Vec<_> = pods
            .map(|pod| async move {
                if let Err(e) = bind::delete(&self.client, pod).await {
                    warn!(%gang, pod = %pod.name_any(), error = %e, "could not delete a bound member");
                }
            })
            .collect();
        futures::stream::iter(deletes)
            .buffer_unordered(BINDS_IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
    }

    /// Sets `PodScheduled=False` on the members that do not say this yet; one Event and
    /// one log line when any did not.
    async fn tell(
        &self,
        members: &[Arc<Pod>],
        gang: &queue::GangKey,
        reason: &str,
        event_reason: &str,
        message: &str,
    ) {
        let stale: Vec<&Arc<Pod>> = members
            .iter()
            .filter(|p| !explain::already_says(p, reason, message))
            .collect();
        let Some(first) = stale.first() else {
            return;
        };
        info!(gang = %gang, reason, %message, "not scheduled");
        for pod in &stale {
            if let Err(e) = bind::not_scheduled(&self.client, pod, reason, message).await {
                warn!(pod = %pod.name_any(), error = %e, "could not set PodScheduled=False");
            }
        }
        let event = Event {
            type_: EventType::Warning,
            reason: event_reason.into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Scheduling".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &first.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

/// Pause between taking the lease (and the first full list) and the first pass.
const TAKEOVER_SETTLE: Duration = Duration::from_secs(1);

/// How long a gang must stay partly bound before its bound members are rolled back.
const HALF_BOUND_GRACE: Duration = Duration::from_secs(3);

/// Binds or deletes in flight per gang: a gang of thousands must not open thousands of
/// requests at once.
const BINDS_IN_FLIGHT: usize = 32;

/// Binds the members of a placed gang, `BINDS_IN_FLIGHT` at a time; one result per
/// assignment, in order.
async fn bind_gang(client: &Client, placed: &Placed) -> Vec<Result<()>> {
    // Collected first: a lazy `map` in the stream trips the compiler's Send check of
    // the spawned task (higher-ranked lifetimes of the closure).
    let binds: Vec<_> = placed
        .placement
        .assignments
        .iter()
        .zip(&placed.annotations)
        .map(|(a, annotations)| {
            bind::bind(
                client,
                &placed.gang.pending[a.member],
                &a.node_name,
                annotations.clone(),
            )
        })
        .collect();
    futures::stream::iter(binds)
        .buffered(BINDS_IN_FLIGHT)
        .collect()
        .await
}
