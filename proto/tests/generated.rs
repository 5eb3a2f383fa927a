//! The gRPC code in `src/generated/` is generated from `proto/decant.proto`
//! and committed, so building decant needs no protoc. This test regenerates
//! it and fails if the committed copy is stale; run it with
//! `DECANT_REGENERATE=1` to rewrite the committed copy.

use std::path::Path;

#[test]
fn generated_grpc_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile_dir();
    tonic_prost_build::configure()
        .build_transport(true)
        .bytes(".")
        .out_dir(&out)
        .compile_protos(&[root.join("proto/decant.proto")], &[root.join("proto")])
        .expect("protoc must be installed (scripts/setup.sh installs protobuf-compiler)");
    let fresh = std::fs::read_to_string(out.join("decant.v1.rs")).unwrap();
    let committed_path = root.join("src/generated/decant.v1.rs");
    if std::env::var_os("DECANT_REGENERATE").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "src/generated/decant.v1.rs is stale: run `DECANT_REGENERATE=1 cargo test -p decant-proto --test generated`"
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("decant-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
