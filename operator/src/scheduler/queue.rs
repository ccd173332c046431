//! Pending pods grouped into gangs, in scheduling order, and the retry backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use ringmaster_crds::keys::{GANG, GANG_SIZE};

/// A gang's identity: namespace and gang label (a pod without one is its own gang).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GangKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for GangKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug)]
pub struct Gang {
    pub key: GangKey,
    /// Members waiting for a node, in name order.
    pub pending: Vec<Arc<Pod>>,
    /// Members already bound (only non-empty for half-bound gangs).
    pub bound: Vec<Arc<Pod>>,
    pub size: usize,
    pub priority: i32,
    pub created: Option<Timestamp>,
    /// Why the gang's annotations cannot be honoured (nothing of it binds until fixed).
    pub invalid: Option<String>,
}

impl Gang {
    /// Every member exists, none is gated, none is bound, the keys agree: ready to place.
    pub fn ready(&self) -> bool {
        self.invalid.is_none() && self.bound.is_empty() && self.pending.len() >= self.size
    }

    /// Some members bound, others waiting: it would hold devices without running.
    pub fn half_bound(&self) -> bool {
        self.invalid.is_none() && !self.bound.is_empty() && !self.pending.is_empty()
    }
}

/// What one member says the gang's size is.
#[derive(Debug, Clone, PartialEq)]
enum DeclaredSize {
    Valid(usize),
    /// Missing, or not a positive integer: the raw text.
    Invalid(Option<String>),
}

fn declared_size(pod: &Pod) -> DeclaredSize {
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GANG_SIZE))
    {
        None => DeclaredSize::Invalid(None),
        Some(raw) => match raw.trim().parse::<usize>() {
            Ok(size) if size > 0 => DeclaredSize::Valid(size),
            _ => DeclaredSize::Invalid(Some(raw.clone())),
        },
    }
}

/// The first inconsistency among a gang's members: an annotation that is not a positive
/// integer, members that disagree on the size, more members than the size.
fn inconsistency(members: &[(&str, DeclaredSize)]) -> Option<String> {
    if let Some((pod, DeclaredSize::Invalid(raw))) = members
        .iter()
        .find(|(_, d)| matches!(d, DeclaredSize::Invalid(_)))
    {
        return Some(match raw {
            None => format!("pod {pod} has the {GANG} label but no {GANG_SIZE} annotation"),
            Some(raw) => {
                format!("pod {pod} has {GANG_SIZE}={raw:?}, which is not a positive integer")
            }
        });
    }
    let mut sizes: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (pod, declared) in members {
        if let DeclaredSize::Valid(size) = declared {
            sizes.entry(*size).or_default().push(pod);
        }
    }
    if sizes.len() > 1 {
        let says: Vec<String> = sizes
            .iter()
            .map(|(size, pods)| format!("{} say {size} ({})", pods.len(), pods.join(", ")))
            .collect();
        return Some(format!(
            "members disagree on {GANG_SIZE}: {}",
            says.join("; ")
        ));
    }
    let size = *sizes.keys().next()?;
    (members.len() > size).then(|| {
        format!(
            "{} pods carry this gang label but {GANG_SIZE} is {size}",
            members.len()
        )
    })
}

/// Is this pod waiting for us: our scheduler name, no node, not gated, not going away?
pub fn is_pending(pod: &Pod, scheduler: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.scheduler_name.as_deref() == Some(scheduler)
        && spec.node_name.is_none()
        && spec.scheduling_gates.as_ref().is_none_or(|g| g.is_empty())
        && pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_none_or(|p| p == "Pending")
}

fn gang_key(pod: &Pod) -> (GangKey, bool) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    match pod.metadata.labels.as_ref().and_then(|l| l.get(GANG)) {
        Some(gang) => (
            GangKey {
                namespace,
                name: gang.clone(),
            },
            true,
        ),
        None => (
            GangKey {
                namespace,
                name: pod.metadata.name.clone().unwrap_or_default(),
            },
            false,
        ),
    }
}

