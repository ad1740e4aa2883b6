//! Gives every binary an rpath to libtorch (`build/rpath.rs`), and generates the gRPC service
//! of the inference API from `proto/inference.proto` with `protox` (a protobuf compiler in
//! Rust: no `protoc` needed).

include!("build/rpath.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpath_to_libtorch();
    println!("cargo:rerun-if-changed=proto/inference.proto");
    let descriptors = protox::compile(["proto/inference.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)?;
    Ok(())
}
