//! The side-by-side protocol the step benchmarks share (included with `#[path]`): both
//! sides wait for a quiet machine (`wait_quiet.py` of the baselines), record the CPU time
//! other processes used while they ran, take turns going first, repeat, and report the
//! median ratio over the clean runs with its spread. A run is DISTURBED, and left out,
//! when either side saw more than 1 CPU second of foreign work or of steal, or PyTorch ran below the
//! reference figures of `bench-baselines/README.md` (it slows down far more than we do
//! under load, which flatters the ratio).

use std::path::Path;
use std::process::Command;

/// Foreign CPU seconds, or stolen seconds, above which a run does not count.
const MAX_FOREIGN_CPU_S: f64 = 1.0;

/// One configuration's measurements in one run.
pub struct Sample {
    pub config: String,
    pub ours: f64,
    pub theirs: f64,
    /// Other processes' CPU seconds and stolen seconds while each side ran.
    pub our_foreign: Foreign,
    pub their_foreign: Foreign,
}

#[derive(Clone, Copy)]
pub struct Foreign {
    pub cpu_s: f64,
    pub steal_s: f64,
}

/// Blocks until the machine is quiet (at most 15 minutes), so neither side measures load.
fn wait_quiet(baselines: &Path, python: &str) {
    let status = Command::new(python)
        .current_dir(baselines)
        .args(["wait_quiet.py", "--window", "10", "--timeout", "900"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!(
            "# wait_quiet.py: the machine did not get quiet; this run will likely be DISTURBED"
        );
    }
}

/// CPU time used by other processes between `start` and `stop` (all busy time of the
/// machine less this process's own) and the time the hypervisor stole (from /proc).
struct ForeignCpu {
    busy: u64,
    own: u64,
    steal: u64,
}

/// (busy, own, steal) ticks.
fn ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy = [0, 1, 2, 5, 6].iter().filter_map(|&i| cpu.get(i)).sum();
    let steal = cpu.get(7).copied().unwrap_or(0);
    let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = own_stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // After the name: the state (a letter, dropped here), then fields 4.. (some may be -1);
    // utime and stime are fields 14 and 15.
    let fields: Vec<i64> = after_name
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let own = (fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0)) as u64;
    (busy, own, steal)
}

impl ForeignCpu {
    fn start() -> Self {
        let (busy, own, steal) = ticks();
        Self { busy, own, steal }
    }

    fn stop(&self) -> Foreign {
        let (busy, own, steal) = ticks();
        let foreign = (busy - self.busy).saturating_sub(own - self.own);
        Foreign {
            cpu_s: foreign as f64 / 100.0, // USER_HZ
            steal_s: (steal - self.steal) as f64 / 100.0,
        }
    }
}

/// `runs` side-by-side runs: each side after the machine is quiet, ours watched for
/// foreign work (PyTorch's baselines watch themselves), the two taking turns going first
/// so that whatever the first leaves behind (heat, page cache, memory) falls on each side
/// equally often. Per run: our result, the foreign work during it, PyTorch's result.
pub fn take_turns<O, T, E>(
    runs: usize,
    baselines: &Path,
    python: &str,
    mut ours: impl FnMut() -> Result<O, E>,
    mut theirs: impl FnMut() -> Result<T, E>,
) -> Result<Vec<(O, Foreign, T)>, E> {
    let mut results = vec![];
    for run in 0..runs {
        println!("\n# run {} of {runs}", run + 1);
        let (mut our_side, mut their_side) = (None, None);
        for ours_now in [run % 2 == 0, run % 2 == 1] {
            wait_quiet(baselines, python);
            if ours_now {
                let foreign = ForeignCpu::start();
                let result = ours()?;
                our_side = Some((result, foreign.stop()));
            } else {
                their_side = Some(theirs()?);
            }
        }
        let ((ours, foreign), theirs) = (our_side.expect("ran"), their_side.expect("ran"));
        results.push((ours, foreign, theirs));
    }
    Ok(results)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Why a sample does not count, if it does not.
fn disturbance(sample: &Sample, reference_floor: Option<f64>) -> Option<String> {
    let mut why = vec![];
    for (side, foreign) in [
        ("ours", sample.our_foreign),
        ("PyTorch", sample.their_foreign),
    ] {
        if foreign.cpu_s > MAX_FOREIGN_CPU_S {
            why.push(format!("foreign CPU {:.1} s during {side}", foreign.cpu_s));
        }
        if foreign.steal_s > MAX_FOREIGN_CPU_S {
            why.push(format!("{:.1} s stolen during {side}", foreign.steal_s));
        }
    }
    if let Some(floor) = reference_floor.filter(|floor| sample.theirs < *floor) {
        why.push(format!(
            "PyTorch {:.2} below its reference {floor}",
            sample.theirs
        ));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// The table: per configuration, medians over the clean runs, the ratio's range, and the
/// runs left out with why. `reference_floor` gives PyTorch's lowest quiet figure for a
/// configuration, where the baselines' README has one.
pub fn report(samples: &[Sample], reference_floor: impl Fn(&str) -> Option<f64>) {
    let mut configs: Vec<&str> = vec![];
    for sample in samples {
        if !configs.contains(&sample.config.as_str()) {
            configs.push(&sample.config);
        }
    }
    println!(
        "\n| config | clean runs | ours samples/s | PyTorch samples/s | ours / PyTorch (median) | range | left out |"
    );
    println!("|---|---|---|---|---|---|---|");
    for config in configs {
        let runs: Vec<&Sample> = samples.iter().filter(|s| s.config == config).collect();
        let floor = reference_floor(config);
        let (clean, disturbed): (Vec<&Sample>, Vec<&Sample>) =
            runs.iter().partition(|s| disturbance(s, floor).is_none());
        let left_out: Vec<String> = disturbed
            .iter()
            .map(|s| disturbance(s, floor).unwrap_or_default())
            .collect();
        if clean.is_empty() {
            println!(
                "| {config} | 0/{} | | | DISTURBED: no clean run | | {} |",
                runs.len(),
                left_out.join("; ")
            );
            continue;
        }
        let mut ratios: Vec<f64> = clean.iter().map(|s| s.ours / s.theirs).collect();
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "| {config} | {}/{} | {:.2} | {:.2} | **{:.2}x** | {lo:.2}-{hi:.2}x | {} |",
            clean.len(),
            runs.len(),
            median(&mut clean.iter().map(|s| s.ours).collect::<Vec<_>>()),
            median(&mut clean.iter().map(|s| s.theirs).collect::<Vec<_>>()),
            median(&mut ratios),
            left_out.join("; ")
        );
    }
}
