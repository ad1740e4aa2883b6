/// Gives every binary an rpath to the libtorch that torch-sys linked against (with
/// `LIBTORCH_USE_PYTORCH=1`, the `torch/lib` folder of the Python install), so that it runs
/// without LD_LIBRARY_PATH. Shared by the build scripts of sluice and sluice-bench.
fn rpath_to_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
