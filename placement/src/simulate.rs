//! The `simulate` command as a library: replay traces for policies × seeds × tie modes,
//! write CSV and PNG, and return the table of 130% means beside the paper's. The binary
//! `ringmaster-simulate` prints `simulate::run(&args)`, and another binary can embed
//! [`SimulateArgs`] as a subcommand the same way.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::bound::{Rule, bound_at};
use crate::error::{Error, Result};
use crate::metrics::{Measure, curve};
use crate::offline::offline_at;
use crate::plot::{Panel, Series, line_chart};
use crate::policy::{POLICY_NAMES, paper_label, uses_model};
use crate::replay::{
    ModelSource, PAPER_TRACES, ReplayOptions, Run, TieMode, Workload, replay, split_policy,
};
use crate::trace::{PaperCurve, default_dir, read_paper};

const EXAMPLES: &str = "Examples:
  ringmaster-simulate --trace default --policies all --seeds 42-51 --tie-mode both --out sim
  ringmaster-simulate --trace paper --policies fgd,fragpack --tie-mode both --out sim
  ringmaster-simulate --trace paper --policies fgd,fragbalance,fragbalance-online --bound --tie-mode both --out sim
  ringmaster-simulate --trace multigpu50 --policies fgd,fragpack --gang-split --out sim
  ringmaster-simulate --bench";

/// Replay the Alibaba openb GPU traces through the placement policies, exactly as the
/// FGD paper's simulator does (data/traces/REPLAY.md), and compare with the paper.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct SimulateArgs {
    /// Traces: a name (default, cpu050, gpushare40, gpuspec10, multigpu50, ...), a comma
    /// list, or `paper` for the paper's 17 traces.
    #[arg(long, default_value = "default")]
    pub trace: String,
    /// Policies: a comma list or `all`. Known: random, dotprod, gpuclustering, gpupacking,
    /// bestfit, fgd (the paper's), fragpack, fragbalance (ours), spread. A suffix
    /// `-online` (`fgd-online`, `fragpack-online`, `fragbalance-online`): typical pods
    /// learned from the pods arrived so far instead of the whole trace.
    #[arg(long, default_value = "all")]
    pub policies: String,
    /// Seeds: a range `42-51`, a comma list, or one number.
    #[arg(long, default_value = "42-51")]
    pub seeds: String,
    /// Ties between equal best scores: `fixed` (the paper's seeded node ranking),
    /// `random` (afresh at each decision) or `both`.
    #[arg(long, default_value = "fixed", value_parser = ["fixed", "random", "both"])]
    pub tie_mode: String,
    /// Output directory for CSV and PNG files.
    #[arg(long, default_value = "simulate-out")]
    pub out: PathBuf,
    /// Directory with alibaba-gpu-v2023/ and fgd-expected-results/ (default: the
    /// repository's data/traces).
    #[arg(long)]
    pub traces_dir: Option<PathBuf>,
    /// Place multi-GPU pods that fit no single node as gangs of 1-GPU pods inside one of
    /// 8 synthetic zones, and report them separately.
    #[arg(long)]
    pub gang_split: bool,
    /// Worker threads (runs are independent).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    pub jobs: usize,
    /// Add two upper bounds on any scheduler's allocation at 130% (src/bound.rs): `bound`
    /// (LP relaxation over node types, every arrived CPU-only pod placed) and
    /// `bound-any` (the same with any pod droppable), and from below the offline packer
    /// `offline` (src/offline.rs: the arrived pods packed with the whole sequence known).
    #[arg(long)]
    pub bound: bool,
    /// Instead of replaying, measure per-pod placement latency on a 1,500-node cluster.
    #[arg(long)]
    pub bench: bool,
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let bad = || Error::Usage(format!("bad --seeds {s:?}: use 42-51, 42,43 or 42"));
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (u64, u64) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b {
            return Err(bad());
        }
        return Ok((a..=b).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad()))
        .collect()
}

fn parse_list(s: &str, all: &[&str]) -> Vec<String> {
    match s {
        "all" | "paper" => all.iter().map(|x| x.to_string()).collect(),
        _ => s
            .split(',')
            .map(|x| x.trim().to_ascii_lowercase())
            .filter(|x| !x.is_empty())
            .collect(),
    }
}

