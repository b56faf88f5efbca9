//! Generates prost/tonic code from `proto/`, with a vendored protoc so a fresh
//! machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let files = [
        "proto/switchyard/v1/routing.proto",
        "proto/switchyard/v1/telemetry.proto",
        "proto/switchyard/v1/admin.proto",
    ];
    tonic_build::configure().compile_protos(&files, &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
