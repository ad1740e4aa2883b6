//! Gives every binary an rpath to the libtorch that torch-sys linked against (with
//! `LIBTORCH_USE_PYTORCH=1`, the `torch/lib` folder of the Python install), so `sluice` runs
//! without LD_LIBRARY_PATH; and generates the gRPC service of the inference API from
//! `proto/inference.proto`, with `protox` (a protobuf compiler in Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-changed=proto/inference.proto");
    let descriptors = protox::compile(["proto/inference.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)?;
    Ok(())
}
