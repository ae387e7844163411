"""The official openai Python client against `vox serve`, unchanged but for the base URL.

Usage: openai_client.py BASE_URL AUDIO.wav OUT_DIR; prints one line per check, exits non-zero
on the first failure.
"""
import json
import sys

import openai

base, audio, out = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="sesame")


def check(name, ok, detail=""):
    print(f"{'ok' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(1)


with open(audio, "rb") as f:
    t = client.audio.transcriptions.create(model="whisper-1", file=f)
check("json", "ask not what your country" in t.text.lower(), repr(t.text))

for fmt, expect in (("text", "country"), ("srt", "00:00:0"), ("vtt", "WEBVTT")):
    with open(audio, "rb") as f:
        r = client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    check(fmt, isinstance(r, str) and expect in r, repr(r[:60]))

with open(audio, "rb") as f:
    v = client.audio.transcriptions.create(
        model="whisper-1",
        file=f,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
check("verbose_json", v.duration > 10 and len(v.segments) >= 2 and len(v.words) >= 18,
      f"{v.duration} s, {len(v.segments)} segments, {len(v.words)} words")

with client.audio.speech.with_streaming_response.create(
    model="tts-1", voice="jf_alpha", input="Hello from the speech service.", response_format="wav"
) as r:
    r.stream_to_file(f"{out}/speech.wav")
check("speech wav", open(f"{out}/speech.wav", "rb").read(4) == b"RIFF")

mp3 = client.audio.speech.create(model="tts-1", voice="jf_alpha", input="Hello again.")
check("speech mp3 (the default format)", len(mp3.content) > 1000, f"{len(mp3.content)} bytes")

try:
    client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    check("unknown voice is an error", False)
except openai.BadRequestError as e:
    check("unknown voice is an error", e.code == "invalid_voice" and e.param == "voice",
          json.dumps(e.body))