/// Groups our pods into gangs, highest priority first, then oldest, then by name.
/// `pods` is every pod we see; only those in `namespace` (None: all) are scheduled.
pub fn gangs<'a>(
    pods: impl IntoIterator<Item = &'a Arc<Pod>>,
    scheduler: &str,
    namespace: Option<&str>,
) -> Vec<Gang> {
    let mut by_key: BTreeMap<GangKey, Gang> = BTreeMap::new();
    let mut declared: HashMap<GangKey, Vec<(&str, DeclaredSize)>> = HashMap::new();
    for pod in pods {
        let ours = pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()) == Some(scheduler);
        if !ours || namespace.is_some_and(|ns| pod.metadata.namespace.as_deref() != Some(ns)) {
            continue;
        }
        let pending = is_pending(pod, scheduler);
        let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
            && super::cache::holds_resources(pod)
            && pod.metadata.deletion_timestamp.is_none();
        if !pending && !bound {
            continue;
        }
        let (key, labelled) = gang_key(pod);
        let size = if labelled {
            let size = declared_size(pod);
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            declared
                .entry(key.clone())
                .or_default()
                .push((name, size.clone()));
            match size {
                DeclaredSize::Valid(size) => size,
                DeclaredSize::Invalid(_) => 1,
            }
        } else {
            1
        };
        let gang = by_key.entry(key.clone()).or_insert_with(|| Gang {
            key,
            pending: Vec::new(),
            bound: Vec::new(),
            size,
            priority: i32::MIN,
            created: None,
            invalid: None,
        });
        gang.size = gang.size.max(size);
        if pending {
            gang.pending.push(pod.clone());
            gang.priority = gang
                .priority
                .max(pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0));
            let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
            gang.created = match (gang.created, created) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        } else {
            gang.bound.push(pod.clone());
        }
    }
    let mut out: Vec<Gang> = by_key
        .into_values()
        .filter(|g| !g.pending.is_empty())
        .collect();
    for g in &mut out {
        g.pending
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        if let Some(members) = declared.get_mut(&g.key) {
            members.sort_by(|a, b| a.0.cmp(b.0));
            g.invalid = inconsistency(members);
        }
    }
    out.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created.cmp(&b.created))
            .then(a.key.cmp(&b.key))
    });
    out
}

