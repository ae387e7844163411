fn main() {
    gst_plugin_version_helper::info();
    // whisper.cpp's calls to llamafile_sgemm go through src/gemm (its `hook` module). ggml has
    // llamafile_sgemm with GGML_LLAMAFILE=ON, which .cargo/config.toml sets for every build.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64")
    {
        for arg in WRAP {
            println!("cargo::rustc-link-arg={arg}");
        }
    }
}

/// The link arguments that send whisper.cpp's `llamafile_sgemm` calls to our wrapper; every
/// binary that links this crate with whisper.cpp needs them (the root package's tests too).
const WRAP: [&str; 2] = [
    "-Wl,--wrap=llamafile_sgemm",
    // Linked from an rlib, the wrapper must be pulled in before ggml asks for it.
    "-Wl,--undefined=__wrap_llamafile_sgemm",
];
