//! `ringmaster bench allreduce` starts real rank processes and prints checked rows.

#[test]
fn bench_allreduce_runs_ranks_and_checks_results() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .args([
            "bench",
            "allreduce",
            "--world-sizes",
            "2,3",
            "--max-bytes",
            "65536",
        ])
        .output()
        .expect("run ringmaster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 2 ") || l.starts_with("| 3 "))
        .collect();
    assert_eq!(
        rows.len(),
        2 * 4,
        "1, 4, 16, 64 KiB for 2 and 3 ranks:\n{stdout}"
    );
    assert!(
        rows.iter().all(|r| r.trim_end().ends_with("| ok |")),
        "{stdout}"
    );
}
