fn main() {
    // tests/reply.rs links the whisperstt plugin (and so whisper.cpp) into the test binary: its
    // llamafile_sgemm calls go through elements/whisper/src/gemm, as in the plugin.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64")
    {
        println!("cargo::rustc-link-arg-tests=-Wl,--wrap=llamafile_sgemm");
        println!("cargo::rustc-link-arg-tests=-Wl,--undefined=__wrap_llamafile_sgemm");
    }
}
