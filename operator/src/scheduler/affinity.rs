//! Required pod affinity and anti-affinity, turned into node-label requirements the
//! engine already filters on: "same `topologyKey` value as a matching pod" becomes
//! `topologyKey In [values]`, "not with a matching pod" becomes `topologyKey NotIn
//! [values]`. Existing pods' anti-affinity is honoured too (the symmetric rule).
//!
//! Members of one gang are placed together in one engine call, so terms between members
//! of the same gang are not enforced among them (use the required topology key for that).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, PodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use ringmaster_placement::request::{LabelOp, LabelRequirement};
use ringmaster_placement::{ClusterState, PodRequest};

/// The label every namespace carries with its own name (the only namespace label the
/// scheduler knows without watching Namespaces).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A pod that holds a node, as affinity rules see it.
#[derive(Clone, Debug)]
pub struct PlacedPod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    /// Its own required anti-affinity terms (they repel newcomers).
    pub anti_affinity: Vec<PodAffinityTerm>,
}

impl PlacedPod {
    pub fn new(pod: &Pod, node: &str) -> Self {
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node: node.to_string(),
            anti_affinity: required_terms(pod).1.to_vec(),
        }
    }
}

fn terms(t: Option<&Vec<PodAffinityTerm>>) -> &[PodAffinityTerm] {
    t.map_or(&[], Vec::as_slice)
}

/// The pod's required (affinity, anti-affinity) terms.
fn required_terms(pod: &Pod) -> (&[PodAffinityTerm], &[PodAffinityTerm]) {
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    (
        terms(
            affinity
                .and_then(|a| a.pod_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
        ),
        terms(
            affinity
                .and_then(|a| a.pod_anti_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
        ),
    )
}

/// Does `selector` select `labels`? (None selects nothing, `{}` everything.)
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    let exact = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    exact
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Does a term written on a pod in `owner_ns` cover pods in `namespace`? Empty
/// `namespaces` and no selector: the owner's namespace; an empty selector: all.
fn covers_namespace(term: &PodAffinityTerm, owner_ns: &str, namespace: &str) -> bool {
    let listed = term.namespaces.as_deref().unwrap_or_default();
    match &term.namespace_selector {
        None if listed.is_empty() => namespace == owner_ns,
        None => listed.iter().any(|n| n == namespace),
        Some(selector) => {
            listed.iter().any(|n| n == namespace)
                || selects(
                    Some(selector),
                    &BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())]),
                )
        }
    }
}

fn matches(
    term: &PodAffinityTerm,
    owner_ns: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    covers_namespace(term, owner_ns, namespace) && selects(term.label_selector.as_ref(), labels)
}

/// The `topology_key` values of the nodes holding `pods`.
fn domains<'a>(
    state: &ClusterState,
    key: &str,
    pods: impl Iterator<Item = &'a PlacedPod>,
) -> BTreeSet<String> {
    pods.filter_map(|p| {
        let node = state.node(state.index_of(&p.node).ok()?);
        node.labels.get(key).cloned()
    })
    .collect()
}

