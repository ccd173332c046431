//! `ringmaster-scheduler`: places pods that name it, gangs all-or-nothing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringmaster_operator::scheduler::run::{Settings, run};
use ringmaster_placement::simulate::{self, SimulateArgs};

/// A Kubernetes scheduler for pods with `spec.schedulerName: ringmaster-scheduler`.
///
/// Pods sharing the label `ringmaster.dev/gang` (with `ringmaster.dev/gang-size: N`) are
/// bound all or none, once all N exist and are ungated; a pod without it is a gang of one.
/// Annotations: `ringmaster.dev/placement: pack|spread`,
/// `ringmaster.dev/required-topology-key` / `preferred-topology-key` (a node label, e.g.
/// topology.kubernetes.io/zone), `ringmaster.dev/gpu-milli` (a share of one GPU). The
/// scheduler writes `ringmaster.dev/gpu-indices` on each pod it binds, with
/// `ringmaster.dev/zone` / `ringmaster.dev/rack` from the node's
/// `topology.kubernetes.io/zone` / `ringmaster.dev/rack` labels when it has them, and
/// explains in numbers why a gang waits (PodScheduled=False, reason Unschedulable, and an
/// Event).
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Schedule pods whose spec.schedulerName is this.
    #[arg(long, default_value = "ringmaster-scheduler")]
    scheduler_name: String,
    /// Schedule pods of this namespace only (default: all). Pods of every namespace are
    /// still counted on their nodes.
    #[arg(long, env = "RINGMASTER_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// Identity in the leader lease (defaults to the pod name, then the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader lease.
    #[arg(long, default_value = "ringmaster-scheduler")]
    lease_name: String,
    /// Lease duration in seconds: how long a dead leader blocks a standby.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Policy for gangs that do not ask for `spread`: fragpack, fgd, bestfit, gpupacking,
    /// gpuclustering, dotprod, spread, random.
    #[arg(long, default_value = "fragpack")]
    policy: String,
    /// Seconds a gang that does not fit lets smaller gangs go ahead of it (backfill);
    /// after that, the nodes it would use are reserved for it until it fits.
    #[arg(long, default_value_t = 60.0)]
    starvation_threshold_seconds: f64,
    /// Gangs bound concurrently (each binds its members concurrently).
    #[arg(long, default_value_t = 64)]
    bind_concurrency: usize,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay the openb GPU traces through the placement policies (no cluster needed).
    Simulate(SimulateArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_json {
        builder.json().init()
    } else {
        builder.init()
    }

    if let Some(Command::Simulate(sim)) = &args.command {
        return match simulate::run(sim) {
            Ok(table) => {
                print!("{table}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "simulate failed");
                std::process::ExitCode::FAILURE
            }
        };
    }

    let identity = args.identity.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ringmaster-scheduler".into())
            + &format!("-{}", std::process::id())
    });
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client (set KUBECONFIG or run in a pod)");
            return std::process::ExitCode::FAILURE;
        }
    };
    let settings = Settings {
        scheduler_name: args.scheduler_name,
        namespace: args.namespace,
        listen: args.listen,
        identity,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        policy: args.policy,
        starvation_threshold: match Duration::try_from_secs_f64(args.starvation_threshold_seconds) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, value = args.starvation_threshold_seconds, "--starvation-threshold-seconds must be a non-negative number");
                return std::process::ExitCode::FAILURE;
            }
        },
        bind_concurrency: args.bind_concurrency.max(1),
    };
    match run(client, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "scheduler stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
