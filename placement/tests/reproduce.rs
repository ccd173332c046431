//! The paper's `analysis_allo_discrete.csv`, reproduced value by value on `default`
//! for every deterministic policy and seed (REPLAY.md §10).

use ringmaster_placement::metrics::{Measure, curve};
use ringmaster_placement::replay::{ReplayOptions, Workload, replay};
use ringmaster_placement::trace::{self, read_paper};

const DETERMINISTIC: [&str; 5] = ["bestfit", "gpupacking", "gpuclustering", "dotprod", "fgd"];

fn check_trace(name: &str, policies: &[&str]) {
    let dir = trace::default_dir();
    let workload = Workload::load(&dir, name).unwrap();
    let paper = read_paper(&dir.join("fgd-expected-results/analysis_allo_discrete.csv")).unwrap();
    let total_gpus = workload.gpu_capacity_milli() / 1000;
    let mut mismatches = Vec::new();
    for &policy in policies {
        let label = ringmaster_placement::policy::paper_label(policy).unwrap();
        for seed in 42..=51 {
            let run = replay(&workload, policy, seed, ReplayOptions::default()).unwrap();
            let ours = curve(&run.events, total_gpus, Measure::Allocation, 130);
            let expected = paper
                .iter()
                .find(|c| c.workload == format!("openb_pod_list_{name}") && c.policy == label && c.seed == seed)
                .unwrap_or_else(|| panic!("no paper curve for {name} {label} {seed}"));
            let bad: Vec<_> = (0..=130)
                .filter(|&x| match (ours[x], expected.values[x]) {
                    (Some(a), Some(b)) => (a - b).abs() > 1e-9,
                    (a, b) => a.is_some() != b.is_some(),
                })
                .map(|x| (x, ours[x], expected.values[x]))
                .collect();
            if !bad.is_empty() {
                mismatches.push(format!("{policy} seed {seed}: {} points differ, first {:?}", bad.len(), &bad[..bad.len().min(3)]));
            }
        }
    }
    assert!(mismatches.is_empty(), "{name}:\n{}", mismatches.join("\n"));
}

#[test]
fn default_trace_matches_paper_exactly() {
    check_trace("default", &DETERMINISTIC);
}
