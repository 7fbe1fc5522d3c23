//! libiscsi's conformance suite (`iscsi-test-cu`) over the whole ALL family against
//! `ingot serve --iscsi`, one suite per process (results of one whole run depend on test order).
//! CUnit counts skips as passes, so skipped tests are counted from their `[SKIPPED]` lines.
//! The test prints the totals and asserts that nothing failed.

use std::process::Command;
use std::time::Duration;

use ingot_tests::*;

/// Passed, failed and skipped tests of one suite's verbose output.
fn count(log: &str) -> (u32, u32, u32) {
    let mut run = 0;
    let mut failed = 0;
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"tests") && f.len() >= 5 {
            run = f[2].parse().unwrap_or(0);
            failed = f[4].parse().unwrap_or(0);
        }
    }
    // A test is skipped when any [SKIPPED] line appears in its output (some print two).
    let mut skipped = 0;
    let mut in_test = false;
    let mut skip = false;
    for line in log.lines() {
        if line.starts_with("  Test: ") {
            if in_test && skip {
                skipped += 1;
            }
            in_test = true;
            skip = false;
        }
        if line.contains("[SKIPPED]") {
            skip = true;
        }
    }
    if in_test && skip {
        skipped += 1;
    }
    (run - failed.min(run) - skipped.min(run), failed, skipped)
}

#[test]
fn iscsi_test_cu_all_suites_pass() {
    let cu = require_tool("iscsi-test-cu");
    let stdbuf = require_tool("stdbuf");
    let dir = TempDir::new("iscsi-cu");
    let (srv, port) = iscsi_server(dir.path(), "2G", "1G", &[]);
    let url = format!("iscsi://127.0.0.1:{port}/iqn.2026-11.io.ingot:vol0/0");

    let list = run_stdout(Command::new(&cu).arg("-l"));
    let suites: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ALL.") && l.matches('.').count() == 1)
        .collect();
    assert!(suites.len() > 40, "iscsi-test-cu -l listed only {suites:?}");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for suite in &suites {
        // The URL twice: MultipathIO then runs over two sessions instead of skipping.
        let out = output_timeout(
            Command::new(&stdbuf)
                .args(["-o0", "-e0"])
                .arg(&cu)
                .args(["-d", "-v"])
                .arg(format!("--test={suite}"))
                .arg(&url)
                .arg(&url),
            Duration::from_secs(600),
        );
        let log = String::from_utf8_lossy(&out.stdout).to_string();
        let (p, f, s) = count(&log);
        let f = if !out.status.success() && f == 0 {
            1
        } else {
            f
        };
        println!("{suite:<32} passed {p:>3}  failed {f:>3}  skipped {s:>3}");
        passed += p;
        failed += f;
        skipped += s;
        if f > 0 {
            failures.push(format!(
                "--- {suite} ({}) ---\n{log}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    println!(
        "iscsi-test-cu totals for ingot: passed {passed}, failed {failed}, skipped {skipped} \
         (of {})",
        passed + failed + skipped
    );
    assert!(
        failures.is_empty(),
        "{failed} iscsi-test-cu tests failed:\n{}\n--- server stderr ---\n{}",
        failures.join("\n"),
        srv.stderr()
    );
    srv.stop();
}
