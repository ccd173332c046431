//! Least privilege, proven: compares the chart's RBAC with what the components did while
//! the whole test suite ran under the chart's ServiceAccounts (the API server's audit log,
//! e2e/audit-policy.yaml). Fails when a granted permission was never used (unless the
//! operator must hold it to grant it to trainers, as RBAC requires), when a request was
//! denied, or when a rule is broader than the rules allow (`*`, reading secrets, leases
//! written outside the release namespace).
//!   cargo run -p ringmaster-e2e --bin rbac-audit [-- <audit.log>]
//! e2e/test.sh runs it after the tests when they ran in full.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use ringmaster_e2e::chart::{self, RELEASE, RELEASE_NAMESPACE};
use serde_json::Value;

/// One permission: API group, resource (with `/subresource`), verb, and where it holds
/// (None: every namespace, from a ClusterRole).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    group: String,
    resource: String,
    verb: String,
    namespace: Option<String>,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        let scope = self.namespace.as_deref().unwrap_or("cluster-wide");
        write!(f, "{:<8} {}/{} ({scope})", self.verb, group, self.resource)
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Expands RBAC `rules` into permissions in `namespace`.
fn expand(rules: &Value, namespace: Option<&str>) -> Vec<Permission> {
    let mut out = Vec::new();
    for rule in rules.as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.push(Permission {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb,
                        namespace: namespace.map(String::from),
                    });
                }
            }
        }
    }
    out
}

/// Problems a single rule has on its own.
fn rule_problems(kind: &str, name: &str, rules: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for rule in rules.as_array().into_iter().flatten() {
        for field in ["apiGroups", "resources", "verbs"] {
            if strings(&rule[field]).iter().any(|s| s == "*") {
                problems.push(format!("{kind} {name}: `*` in {field}"));
            }
        }
        if strings(&rule["resources"]).iter().any(|r| r == "secrets")
            && strings(&rule["verbs"]).iter().any(|v| v != "create")
        {
            problems.push(format!(
                "{kind} {name}: secrets beyond `create` (the per-job tokens)"
            ));
        }
    }
    problems
}

/// The chart's permissions per ServiceAccount user, and the problems its rules have.
fn chart_permissions() -> (BTreeMap<String, Vec<Permission>>, Vec<String>) {
    let rendered = chart::render(RELEASE, RELEASE_NAMESPACE, &[]);
    let docs: Vec<Value> = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|doc| doc.is_object())
        .collect();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let roles: BTreeMap<(String, String), &Value> = docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("ClusterRole" | "Role")))
        .map(|d| {
            (
                (text(&d["kind"]), text(&d["metadata"]["name"])),
                &d["rules"],
            )
        })
        .collect();
    let mut problems: Vec<String> = roles
        .iter()
        .flat_map(|((kind, name), rules)| rule_problems(kind, name, rules))
        .collect();
    let mut granted: BTreeMap<String, Vec<Permission>> = BTreeMap::new();
    let bindings = docs.iter().filter(|d| {
        matches!(
            d["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        )
    });
    for binding in bindings {
        let namespace = (binding["kind"] == "RoleBinding").then(|| {
            binding["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
        });
        let role = (
            text(&binding["roleRef"]["kind"]),
            text(&binding["roleRef"]["name"]),
        );
        let Some(rules) = roles.get(&role) else {
            problems.push(format!(
                "a binding to {role:?}, which the chart does not define"
            ));
            continue;
        };
        for subject in binding["subjects"].as_array().into_iter().flatten() {
            let user = format!(
                "system:serviceaccount:{}:{}",
                text(&subject["namespace"]),
                text(&subject["name"])
            );
            granted
                .entry(user)
                .or_default()
                .extend(expand(rules, namespace));
        }
    }
    for (user, permissions) in &granted {
        for p in permissions {
            let writes = !matches!(p.verb.as_str(), "get" | "list" | "watch");
            if p.resource == "leases" && writes && p.namespace.is_none() {
                problems.push(format!(
                    "{user}: {p}: leader leases are written in the release namespace only"
                ));
            }
        }
    }
    (granted, problems)
}

/// What one request in the audit log needed.
struct Request {
    user: String,
    needed: Permission,
    code: u16,
    /// Rules of a Role the operator wrote (it must hold them itself).
    granted_rules: Option<Value>,
}

/// The requests in the audit log; a server-side apply that created its object (a patch
/// answered 201) also needed `create`, which the API server checks without logging it.
fn read_audit_log(path: &PathBuf) -> Vec<Request> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "read the audit log {}: {e} (the local control plane records it: e2e/cluster.sh up)",
            path.display()
        )
    });
    let mut seen = BTreeSet::new();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|event| {
            let object = event.get("objectRef")?;
            let resource = match object["subresource"].as_str() {
                Some(sub) => format!("{}/{sub}", object["resource"].as_str()?),
                None => object["resource"].as_str()?.to_string(),
            };
            // A request appears once per stage (a watch also at ResponseStarted).
            if !seen.insert(event["auditID"].as_str()?.to_string()) {
                return None;
            }
            let request = Request {
                user: event["user"]["username"].as_str()?.to_string(),
                needed: Permission {
                    group: object["apiGroup"].as_str().unwrap_or_default().to_string(),
                    resource,
                    verb: event["verb"].as_str()?.to_string(),
                    namespace: object["namespace"].as_str().map(String::from),
                },
                code: event["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                granted_rules: event
                    .get("requestObject")
                    .map(|o| o["rules"].clone())
                    .filter(Value::is_array),
            };
            let created =
                (request.needed.verb == "patch" && request.code == 201).then(|| Request {
                    user: request.user.clone(),
                    needed: Permission {
                        verb: "create".into(),
                        ..request.needed.clone()
                    },
                    code: request.code,
                    granted_rules: None,
                });
            Some(std::iter::once(request).chain(created))
        })
        .flatten()
        .collect()
}

