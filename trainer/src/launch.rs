//! `ringmaster launch`: runs a TrainingJob on this machine as N local rank processes
//! (`ringmaster train`) with the rendezvous env and token the pods get, the cores split
//! between them, a live progress bar per epoch, a results table at each evaluation and a
//! summary at the end. Ctrl-C stops every rank; a failed rank stops the run, and the
//! launcher exits non-zero naming it and its last words.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::evaluate::EvalReport;
use crate::events::Event;
use crate::spec::JobFile;

/// How long the other ranks get to notice a failed peer before they are stopped.
const PEER_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// The TrainingJob YAML (the same file `kubectl apply` takes).
    pub file: PathBuf,
    /// Rank processes (default: workers x processesPerWorker from the file).
    #[arg(short = 'n', long)]
    pub ranks: Option<usize>,
    /// Override a spec field, e.g. `--set training.epochs=1` (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub overrides: Vec<String>,
    /// Output directory (default: spec.output.path, relative to the YAML file).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// A line from a rank.
enum Line {
    Out(usize, String),
    Err(usize, String),
}

pub fn run(args: &LaunchArgs) -> Result<()> {
    let mut job = JobFile::load(&args.file, &args.overrides)?;
    if let Some(out) = &args.output {
        let out = std::path::absolute(out).unwrap_or_else(|_| out.clone());
        job.job.spec.output.path = out.display().to_string();
    }
    let ranks = args.ranks.unwrap_or_else(|| job.world_size()).max(1);
    let output = job.output_dir();
    crate::run_dir::RunDir::create(&output)?;
    let resolved = output.join("job.yaml");
    std::fs::write(&resolved, job.to_yaml()).map_err(|source| Error::Io {
        what: "writing",
        path: resolved.clone(),
        source,
    })?;
    let port = free_port()?.to_string();
    let token = ringmaster_collective::Token::random()?.expose();
    let rendezvous = [
        ("WORLD_SIZE", ranks.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port),
        ("RINGMASTER_TOKEN", token),
        // Every local rank runs here: the ring log names this host.
        ("RINGMASTER_NODE_NAME", host_name()),
    ];
    let group = RankGroup {
        config: &resolved,
        first_rank: 0,
        ranks,
        rendezvous: &rendezvous,
    };
    let (children, rx) = group.spawn()?;
    supervise(children, rx, Mode::Terminal { output: &output })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `ringmaster train` in a pod with LOCAL_WORLD_SIZE > 1 (processesPerWorker): starts
/// the pod's ranks (RANK + 0..LOCAL_WORLD_SIZE) with the pod's rendezvous env, passes
/// their reports through to the pod log, and fails naming the first rank that fails.
pub fn run_pod_ranks(config: &Path, first_rank: usize, local: usize) -> Result<()> {
    let group = RankGroup {
        config,
        first_rank,
        ranks: local,
        rendezvous: &[],
    };
    let (children, rx) = group.spawn()?;
    supervise(children, rx, Mode::PassThrough)
}

/// Set on the ranks a launcher starts, so that they train instead of starting ranks.
pub const RANK_PROCESS_ENV: &str = "RINGMASTER_RANK_PROCESS";

/// Ranks `first_rank..first_rank + ranks` on this machine, sharing its cores.
struct RankGroup<'a> {
    config: &'a Path,
    first_rank: usize,
    ranks: usize,
    /// WORLD_SIZE, MASTER_ADDR, ...; empty: inherited (a pod has them already).
    rendezvous: &'a [(&'a str, String)],
}