/// Adds `pod`'s required pod (anti-)affinity, and placed pods' anti-affinity against it,
/// to `request` as node-label requirements over `state`'s node labels.
pub fn constrain(request: &mut PodRequest, pod: &Pod, placed: &[PlacedPod], state: &ClusterState) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let own_labels = pod.metadata.labels.clone().unwrap_or_default();
    let (affinity, anti_affinity) = required_terms(pod);
    let mut extra = Vec::new();
    for term in affinity {
        let matching = placed
            .iter()
            .filter(|p| matches(term, namespace, &p.namespace, &p.labels));
        let values = domains(state, &term.topology_key, matching);
        // The first of a group that wants to be together may go anywhere (as in
        // kube-scheduler): nothing matches yet and the pod matches its own term.
        let first_of_group = values.is_empty()
            && !placed
                .iter()
                .any(|p| matches(term, namespace, &p.namespace, &p.labels))
            && matches(term, namespace, namespace, &own_labels);
        if !first_of_group {
            extra.push(LabelRequirement {
                key: term.topology_key.clone(),
                op: LabelOp::In(values.into_iter().collect()),
            });
        }
    }
    for term in anti_affinity {
        let matching = placed
            .iter()
            .filter(|p| matches(term, namespace, &p.namespace, &p.labels));
        let values = domains(state, &term.topology_key, matching);
        if !values.is_empty() {
            extra.push(LabelRequirement {
                key: term.topology_key.clone(),
                op: LabelOp::NotIn(values.into_iter().collect()),
            });
        }
    }
    for p in placed.iter().filter(|p| !p.anti_affinity.is_empty()) {
        for term in &p.anti_affinity {
            if matches(term, &p.namespace, namespace, &own_labels) {
                let values = domains(state, &term.topology_key, std::iter::once(p));
                if !values.is_empty() {
                    extra.push(LabelRequirement {
                        key: term.topology_key.clone(),
                        op: LabelOp::NotIn(values.into_iter().collect()),
                    });
                }
            }
        }
    }
    if extra.is_empty() {
        return;
    }
    // Node affinity terms are ORed; every one must also meet the pod rules.
    if request.affinity_terms.is_empty() {
        request.affinity_terms.push(extra);
    } else {
        for term in &mut request.affinity_terms {
            term.extend(extra.iter().cloned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_placement::{GpuDemand, Node};

    fn state() -> ClusterState {
        ClusterState::new(
            (0..4)
                .map(|i| {
                    Node::new(format!("n{i}"), 64_000, 65_536, 8, None)
                        .with_label("zone", if i < 2 { "a" } else { "b" })
                        .with_label("host", &format!("n{i}"))
                })
                .collect(),
        )
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn placed(ns: &str, app: &str, node: &str) -> PlacedPod {
        PlacedPod::new(
            &pod(&format!(
                "{{metadata: {{name: x, namespace: {ns}, labels: {{app: {app}}}}}}}"
            )),
            node,
        )
    }

    fn allowed(request: &PodRequest, state: &ClusterState) -> Vec<String> {
        state
            .nodes()
            .iter()
            .filter(|n| {
                request.affinity_terms.is_empty()
                    || request
                        .affinity_terms
                        .iter()
                        .any(|t| t.iter().all(|r| r.matches(&n.labels)))
            })
            .map(|n| n.name.clone())
            .collect()
    }

    fn request() -> PodRequest {
        PodRequest::new("p", 100, 64, GpuDemand::Whole(1))
    }

    #[test]
    fn affinity_keeps_the_pod_in_the_zone_of_its_peers() {
        let p = pod(r#"
metadata: {name: p, namespace: ns, labels: {app: web}}
spec:
  containers: []
  affinity:
    podAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
      - {topologyKey: zone, labelSelector: {matchLabels: {app: db}}}
"#);
        let state = state();
        let mut r = request();
        constrain(&mut r, &p, &[placed("ns", "db", "n3")], &state);
        assert_eq!(allowed(&r, &state), ["n2", "n3"]);
        // A db pod in another namespace does not count.
        let mut r = request();
        constrain(&mut r, &p, &[placed("other", "db", "n3")], &state);
        assert!(allowed(&r, &state).is_empty(), "no peer: nowhere to go");
    }

    #[test]
    fn first_of_a_self_affine_group_goes_anywhere() {
        let p = pod(r#"
metadata: {name: p, namespace: ns, labels: {app: web}}
spec:
  containers: []
  affinity:
    podAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
      - {topologyKey: zone, labelSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}}
"#);
        let state = state();
        let mut r = request();
        constrain(&mut r, &p, &[], &state);
        assert_eq!(allowed(&r, &state).len(), 4);
        let mut r = request();
        constrain(&mut r, &p, &[placed("ns", "web", "n0")], &state);
        assert_eq!(allowed(&r, &state), ["n0", "n1"]);
    }

    #[test]
    fn anti_affinity_both_ways_and_node_affinity_kept() {
        let p = pod(r#"
metadata: {name: p, namespace: ns, labels: {app: web}}
spec:
  containers: []
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
      - {topologyKey: host, labelSelector: {matchLabels: {app: web}}}
"#);
        let state = state();
        let mut r = request();
        constrain(
            &mut r,
            &p,
            &[placed("ns", "web", "n0"), placed("ns", "db", "n1")],
            &state,
        );
        assert_eq!(allowed(&r, &state), ["n1", "n2", "n3"]);

        // An existing pod that repels app=web from its zone, from any namespace.
        let repeller = pod(r#"
metadata: {name: r, namespace: other, labels: {app: batch}}
spec:
  containers: []
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
      - {topologyKey: zone, labelSelector: {matchLabels: {app: web}}, namespaceSelector: {}}
"#);
        let plain =
            pod("{metadata: {name: q, namespace: ns, labels: {app: web}}, spec: {containers: []}}");
        let mut r = request();
        r.affinity_terms = vec![vec![LabelRequirement {
            key: "host".into(),
            op: LabelOp::In(vec!["n0".into(), "n2".into()]),
        }]];
        constrain(&mut r, &plain, &[PlacedPod::new(&repeller, "n3")], &state);
        assert_eq!(
            allowed(&r, &state),
            ["n0"],
            "node affinity AND the repeller's rule"
        );
    }

    #[test]
    fn selectors() {
        let labels = BTreeMap::from([("a".to_string(), "1".to_string())]);
        assert!(!selects(None, &labels));
        assert!(selects(Some(&LabelSelector::default()), &labels));
        let sel: LabelSelector = serde_yaml::from_str(
            "{matchExpressions: [{key: a, operator: NotIn, values: ['2']}, {key: b, operator: DoesNotExist}]}",
        )
        .unwrap();
        assert!(selects(Some(&sel), &labels));
        let term: PodAffinityTerm =
            serde_yaml::from_str("{topologyKey: z, namespaces: [x], labelSelector: {}}").unwrap();
        assert!(covers_namespace(&term, "own", "x") && !covers_namespace(&term, "own", "own"));
    }
}