/// Mean of the 130% bucket over runs (the paper's table value).
pub fn mean_at(curves: &[Vec<Option<f64>>], x: usize) -> Option<f64> {
    let v: Vec<f64> = curves.iter().filter_map(|c| c[x]).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Runs `policies × seeds` on `workload`, `jobs` at a time; results in input order.
pub fn run_grid(
    workload: &Workload,
    policies: &[String],
    seeds: &[u64],
    options: ReplayOptions,
    jobs: usize,
) -> Result<Vec<Run>> {
    let tasks: Vec<(&String, u64)> = policies
        .iter()
        .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
        .collect();
    parallel_map(&tasks, jobs, |&(policy, seed)| {
        replay(workload, policy, seed, options)
    })
    .into_iter()
    .collect()
}

/// `f` over `items` on `jobs` threads (the tasks are independent); results in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else {
                        break;
                    };
                    let r = f(item);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran")
        })
        .collect()
}

/// The bound rows of one trace: the 130% bound of each rule, mean of `seeds`, the same
/// in every tie mode (it does not depend on ties).
fn bound_rows(
    workload: &Workload,
    seeds: &[u64],
    ties: &[TieMode],
    jobs: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (name, rule) in [
        ("bound", Rule::CpuOnlyPlaced),
        ("bound-any", Rule::AnyDropped),
    ] {
        let values = parallel_map(seeds, jobs, |&seed| bound_at(workload, seed, 130, rule))
            .into_iter()
            .collect::<std::result::Result<Vec<f64>, String>>()
            .map_err(Error::Bound)?;
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        for &tie in ties {
            rows.push(Row::reference(&workload.name, name, tie, mean, 0.0));
        }
    }
    // The offline packer (src/offline.rs): a feasible allocation of the arrived pods,
    // packed with the whole sequence known; `failed_cpu_only` is the mean of the
    // CPU-only pods it could not place.
    let values = parallel_map(seeds, jobs, |&seed| offline_at(workload, seed, 130))
        .into_iter()
        .collect::<std::result::Result<Vec<(f64, usize)>, String>>()
        .map_err(Error::Bound)?;
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|v| v.0).sum::<f64>() / n;
    let failed_cpu_only = values.iter().map(|v| v.1 as f64).sum::<f64>() / n;
    for &tie in ties {
        rows.push(Row::reference(
            &workload.name,
            "offline",
            tie,
            mean,
            failed_cpu_only,
        ));
    }
    Ok(rows)
}

fn write_file(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, body).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v}"))
}

fn curves_csv(
    workload: &str,
    runs: &[Run],
    curves: &[Vec<Option<f64>>],
    total_gpus: u64,
) -> String {
    let mut s = String::from("workload,sc_policy,tune,seed,total_gpus");
    for x in 0..=130 {
        let _ = write!(s, ",{x}");
    }
    s.push('\n');
    for (run, c) in runs.iter().zip(curves) {
        let _ = write!(
            s,
            "openb_pod_list_{workload},{},1.3,{},{total_gpus}",
            run.policy, run.seed
        );
        for v in c {
            let _ = write!(s, ",{}", fmt_opt(*v));
        }
        s.push('\n');
    }
    s
}

/// Per (trace, policy, tie mode): the 10-seed means the table shows.
#[derive(Clone, Debug)]
pub struct Row {
    pub trace: String,
    pub policy: String,
    pub tie: TieMode,
    pub alloc_130: Option<f64>,
    pub frag_130: Option<f64>,
    pub paper_130: Option<f64>,
    /// Fraction of (policy, seed) curves equal to the paper's at every point.
    pub exact_seeds: Option<(usize, usize)>,
    pub failed_pods: f64,
    /// Failed CPU-only pods: where non-zero, `bound` assumed more than the run did.
    pub failed_cpu_only: f64,
    pub impossible_pods: f64,
    pub gangs: f64,
    pub gang_gpus: f64,
}

impl Row {
    /// A reference row (a bound or the offline packer): an allocation, no curve.
    fn reference(trace: &str, policy: &str, tie: TieMode, alloc: f64, failed_cpu_only: f64) -> Row {
        Row {
            trace: trace.to_string(),
            policy: policy.to_string(),
            tie,
            alloc_130: Some(alloc),
            frag_130: None,
            paper_130: None,
            exact_seeds: None,
            failed_pods: 0.0,
            failed_cpu_only,
            impossible_pods: 0.0,
            gangs: 0.0,
            gang_gpus: 0.0,
        }
    }
}

/// Everything `simulate` produced.
pub struct Report {
    pub rows: Vec<Row>,
    pub files: Vec<PathBuf>,
    pub table: String,
}

fn paper_curve<'a>(
    paper: &'a [PaperCurve],
    trace: &str,
    policy: &str,
    seed: u64,
) -> Option<&'a PaperCurve> {
    let label = paper_label(policy)?;
    paper.iter().find(|c| {
        c.workload == format!("openb_pod_list_{trace}") && c.policy == label && c.seed == seed
    })
}

