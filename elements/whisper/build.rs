fn main() {
    gst_plugin_version_helper::info();
    // whisper.cpp's calls to llamafile_sgemm go through src/gemm (its `hook` module), on
    // Linux x86-64 (GNU ld's --wrap) and when ggml has llamafile_sgemm (GGML_LLAMAFILE=ON,
    // which .cargo/config.toml sets for every build; without it there is nothing to wrap);
    // its softmax and unary operations go through src/ops on Linux x86-64.
    println!("cargo::rustc-check-cfg=cfg(vox_sgemm_hook)");
    println!("cargo::rustc-check-cfg=cfg(vox_ops_hook)");
    println!("cargo::rerun-if-env-changed=GGML_LLAMAFILE");
    if linux_x86_64() {
        println!("cargo::rustc-cfg=vox_ops_hook");
        for arg in OPS_WRAP {
            println!("cargo::rustc-link-arg={arg}");
        }
    }
    if hooked() {
        println!("cargo::rustc-cfg=vox_sgemm_hook");
        for arg in WRAP {
            println!("cargo::rustc-link-arg={arg}");
        }
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// Whether this build is for Linux x86-64, where GNU ld's --wrap sends ggml's calls to ours.
fn linux_x86_64() -> bool {
    var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
}

/// Whether this build wraps llamafile_sgemm (the root package's build.rs asks the same).
fn hooked() -> bool {
    linux_x86_64()
        && ["ON", "1", "TRUE", "YES"].contains(&var("GGML_LLAMAFILE").to_uppercase().as_str())
}

/// The link arguments that send whisper.cpp's `llamafile_sgemm` calls to our wrapper; every
/// binary that links this crate with whisper.cpp needs them (the root package's tests too).
const WRAP: [&str; 2] = [
    "-Wl,--wrap=llamafile_sgemm",
    // Linked from an rlib, the wrapper must be pulled in before ggml asks for it.
    "-Wl,--undefined=__wrap_llamafile_sgemm",
];

/// The same for ggml's softmax and unary operations (src/ops).
const OPS_WRAP: [&str; 4] = [
    "-Wl,--wrap=ggml_compute_forward_soft_max",
    "-Wl,--undefined=__wrap_ggml_compute_forward_soft_max",
    "-Wl,--wrap=ggml_compute_forward_unary",
    "-Wl,--undefined=__wrap_ggml_compute_forward_unary",
];
