//! Runs Silero VAD on N chunks and exits: a fixed workload for `valgrind --tool=callgrind`,
//! whose instruction counts (unlike wall time) do not move with the machine's load. Used by
//! `scripts/bench` beside `benches/vad_python.py --count N` to compare instructions per chunk.

use gstvoxvad::silero::SileroVad;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(0);
    let mut vad = SileroVad::load("silero-vad", 16000).expect("run scripts/setup");
    let chunk = [0.0f32; 512];
    let mut sum = 0.0;
    for _ in 0..n {
        sum += vad.process(&chunk).expect("inference");
    }
    std::hint::black_box(sum);
}