/// The whole command, bench mode included; returns what to print. This is all another
/// binary needs to offer `simulate` as a subcommand.
pub fn run(args: &SimulateArgs) -> Result<String> {
    if args.bench {
        return crate::bench::run(args);
    }
    let report = simulate(args)?;
    let mut out = report.table;
    for f in &report.files {
        let _ = writeln!(out, "wrote {}", f.display());
    }
    Ok(out)
}

/// Replays and writes the files (the bench mode excepted).
pub fn simulate(args: &SimulateArgs) -> Result<Report> {
    let dir = args.traces_dir.clone().unwrap_or_else(default_dir);
    let traces = parse_list(&args.trace, &PAPER_TRACES);
    let policies = parse_list(&args.policies, &POLICY_NAMES);
    for p in &policies {
        let (base, source) = split_policy(p);
        if !POLICY_NAMES.contains(&base) {
            return Err(Error::UnknownPolicy(p.clone(), POLICY_NAMES.join(", ")));
        }
        if source == ModelSource::Online && !uses_model(base) {
            return Err(Error::Usage(format!(
                "policy {p}: only policies with typical pods (fgd, fragpack, fragbalance) learn them online"
            )));
        }
    }
    let seeds = parse_seeds(&args.seeds)?;
    let ties = match args.tie_mode.as_str() {
        "random" => vec![TieMode::Random],
        "both" => vec![TieMode::Fixed, TieMode::Random],
        _ => vec![TieMode::Fixed],
    };
    std::fs::create_dir_all(&args.out).map_err(|source| Error::Io {
        path: args.out.clone(),
        source,
    })?;
    let paper = read_paper(&dir.join("fgd-expected-results/analysis_allo_discrete.csv"))?;
    let mut rows = Vec::new();
    let mut files = Vec::new();
    for trace in &traces {
        let workload = Workload::load(&dir, trace)?;
        let total_gpus = workload.gpu_capacity_milli() / 1000;
        for &tie in &ties {
            let options = ReplayOptions {
                ties: tie,
                gang_split: args.gang_split,
            };
            let runs = run_grid(&workload, &policies, &seeds, options, args.jobs)?;
            let alloc: Vec<_> = runs
                .iter()
                .map(|r| curve(&r.events, total_gpus, Measure::Allocation, 130))
                .collect();
            let frag: Vec<_> = runs
                .iter()
                .map(|r| curve(&r.events, total_gpus, Measure::Fragmentation, 130))
                .collect();
            let ratio: Vec<_> = runs
                .iter()
                .map(|r| curve(&r.events, total_gpus, Measure::FragmentationRatio, 130))
                .collect();
            let tag = format!(
                "{trace}-{}{}",
                tie_name(tie),
                if args.gang_split { "-gang" } else { "" }
            );
            for (kind, curves) in [("alloc", &alloc), ("frag", &frag), ("frag-ratio", &ratio)] {
                let path = args.out.join(format!("{tag}-{kind}.csv"));
                write_file(&path, &curves_csv(trace, &runs, curves, total_gpus))?;
                files.push(path);
            }
            let mut series = Vec::new();
            for policy in &policies {
                let idx: Vec<usize> = (0..runs.len())
                    .filter(|&i| &runs[i].policy == policy)
                    .collect();
                let pick = |cs: &[Vec<Option<f64>>]| {
                    idx.iter().map(|&i| cs[i].clone()).collect::<Vec<_>>()
                };
                let (a, f) = (pick(&alloc), pick(&frag));
                let paper_curves: Vec<_> = seeds
                    .iter()
                    .filter_map(|&s| paper_curve(&paper, trace, policy, s))
                    .collect();
                let paper_130 = (paper_curves.len() == seeds.len())
                    .then(|| {
                        mean_at(
                            &paper_curves
                                .iter()
                                .map(|c| c.values.clone())
                                .collect::<Vec<_>>(),
                            130,
                        )
                    })
                    .flatten();
                let exact_seeds = (tie == TieMode::Fixed && paper_curves.len() == seeds.len())
                    .then(|| {
                        let same = idx
                            .iter()
                            .zip(&paper_curves)
                            .filter(|(i, p)| {
                                alloc[**i].iter().zip(&p.values).all(|(a, b)| match (a, b) {
                                    (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                                    (a, b) => a.is_some() == b.is_some(),
                                })
                            })
                            .count();
                        (same, seeds.len())
                    });
                let n = idx.len().max(1) as f64;
                rows.push(Row {
                    trace: trace.clone(),
                    policy: policy.clone(),
                    tie,
                    alloc_130: mean_at(&a, 130),
                    frag_130: mean_at(&f, 130),
                    paper_130,
                    exact_seeds,
                    failed_pods: idx.iter().map(|&i| runs[i].failed as f64).sum::<f64>() / n,
                    failed_cpu_only: idx
                        .iter()
                        .map(|&i| runs[i].failed_cpu_only as f64)
                        .sum::<f64>()
                        / n,
                    impossible_pods: idx.iter().map(|&i| runs[i].impossible as f64).sum::<f64>()
                        / n,
                    gangs: idx.iter().map(|&i| runs[i].gangs as f64).sum::<f64>() / n,
                    gang_gpus: idx.iter().map(|&i| runs[i].gang_gpus as f64).sum::<f64>() / n,
                });
                series.push(Series {
                    name: policy.clone(),
                    points: (0..=130).map(|x| (x as f64, mean_at(&a, x))).collect(),
                });
            }
            let png = args.out.join(format!("{tag}-alloc.png"));
            let title = format!(
                "{trace}: GPU ALLOCATION, MEAN OF {} SEEDS, TIES {}",
                seeds.len(),
                tie_name(tie).to_ascii_uppercase()
            );
            let panels = [
                Panel {
                    title: "ALL".into(),
                    x: (0.0, 130.0),
                    y: (0.0, 100.0),
                    x_step: 10.0,
                    y_step: 10.0,
                },
                Panel {
                    title: "ZOOM".into(),
                    x: (80.0, 130.0),
                    y: (75.0, 100.0),
                    x_step: 10.0,
                    y_step: 5.0,
                },
            ];
            line_chart(&png, &title, "ALLOC %", &panels, &series)?;
            files.push(png);
        }
        if args.bound {
            rows.extend(bound_rows(&workload, &seeds, &ties, args.jobs)?);
        }
    }
    let summary = args.out.join("summary.csv");
    write_file(&summary, &summary_csv(&rows))?;
    files.push(summary);
    let table = table(&rows, args.gang_split);
    Ok(Report { rows, files, table })
}

fn tie_name(t: TieMode) -> &'static str {
    match t {
        TieMode::Fixed => "fixed",
        TieMode::Random => "random",
    }
}

