"""Load for `vox serve` (scripts/bench-serve): CLIENTS threads send REQUESTS requests in all, over
plain HTTP (stdlib only), and print one JSON line of what they saw.

  serve_load.py stt BASE_URL CLIENTS REQUESTS AUDIO.wav AUDIO_SECONDS
  serve_load.py tts BASE_URL CLIENTS REQUESTS "TEXT"

stt: throughput (audio seconds transcribed per second of wall time), latency p50/p95.
tts: time to first audio byte p50/p95, real-time factor per request (time to last byte over the
audio made), throughput (audio seconds made per second), and stall p50/max: how long a player
that starts at the first byte and plays in real time would wait for audio in all (underruns).
Any status but 200 is counted.
"""
import http.client
import json
import queue
import sys
import threading
import time
import urllib.parse
import uuid

kind, base, clients, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
url = urllib.parse.urlparse(base)
jobs = queue.Queue()
for i in range(total):
    jobs.put(i)
lock = threading.Lock()
results = []


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else 0.0


def stt_request(conn, audio):
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\ntext\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    t = time.perf_counter()
    conn.request("POST", "/v1/audio/transcriptions", body,
                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    r.read()
    return {"status": r.status, "latency": time.perf_counter() - t}


def tts_request(conn, text):
    body = json.dumps({"model": "tts-1", "input": text, "voice": "jf_alpha",
                       "response_format": "pcm"}).encode()
    t = time.perf_counter()
    conn.request("POST", "/v1/audio/speech", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    first, size = None, 0
    # A real-time player from the first byte: when its audio runs out, and how long it waited.
    runs_out, stall = None, 0.0
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        now = time.perf_counter() - t
        if first is None:
            first = now
        size += len(chunk)
        seconds = len(chunk) / 48000.0
        if runs_out is None or now > runs_out:
            stall += 0.0 if runs_out is None else now - runs_out
            runs_out = now + seconds
        else:
            runs_out += seconds
    took = time.perf_counter() - t
    audio = size / 48000.0
    return {"status": r.status, "first": first or took, "took": took, "audio": audio,
            "stall": stall}


def worker(payload):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    while True:
        try:
            jobs.get_nowait()
        except queue.Empty:
            return
        r = stt_request(conn, payload) if kind == "stt" else tts_request(conn, payload)
        with lock:
            results.append(r)


payload = open(sys.argv[5], "rb").read() if kind == "stt" else sys.argv[5]
start = time.perf_counter()
threads = [threading.Thread(target=worker, args=(payload,)) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start
ok = [r for r in results if r["status"] == 200]
out = {"clients": clients, "requests": total, "ok": len(ok), "wall": wall}
if kind == "stt":
    audio_seconds = float(sys.argv[6])
    lat = [r["latency"] for r in ok]
    out.update(throughput=len(ok) * audio_seconds / wall, p50=pct(lat, 50), p95=pct(lat, 95))
else:
    firsts = [r["first"] for r in ok]
    rtfs = [r["took"] / r["audio"] for r in ok if r["audio"] > 0]
    stalls = [r["stall"] for r in ok]
    out.update(first_p50=pct(firsts, 50), first_p95=pct(firsts, 95), rtf_p50=pct(rtfs, 50),
               throughput=sum(r["audio"] for r in ok) / wall, stall_p50=pct(stalls, 50),
               stall_max=max(stalls, default=0.0))
print(json.dumps(out))