/// Exponential retry delay per gang; cleared when the cluster gains room.
#[derive(Debug, Default)]
pub struct Backoff {
    next: HashMap<GangKey, (Instant, u32)>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);

    pub fn waiting(&self, key: &GangKey, now: Instant) -> bool {
        self.next.get(key).is_some_and(|(at, _)| *at > now)
    }

    pub fn failed(&mut self, key: &GangKey, now: Instant) {
        let entry = self.next.entry(key.clone()).or_insert((now, 0));
        let delay = Self::FIRST
            .saturating_mul(1 << entry.1.min(10))
            .min(Self::MAX);
        *entry = (now + delay, entry.1 + 1);
    }

    pub fn succeeded(&mut self, key: &GangKey) {
        self.next.remove(key);
    }

    /// A node was added or a pod went away: every waiting gang may fit now.
    pub fn reset(&mut self) {
        self.next.clear();
    }

    /// The soonest time a waiting gang may be retried.
    pub fn next_due(&self) -> Option<Instant> {
        self.next.values().map(|(at, _)| *at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(
        name: &str,
        gang: Option<(&str, usize)>,
        priority: i32,
        created: &str,
        node: Option<&str>,
    ) -> Arc<Pod> {
        let mut yaml =
            format!("metadata: {{name: {name}, namespace: ns, creationTimestamp: '{created}'");
        if let Some((g, size)) = gang {
            yaml += &format!(
                ", labels: {{ringmaster.dev/gang: {g}}}, annotations: {{ringmaster.dev/gang-size: '{size}'}}"
            );
        }
        yaml += &format!("}}\nspec: {{schedulerName: rs, priority: {priority}, containers: []");
        if let Some(n) = node {
            yaml += &format!(", nodeName: {n}");
        }
        yaml += "}";
        Arc::new(serde_yaml::from_str(&yaml).unwrap())
    }

    #[test]
    fn gangs_group_order_and_completeness() {
        let pods = vec![
            pod("solo", None, 0, "2026-01-01T00:00:00Z", None),
            pod("a-1", Some(("a", 2)), 0, "2026-01-01T00:00:01Z", None),
            pod("a-0", Some(("a", 2)), 0, "2026-01-01T00:00:02Z", None),
            pod("b-0", Some(("b", 3)), 5, "2026-01-01T00:00:03Z", None),
            pod("c-0", Some(("c", 2)), 0, "2025-01-01T00:00:00Z", None),
            pod("c-1", Some(("c", 2)), 0, "2025-01-01T00:00:00Z", Some("n")),
        ];
        let gangs = gangs(&pods, "rs", None);
        let names: Vec<_> = gangs.iter().map(|g| g.key.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "solo", "a"]);
        assert!(!gangs[0].ready(), "b has 1 of 3 members");
        assert!(!gangs[1].ready(), "c is half bound");
        assert!(gangs[2].ready() && gangs[3].ready());
        assert_eq!(gangs[3].pending[0].metadata.name.as_deref(), Some("a-0"));
        assert!(super::gangs(&pods, "other", None).is_empty());
        assert!(super::gangs(&pods, "rs", Some("elsewhere")).is_empty());
    }

    fn with_size(pod: Arc<Pod>, raw: Option<&str>) -> Arc<Pod> {
        let mut pod = (*pod).clone();
        let notes = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        match raw {
            Some(raw) => notes.insert(GANG_SIZE.into(), raw.into()),
            None => notes.remove(GANG_SIZE),
        };
        Arc::new(pod)
    }

    fn only_gang(pods: &[Arc<Pod>]) -> Gang {
        let mut gangs = gangs(pods, "rs", None);
        assert_eq!(gangs.len(), 1);
        gangs.remove(0)
    }

    #[test]
    fn a_size_that_is_not_a_positive_integer_blocks_the_gang_and_names_the_value() {
        for raw in ["abc", "-3", "0", "99999999999999999999999", "2.5"] {
            let pods = vec![
                with_size(
                    pod("g-0", Some(("g", 2)), 0, "2026-01-01T00:00:00Z", None),
                    Some(raw),
                ),
                with_size(
                    pod("g-1", Some(("g", 2)), 0, "2026-01-01T00:00:00Z", None),
                    Some(raw),
                ),
            ];
            let gang = only_gang(&pods);
            assert!(
                !gang.ready(),
                "{raw}: a malformed gang must not bind one by one"
            );
            let why = gang.invalid.expect("explained");
            assert!(
                why.contains(GANG_SIZE) && why.contains(&format!("{raw:?}")) && why.contains("g-0"),
                "{why}"
            );
        }
        let missing = vec![with_size(
            pod("g-0", Some(("g", 2)), 0, "2026-01-01T00:00:00Z", None),
            None,
        )];
        let why = only_gang(&missing).invalid.unwrap();
        assert!(
            why.contains("no ringmaster.dev/gang-size annotation"),
            "{why}"
        );
    }

    #[test]
    fn members_that_disagree_or_overflow_the_size_are_explained() {
        let t = "2026-01-01T00:00:00Z";
        let disagree = vec![
            pod("g-0", Some(("g", 2)), 0, t, None),
            pod("g-1", Some(("g", 2)), 0, t, None),
            pod("g-2", Some(("g", 3)), 0, t, None),
        ];
        let gang = only_gang(&disagree);
        assert!(!gang.ready());
        assert_eq!(
            gang.invalid.as_deref(),
            Some("members disagree on ringmaster.dev/gang-size: 2 say 2 (g-0, g-1); 1 say 3 (g-2)")
        );
        let overflow = vec![
            pod("g-0", Some(("g", 2)), 0, t, None),
            pod("g-1", Some(("g", 2)), 0, t, Some("n")),
            pod("g-2", Some(("g", 2)), 0, t, None),
        ];
        let gang = only_gang(&overflow);
        assert!(
            !gang.ready() && !gang.half_bound(),
            "invalid gangs are explained, not repaired"
        );
        assert_eq!(
            gang.invalid.as_deref(),
            Some("3 pods carry this gang label but ringmaster.dev/gang-size is 2")
        );
        let consistent = vec![
            pod("g-0", Some(("g", 2)), 0, t, None),
            pod("g-1", Some(("g", 2)), 0, t, Some("n")),
        ];
        let gang = only_gang(&consistent);
        assert!(gang.invalid.is_none() && gang.half_bound() && !gang.ready());
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::default();
        let k = GangKey {
            namespace: "n".into(),
            name: "g".into(),
        };
        let t = Instant::now();
        b.failed(&k, t);
        assert!(b.waiting(&k, t + Duration::from_millis(400)));
        assert!(!b.waiting(&k, t + Duration::from_millis(600)));
        b.failed(&k, t);
        assert!(b.waiting(&k, t + Duration::from_millis(900)));
        b.reset();
        assert!(!b.waiting(&k, t));
    }
}
