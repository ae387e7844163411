//! Runs Silero VAD on N chunks and exits: a fixed workload for `valgrind --tool=callgrind`,
//! whose instruction counts (unlike wall time) do not move with the machine's load. Used by
//! `scripts/bench` beside `benches/vad_python.py --count N` to compare instructions per chunk.
//! Usage: `vad_count native|onnxruntime N`.

use gstvoxvad::silero::{EngineKind, SileroVad};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(0);
    let kind = if args.iter().any(|a| a == "onnxruntime") {
        EngineKind::OnnxRuntime
    } else {
        EngineKind::Native
    };
    let mut vad = SileroVad::load_with("silero-vad", 16000, kind).expect("run scripts/setup");
    let chunk = [0.0f32; 512];
    let mut sum = 0.0;
    for _ in 0..n {
        sum += vad.process(&chunk).expect("inference");
    }
    std::hint::black_box(sum);
}
