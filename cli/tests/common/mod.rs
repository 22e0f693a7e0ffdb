//! Helpers shared by the CLI tests: run the real `q3c` binary and check its output.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs q3c with `args`.
pub fn q3c(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_q3c"))
        .args(args)
        .output()
        .expect("q3c runs")
}

/// Runs q3c, asserts it succeeded, and returns its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = q3c(args);
    assert!(
        out.status.success(),
        "q3c {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Asserts a failed run: non-zero exit, no panic, stderr starting with `error: ` and containing `want`.
pub fn assert_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(want),
        "expected {want:?} in {stderr}"
    );
}

/// `1,2,3` from ids.
pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The `ids` field of `generate --json` output.
pub fn json_ids(stdout: &str) -> Vec<u32> {
    let obj: serde_json::Value = serde_json::from_str(stdout).expect("one JSON object");
    obj["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}
