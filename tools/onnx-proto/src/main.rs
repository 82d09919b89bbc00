//! Writes `src/export/onnx/proto.rs`: prost's Rust types for `proto/onnx.proto`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto_dir = root.join("proto");
    let descriptors = protox::compile([proto_dir.join("onnx.proto")], [&proto_dir])
        .expect("proto/onnx.proto compiles");
    let out = tempdir(&root);
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(descriptors)
        .expect("prost generates the types");
    let generated = std::fs::read_to_string(out.join("onnx.rs")).expect("prost wrote onnx.rs");
    let header = "// Generated from proto/onnx.proto by tools/onnx-proto (prost-build); do not edit.\n";
    std::fs::write(root.join("src/export/onnx/proto.rs"), format!("{header}{generated}"))
        .expect("src/export/onnx/proto.rs is writable");
    std::fs::remove_dir_all(&out).ok();
}

/// A scratch directory for prost's output.
fn tempdir(root: &std::path::Path) -> PathBuf {
    let dir = root.join("target/onnx-proto-gen");
    std::fs::create_dir_all(&dir).expect("target/ is writable");
    dir
}
