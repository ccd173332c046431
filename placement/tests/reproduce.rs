//! The paper's `analysis_allo_discrete.csv`, reproduced value by value on `default`
//! for every deterministic policy and seed (REPLAY.md §10), and Random's 10-seed mean
//! within 0.3 points.

use ringmaster_placement::metrics::{Measure, curve};
use ringmaster_placement::policy::paper_label;
use ringmaster_placement::replay::{ReplayOptions, Workload};
use ringmaster_placement::simulate::{mean_at, run_grid};
use ringmaster_placement::trace::{self, read_paper};

#[test]
fn default_trace_matches_paper() {
    let trace = "default";
    let dir = trace::default_dir();
    let workload = Workload::load(&dir, trace).unwrap();
    let paper = read_paper(&dir.join("fgd-expected-results/analysis_allo_discrete.csv")).unwrap();
    let total_gpus = workload.gpu_capacity_milli() / 1000;
    let policies: Vec<String> = [
        "bestfit",
        "gpupacking",
        "gpuclustering",
        "dotprod",
        "fgd",
        "random",
    ]
    .map(String::from)
    .to_vec();
    let seeds: Vec<u64> = (42..=51).collect();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runs = run_grid(&workload, &policies, &seeds, ReplayOptions::default(), jobs).unwrap();
    let mut mismatches = Vec::new();
    let (mut random_ours, mut random_paper) = (Vec::new(), Vec::new());
    for run in &runs {
        let ours = curve(&run.events, total_gpus, Measure::Allocation, 130);
        let label = paper_label(&run.policy).unwrap();
        let expected = paper
            .iter()
            .find(|c| {
                c.workload == format!("openb_pod_list_{trace}")
                    && c.policy == label
                    && c.seed == run.seed
            })
            .unwrap_or_else(|| panic!("no paper curve for {label} {}", run.seed));
        if run.policy == "random" {
            random_ours.push(ours);
            random_paper.push(expected.values.clone());
            continue;
        }
        let bad: Vec<_> = (0..=130)
            .filter(|&x| match (ours[x], expected.values[x]) {
                (Some(a), Some(b)) => (a - b).abs() > 1e-9,
                (a, b) => a.is_some() != b.is_some(),
            })
            .map(|x| (x, ours[x], expected.values[x]))
            .collect();
        if !bad.is_empty() {
            mismatches.push(format!(
                "{} seed {}: {} points differ, first {:?}",
                run.policy,
                run.seed,
                bad.len(),
                &bad[..bad.len().min(3)]
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    let (ours, theirs) = (
        mean_at(&random_ours, 130).unwrap(),
        mean_at(&random_paper, 130).unwrap(),
    );
    assert!(
        (ours - theirs).abs() <= 0.3,
        "random: {ours:.2} vs paper {theirs:.2}"
    );
}
