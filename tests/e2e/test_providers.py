"""Each provider type against a mock that checks what the real API would get
and answers as the real API does; and a fallback chain across types."""

import base64
import json
import struct

import pytest

from conftest import AZURE_KEY, ELEVEN_KEY, GEMINI_KEY, PROVIDER_KEY, audio_of
from mock_provider import fake_audio

SECRETS = (PROVIDER_KEY, AZURE_KEY, ELEVEN_KEY, GEMINI_KEY)


def run(client, body):
    r = client.submit(body)
    assert r.status == 202, r
    done = client.wait(r.json()["id"])
    assert done.status == 200, done
    text = done.body.decode()
    assert not any(s in text for s in SECRETS), "no provider key in any answer"
    return done.json()


def wav_parts(wav):
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    channels, rate = struct.unpack("<HI", wav[22:28])
    bits = struct.unpack("<H", wav[34:36])[0]
    assert wav[36:40] == b"data"
    size = struct.unpack("<I", wav[40:44])[0]
    assert size == len(wav) - 44
    return channels, rate, bits, wav[44:]


# ---------------------------------------------------------------- Azure OpenAI

def test_azure_deployment_request_and_binary_answer(client, mock):
    audio = fake_audio(3000, seed=3)
    mock.add_rule(path_prefix="/azure/openai/deployments/", body=audio, headers={"content-type": "audio/mpeg"})
    job = run(client, {"model": "azure/my-tts deployment", "input": "Hi Azure", "voice": "alloy",
                       "speed": 0.5, "instructions": "calm"})
    assert job["status"] == "completed", job
    assert audio_of(job) == audio
    [req] = mock.recorded()
    assert req["path"] == "/azure/openai/deployments/my-tts%20deployment/audio/speech?api-version=2025-03-01-preview"
    assert req["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in req["headers"]
    assert req["headers"]["host"] == "res.openai.azure.com"
    assert req["json"] == {"model": "my-tts deployment", "input": "Hi Azure", "voice": "alloy",
                           "response_format": "mp3", "speed": 0.5, "instructions": "calm"}
    assert job["result"]["extra_fields"]["provider"] == "azure"


def test_azure_error_is_mapped(client, mock):
    mock.add_rule(path_prefix="/azure/", status=404, body={"error": {
        "code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}})
    job = run(client, {"model": "azure/missing", "input": "x", "voice": "alloy"})
    assert job["status"] == "failed" and job["status_code"] == 404
    assert job["error"]["error"]["code"] == "DeploymentNotFound"
    assert job["error"]["error"]["message"] == "The API deployment for this resource does not exist."


# ------------------------------------------------------------------ ElevenLabs

def test_elevenlabs_request_maps_every_field_and_encodes_the_voice(client, mock):
    audio = fake_audio(1500, seed=4)
    mock.add_rule(path_prefix="/el/v1/text-to-speech/", body=audio, headers={"content-type": "audio/mpeg"})
    job = run(client, {
        "model": "elevenlabs/eleven_multilingual_v2", "input": "Hola", "voice": "abc/x/admin?x=1 y",
        "speed": 1.2, "language_code": "es", "enable_logging": False, "optimize_streaming_latency": True,
        "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "d1", "version_id": "v1"}],
        "response_format": "opus"})
    assert job["status"] == "completed", job
    assert audio_of(job) == audio
    assert job["result"]["content_type"] == "audio/ogg"
    [req] = mock.recorded()
    assert req["path_only"] == "/el/v1/text-to-speech/abc%2Fx%2Fadmin%3Fx%3D1%20y"
    assert req["query"] == {"output_format": ["opus_48000_128"], "enable_logging": ["false"],
                            "optimize_streaming_latency": ["1"]}
    assert req["headers"]["xi-api-key"] == ELEVEN_KEY
    assert req["json"] == {"text": "Hola", "model_id": "eleven_multilingual_v2", "language_code": "es",
                           "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "d1", "version_id": "v1"}],
                           "voice_settings": {"speed": 1.2}}


def test_elevenlabs_wav_is_a_real_wav_file(client, mock):
    pcm = fake_audio(882, seed=5)
    mock.add_rule(path_prefix="/el/v1/text-to-speech/v1", body=pcm, headers={"content-type": "audio/pcm"})
    job = run(client, {"model": "elevenlabs/m", "input": "x", "voice": "v1", "response_format": "wav"})
    assert mock.recorded()[0]["query"]["output_format"] == ["pcm_44100"]
    assert wav_parts(audio_of(job)) == (1, 44100, 16, pcm)
    assert job["result"]["content_type"] == "audio/wav"


def test_elevenlabs_with_timestamps_carries_the_alignment(client, mock):
    audio = fake_audio(700, seed=6)
    alignment = {"characters": ["H", "i"], "character_start_times_seconds": [0.0, 0.12],
                 "character_end_times_seconds": [0.12, 0.3]}
    normalized = {"characters": ["h", "i"], "character_start_times_seconds": [0.0, 0.1],
                  "character_end_times_seconds": [0.1, 0.3]}
    mock.add_rule(path_prefix="/el/v1/text-to-speech/v1/with-timestamps", body={
        "audio_base64": base64.b64encode(audio).decode(), "alignment": alignment, "normalized_alignment": normalized})
    job = run(client, {"model": "elevenlabs/m", "input": "Hi", "voice": "v1", "with_timestamps": True})
    assert job["status"] == "completed", job
    assert audio_of(job) == audio
    assert job["result"]["alignment"] == alignment
    assert job["result"]["normalized_alignment"] == normalized
    assert mock.recorded()[0]["query"]["output_format"] == ["mp3_44100_128"]


def test_elevenlabs_error_detail_is_kept(client, mock):
    mock.add_rule(path_prefix="/el/", status=401, body={"detail": {"status": "invalid_api_key", "message": "Invalid API key"}})
    job = run(client, {"model": "elevenlabs/m", "input": "x", "voice": "v1"})
    assert (job["status"], job["status_code"]) == ("failed", 401)
    assert job["error"]["error"]["message"] == "Invalid API key"
    assert job["error"]["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("fmt", ["aac", "flac"])
def test_elevenlabs_formats_it_cannot_make_are_400_at_submit(client, mock, fmt):
    r = client.submit({"model": "elevenlabs/m", "input": "x", "voice": "v1", "response_format": fmt})
    assert r.status == 400
    assert r.json()["error"]["param"] == "response_format"
    assert mock.recorded() == []


# ---------------------------------------------------------------------- Gemini

def gemini_answer(pcm):
    return {"candidates": [{"content": {"role": "model", "parts": [{"inlineData": {
        "mimeType": "audio/L16;codec=pcm;rate=24000", "data": base64.b64encode(pcm).decode()}}]},
        "finishReason": "STOP"}]}


def test_gemini_single_voice_gives_wav_by_default(client, mock):
    pcm = fake_audio(4800, seed=8)
    mock.add_rule(path_prefix="/gem/v1beta/models/", body=gemini_answer(pcm))
    job = run(client, {"model": "gemini/gemini-2.5-flash-preview-tts", "input": "Have a wonderful day!",
                       "voice": "Kore", "instructions": "Say cheerfully"})
    assert job["status"] == "completed", job
    assert job["result"]["response_format"] == "wav"
    assert job["result"]["content_type"] == "audio/wav"
    assert wav_parts(audio_of(job)) == (1, 24000, 16, pcm)
    [req] = mock.recorded()
    assert req["path"] == "/gem/v1beta/models/gemini-2.5-flash-preview-tts:generateContent"
    assert req["headers"]["x-goog-api-key"] == GEMINI_KEY
    assert req["json"] == {
        "contents": [{"parts": [{"text": "Say cheerfully: Have a wonderful day!"}]}],
        "generationConfig": {"responseModalities": ["AUDIO"],
                             "speechConfig": {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Kore"}}}}}


def test_gemini_multi_speaker_and_raw_pcm(client, mock):
    pcm = fake_audio(960, seed=9)
    mock.add_rule(path_prefix="/gem/", body=gemini_answer(pcm))
    job = run(client, {"model": "gemini/tts", "input": "Joe: Hi!\nJane: Hello!", "response_format": "pcm",
                       "voice": [{"speaker": "Joe", "voice": "Kore"}, {"speaker": "Jane", "voice": "Puck"}]})
    assert audio_of(job) == pcm
    assert job["result"]["content_type"] == "audio/pcm"
    assert mock.recorded()[0]["json"]["generationConfig"]["speechConfig"] == {"multiSpeakerVoiceConfig": {
        "speakerVoiceConfigs": [
            {"speaker": "Joe", "voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Kore"}}},
            {"speaker": "Jane", "voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Puck"}}}]}}


def test_gemini_refuses_other_formats_and_maps_errors(client, mock):
    r = client.submit({"model": "gemini/tts", "input": "x", "voice": "Kore", "response_format": "mp3"})
    assert r.status == 400 and r.json()["error"]["param"] == "response_format"
    mock.add_rule(path_prefix="/gem/", status=400, body={"error": {
        "code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT"}})
    job = run(client, {"model": "gemini/tts", "input": "x", "voice": "Kore"})
    assert job["status_code"] == 400
    assert job["error"]["error"]["message"] == "API key not valid. Please pass a valid API key."
    assert job["error"]["error"]["type"] == "INVALID_ARGUMENT"


# ------------------------------------------------------- fallbacks across types

def test_mixed_chain_openai_then_elevenlabs_then_gemini(client, mock):
    pcm = fake_audio(480, seed=10)
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "openai down"}})
    mock.add_rule(path_prefix="/el/", status=429, body={"detail": {"status": "too_many_concurrent_requests",
                                                                   "message": "Too many requests"}})
    mock.add_rule(path_prefix="/gem/", body=gemini_answer(pcm))
    job = run(client, {"model": "openai/tts-1", "input": "Fall through", "voice": "Kore", "response_format": "wav",
                       "fallbacks": ["elevenlabs/eleven_turbo_v2", "gemini/gemini-2.5-flash-preview-tts"]})
    assert job["status"] == "completed", job
    assert wav_parts(audio_of(job))[3] == pcm
    assert job["result"]["extra_fields"]["provider"] == "gemini"
    assert job["result"]["extra_fields"]["model_requested"] == "gemini-2.5-flash-preview-tts"
    assert [r["path_only"] for r in mock.recorded()] == [
        "/v1/audio/speech", "/el/v1/text-to-speech/Kore", "/gem/v1beta/models/gemini-2.5-flash-preview-tts:generateContent"]
    assert mock.recorded()[1]["json"]["model_id"] == "eleven_turbo_v2"


def test_mixed_chain_all_failing_lists_every_attempt(client, mock):
    mock.add_rule(path_prefix="/v1/audio/speech", status=500, body={"error": {"message": "openai down"}})
    mock.add_rule(path_prefix="/el/", status=429, body={"detail": {"message": "Too many requests"}})
    job = run(client, {"model": "openai/tts-1", "input": "x", "voice": "v", "fallbacks": ["elevenlabs/m2", "down/m3"]})
    assert job["status"] == "failed"
    assert job["status_code"] == 502
    assert job["error"]["extra_fields"]["provider"] == "down"
    assert job["error"]["extra_fields"]["attempts"] == [
        {"provider": "openai", "model": "tts-1", "status_code": 500},
        {"provider": "elevenlabs", "model": "m2", "status_code": 429},
        {"provider": "down", "model": "m3", "status_code": 502}]
