fn main() {
    // tests/cli.rs links the whisperstt plugin's crate (and so whisper.cpp) into its test binary:
    // whisper.cpp's llamafile_sgemm, softmax and unary calls go through elements/whisper/src/gemm
    // and src/ops there too, with the link arguments and on the conditions of
    // elements/whisper/build.rs. The benches link it without them, so that transcribe_rtf's
    // direct whisper-rs call is stock whisper.cpp (the wrappers, unreferenced there, are left
    // out of the link by --gc-sections, which rustc always passes for them).
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=GGML_LLAMAFILE");
    let var = |name| std::env::var(name).unwrap_or_default();
    let linux_x86_64 =
        var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ARCH") == "x86_64";
    if linux_x86_64 {
        for op in ["soft_max", "unary"] {
            println!("cargo::rustc-link-arg-tests=-Wl,--wrap=ggml_compute_forward_{op}");
            println!(
                "cargo::rustc-link-arg-tests=-Wl,--undefined=__wrap_ggml_compute_forward_{op}"
            );
        }
    }
    if linux_x86_64
        && ["ON", "1", "TRUE", "YES"].contains(&var("GGML_LLAMAFILE").to_uppercase().as_str())
    {
        println!("cargo::rustc-link-arg-tests=-Wl,--wrap=llamafile_sgemm");
        println!("cargo::rustc-link-arg-tests=-Wl,--undefined=__wrap_llamafile_sgemm");
    }
}
