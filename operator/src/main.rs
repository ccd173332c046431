//! `ringmaster-operator`: reconciles TrainingJobs into gangs of worker pods and
//! InferenceServices into autoscaled model servers.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ringmaster_operator::run::{Settings, run};

/// Reconciles ringmaster.dev TrainingJobs into worker pods, a headless Service and
/// the objects the trainer needs, restarting failed gangs; and InferenceServices into a
/// Deployment, Service and autoscaler; reports status and Events.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "RINGMASTER_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Identity in the leader lease (defaults to the pod name, then the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader lease.
    #[arg(long, default_value = "ringmaster-operator")]
    lease_name: String,
    /// Lease duration in seconds: how long a dead leader blocks a standby.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// First delay before a failed gang restarts, in seconds; doubles per restart (max 300).
    #[arg(long, default_value_t = 10.0)]
    restart_backoff_seconds: f64,
    /// Objects reconciled at once, per controller.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long)]
    log_json: bool,
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

    let identity = args.identity.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ringmaster-operator".into())
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
        namespace: args.namespace,
        listen: args.listen,
        identity,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        restart_backoff: Duration::from_secs_f64(args.restart_backoff_seconds.max(0.0)),
        concurrency: args.concurrency.max(1),
    };
    match run(client, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
