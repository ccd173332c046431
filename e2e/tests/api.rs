//! The API as users meet it: `kubectl apply` of the examples against the real
//! kube-apiserver, and of each invalid example, which must be rejected with a message
//! naming the field.

use std::path::Path;
use std::process::Output;

use ringmaster_e2e::{client, delete_namespace, kubectl, namespace, repo_root};

fn run(args: &[&str]) -> Output {
    kubectl()
        .args(args)
        .output()
        .expect("run the pinned kubectl (built by e2e/build-binaries.sh)")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn examples_are_accepted_as_written() {
    let client = client().await;
    let ns = namespace(&client, "examples").await;
    let dir = repo_root().join("examples");
    let out = run(&["apply", "-n", &ns, "-f", dir.to_str().unwrap()]);
    assert!(out.status.success(), "examples/ rejected:\n{}", text(&out));
    let applied = text(&out);
    for name in [
        "trainingjob.ringmaster.dev/bert-spam",
        "trainingjob.ringmaster.dev/resnet-fashion",
        "inferenceservice.ringmaster.dev/spam-classifier",
    ] {
        assert!(applied.contains(name), "{name} not applied:\n{applied}");
    }

    // Defaults are filled in by the API server, so `get -o yaml` shows what will run.
    let out = run(&[
        "get",
        "tj",
        "bert-spam",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.distribution.backend} {.spec.training.optimizer} {.spec.scheduling.schedulerName} {.spec.runPolicy.restartPolicy}",
    ]);
    assert_eq!(text(&out), "auto adamw ringmaster-scheduler OnFailure");

    // Printer columns and short names.
    let out = run(&["get", "tj", "-n", &ns]);
    let header = text(&out);
    for column in [
        "NAME", "PHASE", "WORKERS", "EPOCH", "LOSS", "ACCURACY", "AGE",
    ] {
        assert!(
            header.lines().next().unwrap_or("").contains(column),
            "no {column} column:\n{header}"
        );
    }
    let out = run(&["get", "isvc", "-n", &ns]);
    assert!(text(&out).contains("spam-classifier"), "{}", text(&out));
    let out = run(&["get", "ringmaster", "-n", &ns]);
    assert!(
        text(&out).contains("bert-spam") && text(&out).contains("spam-classifier"),
        "category: {}",
        text(&out)
    );

    // `kubectl explain` shows the doc comments.
    let out = run(&["explain", "trainingjob.spec.training.batchSize"]);
    assert!(
        text(&out).contains("Examples per worker process per step"),
        "{}",
        text(&out)
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn invalid_examples_are_rejected_naming_the_field() {
    let client = client().await;
    let ns = namespace(&client, "invalid").await;
    let dir = repo_root().join("examples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the invalid examples in {}",
        dir.display()
    );
    for file in files {
        let expected = expected_message(&file);
        let out = run(&["apply", "-n", &ns, "-f", file.to_str().unwrap()]);
        let said = text(&out);
        assert!(
            !out.status.success(),
            "{} was accepted:\n{said}",
            file.display()
        );
        assert!(
            said.contains(&expected),
            "{}: expected the API server to say {expected:?}, it said:\n{said}",
            file.display()
        );
    }
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn spec_is_immutable_while_running() {
    let client = client().await;
    let ns = namespace(&client, "immutable").await;
    let file = repo_root().join("examples/bert-spam.yaml");
    assert!(
        run(&["apply", "-n", &ns, "-f", file.to_str().unwrap()])
            .status
            .success()
    );
    // Before it runs, the spec may change.
    let out = run(&[
        "patch",
        "tj",
        "bert-spam",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"training":{"epochs":4}}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&[
        "patch",
        "tj",
        "bert-spam",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&[
        "patch",
        "tj",
        "bert-spam",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"training":{"epochs":5}}}"#,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("immutable while the job is Running"),
        "{}",
        text(&out)
    );
    // Run policy stays mutable (suspend is how a running job is paused).
    let out = run(&[
        "patch",
        "tj",
        "bert-spam",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"runPolicy":{"suspend":true}}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    delete_namespace(&client, &ns).await;
}

/// Each invalid example starts with `# expect: <text the API server must say>`.
fn expected_message(file: &Path) -> String {
    let body = std::fs::read_to_string(file).unwrap();
    body.lines()
        .next()
        .and_then(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} lacks a first line `# expect: ...`", file.display()))
        .to_string()
}