impl RankGroup<'_> {
    fn spawn(&self) -> Result<(Vec<Child>, Receiver<Line>)> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / self.ranks).max(1).to_string();
        eprintln!(
            "ringmaster: {} rank(s) x {threads} thread(s) on {cores} core(s); spec {}",
            self.ranks,
            self.config.display()
        );
        let exe = std::env::current_exe().map_err(|source| Error::Io {
            what: "finding the ringmaster binary",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let (tx, rx) = channel();
        let mut children = Vec::with_capacity(self.ranks);
        for local in 0..self.ranks {
            let mut command = Command::new(&exe);
            // A launcher killed outright (SIGKILL, or a SIGTERM before its handler runs)
            // must not leave its ranks training on: the kernel stops them with it.
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = command
                .args(["train", "--config"])
                .arg(self.config)
                .envs(self.rendezvous.iter().map(|(k, v)| (*k, v.as_str())))
                .env("RANK", (self.first_rank + local).to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", self.ranks.to_string())
                .env(RANK_PROCESS_ENV, "1")
                // No oversubscription: each rank gets its share of the cores.
                .env("RAYON_NUM_THREADS", &threads)
                .env("CANDLE_NUM_THREADS", &threads)
                .env("OMP_NUM_THREADS", &threads)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| Error::Io {
                    what: "starting rank",
                    path: exe.clone(),
                    source,
                })?;
            forward(child.stdout.take(), local, tx.clone(), Line::Out);
            forward(child.stderr.take(), local, tx.clone(), Line::Err);
            children.push(child);
        }
        Ok((children, rx))
    }
}

/// How rank 0's reports are shown.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Progress bars and tables (`launch`); the summary points into `output`.
    Terminal { output: &'a Path },
    /// The JSON lines as they are (a pod's log).
    PassThrough,
}

fn forward(
    stream: Option<impl std::io::Read + Send + 'static>,
    rank: usize,
    tx: Sender<Line>,
    wrap: fn(usize, String) -> Line,
) {
    let Some(stream) = stream else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
            if tx.send(wrap(rank, line)).is_err() {
                return;
            }
        }
    });
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
        what: "finding a free port on",
        path: PathBuf::from("127.0.0.1"),
        source,
    })?;
    Ok(listener.local_addr().map(|a| a.port()).unwrap_or(29500))
}

/// Draws rank 0's progress, echoes warnings and errors of every rank, and decides the
/// outcome: all ranks exit 0, or the first failure (or Ctrl-C) stops the rest.
fn supervise(mut children: Vec<Child>, rx: Receiver<Line>, mode: Mode) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let mut view = View::default();
    let mut last_words: Vec<String> = vec![String::new(); children.len()];
    let mut failure: Option<(usize, String)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut done = vec![false; children.len()];
    let mut handle = |view: &mut View, line: Line| match line {
        Line::Out(0, line) if matches!(mode, Mode::PassThrough) => println!("{line}"),
        Line::Out(0, line) => match Event::parse(&line) {
            Some(event) => view.show(event),
            None => view.println(&line),
        },
        Line::Out(_, _) => {}
        Line::Err(rank, line) => {
            if !line.trim().is_empty() {
                view.println(&format!("[rank {rank}] {line}"));
                last_words[rank] = line;
            }
        }
    };
    loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            handle(&mut view, line);
        }
        if interrupted.load(Ordering::SeqCst) {
            view.finish();
            stop(&mut children);
            return Err(Error::Config(
                "interrupted (Ctrl-C): every rank was stopped; the next launch resumes from the newest checkpoint"
                    .into(),
            ));
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[rank] = true;
                if !status.success() && failure.is_none() {
                    let code = status.code().map_or_else(
                        || "was killed by a signal".to_string(),
                        |c| format!("exited with code {c}"),
                    );
                    failure = Some((rank, code));
                    failed_at = Some(Instant::now());
                }
            }
        }
        if done.iter().all(|d| *d) {
            // What the ranks printed last (a failed rank's error line may still be in its
            // pipe): the channel closes when every pipe has reached its end.
            for line in rx.iter() {
                handle(&mut view, line);
            }
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > PEER_GRACE) {
            stop(&mut children);
        }
    }
    view.finish();
    match failure {
        None => {
            if let Mode::Terminal { output } = mode {
                view.summary(output);
            }
            Ok(())
        }
        Some((rank, code)) => {
            let why = last_words[rank].trim_start_matches("error: ").to_string();
            Err(Error::Config(format!(
                "rank {rank} {code}: {}",
                if why.is_empty() { "no message" } else { &why }
            )))
        }
    }
}