/// Whether `grant` authorises `request` (a cluster-wide grant holds in every namespace).
fn covers(grant: &Permission, request: &Permission) -> bool {
    grant.group == request.group
        && grant.resource == request.resource
        && grant.verb == request.verb
        && (grant.namespace.is_none() || grant.namespace == request.namespace)
}

fn main() -> ExitCode {
    let log = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            ringmaster_e2e::kubeconfig()
                .parent()
                .expect("the kubeconfig lies in the cluster's state directory")
                .join("logs/audit.log")
        });
    let (granted, mut problems) = chart_permissions();
    let requests = read_audit_log(&log);
    for (user, permissions) in &granted {
        let mine: Vec<&Request> = requests.iter().filter(|r| &r.user == user).collect();
        if mine.is_empty() {
            problems.push(format!(
                "{user}: no request in {}: did the tests run under the chart's credentials?",
                log.display()
            ));
            continue;
        }
        for denied in mine.iter().filter(|r| r.code == 403) {
            problems.push(format!("{user}: denied {}", denied.needed));
        }
        // RBAC lets a Role be written only by whoever holds every rule in it.
        let passed_on: Vec<Permission> = mine
            .iter()
            .filter_map(|r| r.granted_rules.as_ref())
            .flat_map(|rules| expand(rules, None))
            .collect();
        println!("{user}");
        for grant in permissions {
            let uses = mine.iter().filter(|r| covers(grant, &r.needed)).count();
            let held_to_grant = passed_on.iter().any(|p| {
                p.group == grant.group && p.resource == grant.resource && p.verb == grant.verb
            });
            let why = match (uses, held_to_grant) {
                (0, false) => {
                    problems.push(format!("{user}: {grant} is never used"));
                    "UNUSED".to_string()
                }
                (0, true) => "held to grant it to trainers".to_string(),
                (n, _) => format!("{n} requests"),
            };
            println!("  {:<72} {why}", grant.to_string());
        }
    }
    if problems.is_empty() {
        println!(
            "rbac-audit: every permission the chart grants was used, and none was missing ({} requests)",
            requests.len()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("rbac-audit: the chart's RBAC is not least privilege:");
        for problem in &problems {
            eprintln!("  {problem}");
        }
        ExitCode::FAILURE
    }
}
