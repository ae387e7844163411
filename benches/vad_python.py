"""The anchor for benches/vad_chunk.rs: Silero VAD v6 through Python onnxruntime 1.32, one
thread, the same 576-sample input (64 context + 512 new) and recurrent state. Prints ms/chunk."""
import sys
import time

import numpy as np
import onnxruntime as ort

model = sys.argv[1]
# `--count N`: run N chunks and exit (a fixed workload for callgrind).
count = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--count" else None
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
x = np.zeros((1, 576), np.float32)
state = np.zeros((2, 1, 128), np.float32)
sr = np.array(16000, dtype=np.int64)
if count is not None:
    for _ in range(count):
        _, state = session.run(None, {"input": x, "state": state, "sr": sr})
    sys.exit(0)
for _ in range(500):
    _, state = session.run(None, {"input": x, "state": state, "sr": sr})
runs = []
for _ in range(5):
    n = 4000
    t = time.perf_counter()
    for _ in range(n):
        _, state = session.run(None, {"input": x, "state": state, "sr": sr})
    runs.append((time.perf_counter() - t) / n * 1e3)
runs.sort()
print(f"{runs[len(runs) // 2]:.4f}")