fn stop(children: &mut [Child]) {
    for child in children.iter_mut() {
        // SIGTERM first, so a rank can leave its files consistent; then the hard way.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for child in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The terminal: one progress bar per epoch, a table per evaluation.
#[derive(Default)]
struct View {
    bar: Option<ProgressBar>,
    epochs: u64,
    steps_per_epoch: u64,
    labels: Vec<String>,
    evals: Vec<(u64, EvalReport)>,
    losses: Vec<(u64, f64)>,
    started: Option<Instant>,
    best: Option<f64>,
}

impl View {
    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn bar_for(&mut self, epoch: u64) -> &ProgressBar {
        let (epochs, len) = (self.epochs, self.steps_per_epoch);
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(len);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
            bar
        })
    }

    fn show(&mut self, event: Event) {
        match event {
            Event::Start {
                epochs,
                steps_per_epoch,
                total_steps,
                train_examples,
                validation_examples,
                world_size,
                labels,
                resumed_at_step,
            } => {
                self.epochs = epochs;
                self.steps_per_epoch = steps_per_epoch;
                self.labels = labels;
                self.started = Some(Instant::now());
                let resumed = resumed_at_step
                    .map(|s| format!(", resuming at step {s}"))
                    .unwrap_or_default();
                eprintln!(
                    "training on {train_examples} examples, validating on {validation_examples}; \
                     {world_size} rank(s), {steps_per_epoch} steps per epoch, {total_steps} in all{resumed}"
                );
            }
            Event::Step {
                epoch,
                step,
                loss,
                samples_per_s,
                allreduce_gbps,
                ..
            } => {
                self.losses.push((step, loss));
                // Accumulated micro-batches can carry a step over into the next epoch.
                let within = step.saturating_sub(epoch * self.steps_per_epoch);
                let bar = self.bar_for(epoch);
                bar.set_position(within);
                let ring =
                    allreduce_gbps.map_or(String::new(), |g| format!("  all-reduce {g:.2} GB/s"));
                bar.set_message(format!(
                    "loss {loss:.4}  {samples_per_s:.1} samples/s{ring}"
                ));
            }
            Event::Eval {
                epoch,
                step,
                best,
                report,
            } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                if best {
                    self.best = Some(report.accuracy);
                }
                eprintln!("{}", eval_table(epoch, step, &report, best));
                self.evals.push((step, report));
            }
            Event::Checkpoint { .. } => {}
            Event::Ring { order } => eprintln!("all-reduce ring: {order}"),
            Event::Done { seconds, .. } => {
                eprintln!("finished in {seconds:.1} s");
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    fn summary(&self, output: &Path) {
        let Some((step, last)) = self.evals.last() else {
            return;
        };
        eprintln!(
            "\n| run | value |\n|---|---|\n| steps | {step} |\n| final accuracy | {:.4} |\n\
             | final macro-F1 | {:.4} |\n| best accuracy | {:.4} |\n| time | {:.0} s |\n\
             | best model | {} |\n| metrics | {} |",
            last.accuracy,
            last.macro_f1,
            self.best.unwrap_or(last.accuracy),
            self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            output.join("best").display(),
            output.join("metrics.jsonl").display(),
        );
        let (svg, png) = (output.join("curves.svg"), output.join("curves.png"));
        let wrote_svg = std::fs::write(&svg, crate::plot::svg(&self.losses, &self.evals)).is_ok();
        let wrote_png = crate::plot::png(&self.losses, &self.evals)
            .save(&png)
            .is_ok();
        if wrote_svg && wrote_png {
            eprintln!("| curves | {} (and .svg) |", png.display());
        }
    }
}

fn eval_table(epoch: u64, step: u64, r: &EvalReport, best: bool) -> String {
    let mut out = format!(
        "epoch {}, step {step}: validation accuracy {:.4}, macro-F1 {:.4}, loss {:.4} ({} examples){}\n\
         | class | precision | recall | F1 | support |\n|---|---|---|---|---|\n",
        epoch + 1,
        r.accuracy,
        r.macro_f1,
        r.loss,
        r.examples,
        if best {
            "  (best so far: saved to best/)"
        } else {
            ""
        }
    );
    for c in &r.per_class {
        out += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} |\n",
            c.label, c.precision, c.recall, c.f1, c.support
        );
    }
    out
}
