//! `ringmaster serve`: a fine-tuned classifier over HTTP (Open Inference Protocol v2,
//! KServe v1, plain `/predict`), with dynamic batching, Prometheus metrics and graceful
//! shutdown. The process an InferenceService's pods run, and the local step after
//! `ringmaster launch`.

mod batcher;
pub mod classifier;
mod http;
mod metrics;
pub mod protocol;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::{Error, Result};
use batcher::{BatchPolicy, Batcher};
use classifier::Classifier;
use http::{Limits, Loaded, Server};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model: the output directory of `ringmaster launch` or a TrainingJob (serves
    /// its `best/`), a directory with `model.safetensors` + `config.json` (+
    /// `tokenizer.json`), or `hf://org/name`.
    #[arg(long)]
    pub model: String,
    /// The model's name in URLs (`/v2/models/<name>/infer`).
    #[arg(long, default_value = "model")]
    pub name: String,
    /// Class names in index order, `a,b,c` or a JSON array (`["a", "b, c"]`) for names
    /// with commas (default: the model's `labels.json` or `id2label`).
    #[arg(long, value_parser = parse_labels)]
    pub labels: Option<Labels>,
    /// Address to listen on: an IPv4 or IPv6 address (`::` for every IPv6 interface).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most inputs in one forward pass.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Longest a request waits for others to join its batch (it never waits when no
    /// other request is in flight).
    #[arg(long, default_value_t = 5)]
    pub max_delay_ms: u64,
    /// Inference requests in flight before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_concurrency: usize,
    /// Largest request body; larger ones get 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// A request not answered within this gets 504.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Threads for the model's kernels (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Class names given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels(pub Vec<String>);

fn parse_labels(arg: &str) -> std::result::Result<Labels, String> {
    let labels: Vec<String> = if arg.trim_start().starts_with('[') {
        serde_json::from_str(arg).map_err(|e| format!("not a JSON array of strings: {e}"))?
    } else {
        arg.split(',').map(str::to_string).collect()
    };
    if labels.iter().any(String::is_empty) {
        return Err("class names cannot be empty".into());
    }
    Ok(Labels(labels))
}

/// Serves until SIGTERM or Ctrl-C, then drains in-flight requests.
pub fn run(args: &ServeArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .map_err(|e| Error::Config(format!("--threads {threads}: {e}")))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the HTTP runtime: {e}")))?;
    runtime.block_on(serve(args))
}

async fn serve(args: &ServeArgs) -> Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Config(format!("cannot listen on {addr}: {source}")))?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Config(format!("cannot listen on {addr}: {source}")))?;
    eprintln!(
        "ringmaster serve: listening on http://{local} (ready once {} is loaded)",
        args.model
    );
    let limits = Limits {
        max_concurrency: args.max_concurrency.max(1),
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
    };
    let server = Server::new(args.name.clone(), limits);
    // Live at once, ready after loading: the probes tell a slow load from a dead server.
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let (loader_args, loader_server) = (args.clone(), server.clone());
    std::thread::spawn(move || {
        let _ = loaded_tx.send(load(&loader_args, &loader_server));
    });
    let app = http::router(server.clone());
    let shutdown_server = server.clone();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let http = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            () = stop_signal() => {}
            error = failed_rx => { let _: std::result::Result<(), _> = error; }
        }
        shutdown_server.set_draining();
    });
    let mut http = tokio::spawn(async move { http.await });
    // A stop signal while the model loads ends the process without waiting for the load.
    let outcome = tokio::select! {
        loaded = loaded_rx => match loaded {
            Ok(loaded) => loaded,
            Err(_) => Err(Error::Config("the model loader stopped".into())),
        },
        served = &mut http => return http_outcome(served),
    };
    if outcome.is_err() {
        let _ = failed_tx.send(());
    }
    let served = http.await;
    outcome?;
    http_outcome(served)
}

fn http_outcome(
    served: std::result::Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    served
        .map_err(|e| Error::Config(format!("the HTTP server stopped: {e}")))?
        .map_err(|e| Error::Config(format!("the HTTP server failed: {e}")))
}

fn load(args: &ServeArgs, server: &Server) -> Result<()> {
    let started = Instant::now();
    let dir: PathBuf = classifier::resolve_model_dir(&args.model)?;
    let labels = args.labels.as_ref().map_or(&[][..], |l| &l.0[..]);
    let classifier = Arc::new(Classifier::load(&dir, labels)?);
    let policy = BatchPolicy {
        max_batch: args.max_batch_size.max(1),
        max_delay: Duration::from_millis(args.max_delay_ms),
    };
    // Warm up one input and a full batch, so the first requests do not pay for
    // first-touch allocation.
    let sample = classifier.sample_input();
    classifier.classify(&[&sample])?;
    classifier.classify(&vec![&sample; policy.max_batch])?;
    let kind = if classifier.takes_text() {
        "text"
    } else {
        "images"
    };
    eprintln!(
        "ringmaster serve: ready: {name} ({kind}, classes {:?}, version {}) from {} in {:.1} s; \
         POST /v2/models/{name}/infer, /v1/models/{name}:predict or /predict",
        classifier.labels,
        classifier.version,
        dir.display(),
        started.elapsed().as_secs_f64(),
        name = args.name,
    );
    let batcher = Batcher::start(
        classifier.clone(),
        policy,
        server.metrics.clone(),
        server.pending.clone(),
    );
    server.set_loaded(Loaded {
        classifier,
        batcher,
    });
    Ok(())
}

async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("ringmaster serve: stopping; finishing requests in flight");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_as_a_list_or_json() {
        assert_eq!(
            parse_labels("ham,spam"),
            Ok(Labels(vec!["ham".into(), "spam".into()]))
        );
        assert_eq!(
            parse_labels(r#"["ham", "spam, probably"]"#),
            Ok(Labels(vec!["ham".into(), "spam, probably".into()]))
        );
        assert!(parse_labels("ham,,spam").unwrap_err().contains("empty"));
        assert!(parse_labels("[ham]").unwrap_err().contains("JSON array"));
    }
}
