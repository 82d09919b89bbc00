//! Makes missing test fixtures visible. The integration tests read the shared fixtures from
//! `$AXCOMPRESS_FIXTURES` or `../shared`; when they are missing (and not under `CI=true`, where a
//! missing fixture must fail), this sets `cfg(fixtures_missing)`, so that every test needing them
//! is reported as `ignored` with the reason, and prints a warning naming the path.
//! `AXCOMPRESS_FIXTURES=none` declares a machine without them (a hosted CI runner): the same,
//! even under `CI=true`.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fixtures_missing)");
    println!("cargo::rerun-if-env-changed=AXCOMPRESS_FIXTURES");
    println!("cargo::rerun-if-env-changed=CI");
    // `AXCOMPRESS_FIXTURES=none`: a machine without the fixtures by intent (a hosted CI runner):
    // the extended suite is ignored even under CI=true, and says so.
    if std::env::var("AXCOMPRESS_FIXTURES").is_ok_and(|v| v == "none") {
        println!("cargo::rustc-cfg=fixtures_missing");
        println!("cargo::warning=AXCOMPRESS_FIXTURES=none: the extended suite (tests that need the shared fixtures) is IGNORED");
        return;
    }
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