fn summary_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "trace,policy,tie_mode,alloc_130,paper_alloc_130,frag_130,exact_seeds,failed_pods,failed_cpu_only,impossible_pods,gangs,gang_gpus\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.trace,
            r.policy,
            tie_name(r.tie),
            fmt_opt(r.alloc_130),
            fmt_opt(r.paper_130),
            fmt_opt(r.frag_130),
            r.exact_seeds
                .map_or_else(String::new, |(a, b)| format!("{a}/{b}")),
            r.failed_pods,
            r.failed_cpu_only,
            r.impossible_pods,
            r.gangs,
            r.gang_gpus
        );
    }
    s
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// The text table: per trace and policy, ours beside the paper at 130%.
pub fn table(rows: &[Row], gangs: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:<16} {:>8} {:>8} {:>7} {:>7} {:>10}{}",
        "trace",
        "policy",
        "fixed",
        "paper",
        "delta",
        "exact",
        "random-tie",
        if gangs { "   gangs(GPUs)" } else { "" }
    );
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        let key = (r.trace.as_str(), r.policy.as_str());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let get = |t| {
            rows.iter()
                .find(|x| x.trace == r.trace && x.policy == r.policy && x.tie == t)
        };
        let fixed = get(TieMode::Fixed);
        let random = get(TieMode::Random);
        let ours = fixed.and_then(|f| f.alloc_130);
        let paper = fixed
            .and_then(|f| f.paper_130)
            .or(random.and_then(|x| x.paper_130));
        let delta = ours.zip(paper).map(|(a, b)| a - b);
        let exact = fixed
            .and_then(|f| f.exact_seeds)
            .map_or_else(|| "-".into(), |(a, b)| format!("{a}/{b}"));
        let _ = write!(
            s,
            "{:<12} {:<16} {:>8} {:>8} {:>7} {:>7} {:>10}",
            r.trace,
            r.policy,
            cell(ours),
            cell(paper),
            delta.map_or_else(|| "-".into(), |d| format!("{d:+.2}")),
            exact,
            cell(random.and_then(|x| x.alloc_130)),
        );
        if gangs {
            let g = fixed.or(random).expect("row exists");
            let _ = write!(s, "   {:.1}({:.0})", g.gangs, g.gang_gpus);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_lists() {
        assert_eq!(parse_seeds("42-45").unwrap(), vec![42, 43, 44, 45]);
        assert_eq!(parse_seeds("7,9").unwrap(), vec![7, 9]);
        assert!(parse_seeds("9-7").is_err());
        assert!(parse_seeds("x").is_err());
        assert_eq!(parse_list("all", &POLICY_NAMES).len(), POLICY_NAMES.len());
        assert_eq!(
            parse_list("FGD, bestfit", &POLICY_NAMES),
            vec!["fgd", "bestfit"]
        );
    }
}
