//! Makes missing test fixtures visible. The integration tests read the shared fixtures from
//! `$AXCOMPRESS_FIXTURES` or `../shared`; when they are missing (and not under `CI=true`, where a
//! missing fixture must fail), this sets `cfg(fixtures_missing)`, so that every test needing them
//! is reported as `ignored` with the reason, and prints a warning naming the path.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fixtures_missing)");
    println!("cargo::rerun-if-env-changed=AXCOMPRESS_FIXTURES");
    println!("cargo::rerun-if-env-changed=CI");
    let dir = std::env::var_os("AXCOMPRESS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../shared")
        });
    // A missing path makes cargo rerun this script on every build, so fixtures that appear
    // later are noticed.
    println!("cargo::rerun-if-changed={}", dir.display());
    let present = dir.join("models").is_dir() && dir.join("data").is_dir();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !present && !in_ci {
        println!("cargo::rustc-cfg=fixtures_missing");
        println!(
            "cargo::warning=shared fixtures not found at {}: tests that need them are IGNORED (set AXCOMPRESS_FIXTURES=/path/to/shared)",
            dir.display()
        );
    }
}
