//! Gives `streamiq-adapt` an rpath to the libtorch that tch was built against, so the
//! release binary runs with no environment variable set, and links libtorch_cuda even
//! though no symbol of it is referenced (otherwise `--as-needed` drops it and CUDA is
//! never found; tch issue 980).

fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
