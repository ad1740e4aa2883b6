//! The same rpath to libtorch as the sluice binary (`build/rpath.rs`).

include!("../../build/rpath.rs");

fn main() {
    rpath_to_libtorch();
}
