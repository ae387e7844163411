"""The anchor for benches/tts_rtf.rs: Kokoro-82M int8 through Python onnxruntime 1.32 (2 intra
threads) with libespeak-ng phonemes through ctypes, as kokoro-onnx does it (espeak-ng IPA with
punctuation kept, vocab ids, style row = id count, tokens padded with 0), sentence by sentence.
Prints: median first-audio seconds, median whole-reply seconds, median RTF."""
import ctypes
import json
import re
import sys
import time

import numpy as np
import onnxruntime as ort

model, voices, vocab_path, text, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
vocab = json.load(open(vocab_path))["vocab"]
style_table = np.load(voices)["jf_alpha"]

lib = ctypes.cdll.LoadLibrary("libespeak-ng.so.1")
lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS
lib.espeak_SetVoiceByName(b"en-us")
lib.espeak_TextToPhonemes.restype = ctypes.c_char_p


def phonemize(clause):
    buf = ctypes.c_char_p(clause.encode())
    ptr = ctypes.c_void_p(ctypes.cast(buf, ctypes.c_void_p).value)
    out = []
    while ptr.value:
        r = lib.espeak_TextToPhonemes(ctypes.byref(ptr), 1, 2)
        if not r:
            break
        out.append(r.decode().strip())
    return " ".join(p for p in out if p)


def ids_of(sentence):
    phonemes = []
    for words, mark in re.findall(r"([^.,;:!?]+)([.,;:!?]?)", sentence):
        if words.strip():
            phonemes.append(phonemize(words) + mark)
    return [vocab[c] for c in " ".join(phonemes) if c in vocab]


opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
opts.inter_op_num_threads = 1
session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
sentences = re.findall(r"[^.!?]+[.!?]", text)
firsts, totals, rtfs = [], [], []
for run in range(runs + 1):
    t = time.perf_counter()
    first = None
    samples = 0
    for s in sentences:
        ids = ids_of(s.strip())
        audio = session.run(None, {
            "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
            "style": style_table[len(ids)],
            "speed": np.array([1.0], dtype=np.float32),
        })[0]
        samples += audio.size
        if first is None:
            first = time.perf_counter() - t
    total = time.perf_counter() - t
    if run > 0:
        firsts.append(first)
        totals.append(total)
        rtfs.append(total / (samples / 24000))
print(f"{np.median(firsts):.4f} {np.median(totals):.4f} {np.median(rtfs):.4f}")
