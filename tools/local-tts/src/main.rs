//! An OpenAI-compatible speech server that really speaks, with espeak-ng.
//!
//! `POST /v1/audio/speech` with `{model, input, voice, response_format, speed}`
//! answers audio: WAV and PCM from espeak-ng directly, mp3/opus/aac/flac through
//! ffmpeg when it is installed (else a 400 naming what it can make).
//! `GET /health` answers `ok`. One thread per connection, HTTP/1.1 keep-alive.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const MAX_BODY: usize = 1 << 20;

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn error(status: u16, message: &str, param: Option<&str>) -> Answer {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
    Answer { status, content_type: "application/json", body: body.to_string().into_bytes() }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let mut line = String::new();
    if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_string(), p.to_string()),
        _ => return Err("bad request line".into()),
    };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).map_err(|e| e.to_string())?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut req = Request { method, path, headers, body: Vec::new() };
    if req.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| "bad chunk size".to_string())?;
            if size == 0 {
                let mut end = String::new();
                reader.read_line(&mut end).map_err(|e| e.to_string())?;
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err("body too large".into());
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            chunk.truncate(size);
            req.body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length".to_string())?;
        if len > MAX_BODY {
            return Err("body too large".into());
        }
        req.body = vec![0; len];
        reader.read_exact(&mut req.body).map_err(|e| e.to_string())?;
    }
    Ok(Some(req))
}

/// OpenAI voice names to espeak-ng voices; other names must look like an espeak voice.
fn espeak_voice(voice: &str) -> Option<String> {
    let mapped = match voice {
        "alloy" => "en-us+f3",
        "ash" => "en-us+m3",
        "ballad" => "en-gb+m4",
        "coral" => "en-us+f4",
        "echo" => "en-us+m2",
        "fable" => "en-gb+m1",
        "nova" => "en-us+f2",
        "onyx" => "en-us+m7",
        "sage" => "en-gb+f2",
        "shimmer" => "en-us+f5",
        "verse" => "en-us+m5",
        other => {
            let ok = !other.is_empty()
                && other.len() <= 40
                && other.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-'));
            return ok.then(|| other.to_string());
        }
    };
    Some(mapped.to_string())
}

fn run(program: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = input.to_vec();
    // Write from another thread so a full stdout pipe cannot deadlock us.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!("{program} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

fn has_ffmpeg() -> bool {
    Command::new("ffmpeg").arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The PCM samples of espeak-ng's WAV (16-bit mono), found by its "data" chunk.
fn wav_data(wav: &[u8]) -> Option<(u32, &[u8])> {
    let rate = u32::from_le_bytes(wav.get(24..28)?.try_into().ok()?);
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = wav.get(at..at + 4)?;
        let size = u32::from_le_bytes(wav.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        if id == b"data" {
            let end = (at + 8 + size).min(wav.len());
            return Some((rate, wav.get(at + 8..end)?));
        }
        at += 8 + size + (size & 1);
    }
    None
}

/// Linear resampling of 16-bit mono PCM, for raw PCM at OpenAI's 24 kHz without ffmpeg.
fn resample(pcm: &[u8], from: u32, to: u32) -> Vec<u8> {
    let samples: Vec<i16> = pcm.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
    if samples.is_empty() || from == 0 {
        return Vec::new();
    }
    let out_len = (samples.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let mut out = Vec::with_capacity(out_len * 2);
    for i in 0..out_len {
        let pos = i as f64 * f64::from(from) / f64::from(to);
        let j = pos as usize;
        let frac = pos - j as f64;
        let a = f64::from(samples[j.min(samples.len() - 1)]);
        let b = f64::from(samples[(j + 1).min(samples.len() - 1)]);
        out.extend_from_slice(&((a + (b - a) * frac) as i16).to_le_bytes());
    }
    out
}

fn speech(body: &[u8]) -> Answer {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return error(400, "request body must be a JSON object", None);
    };
    let text = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("");
    if text("model").is_empty() {
        return error(400, "model is required", Some("model"));
    }
    let input = text("input");
    if input.is_empty() {
        return error(400, "input is required", Some("input"));
    }
    let Some(voice) = espeak_voice(if text("voice").is_empty() { "alloy" } else { text("voice") }) else {
        return error(400, "voice is not a known voice name", Some("voice"));
    };
    let speed = req.get("speed").and_then(Value::as_f64).unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return error(400, "speed must be between 0.25 and 4", Some("speed"));
    }
    let format = if text("response_format").is_empty() { "mp3" } else { text("response_format") };
    let (content_type, ffmpeg_args): (&'static str, &[&str]) = match format {
        "wav" => ("audio/wav", &[]),
        "pcm" => ("audio/pcm", &["-f", "s16le", "-ar", "24000", "-ac", "1"]),
        "mp3" => ("audio/mpeg", &["-f", "mp3"]),
        "opus" => ("audio/ogg", &["-c:a", "libopus", "-f", "ogg"]),
        "aac" => ("audio/aac", &["-c:a", "aac", "-f", "adts"]),
        "flac" => ("audio/flac", &["-f", "flac"]),
        _ => return error(400, "response_format must be one of mp3, opus, aac, flac, wav, pcm", Some("response_format")),
    };
    let wpm = ((175.0 * speed).round() as i64).clamp(80, 450).to_string();
    let wav = match run("espeak-ng", &["-v", &voice, "-s", &wpm, "--stdout"], input.as_bytes()) {
        Ok(w) => w,
        Err(e) => return error(500, &format!("speech synthesis failed: {e}"), None),
    };
    let audio = match format {
        "wav" => Ok(wav),
        _ if has_ffmpeg() => {
            let mut args = vec!["-hide_banner", "-loglevel", "error", "-f", "wav", "-i", "pipe:0"];
            args.extend_from_slice(ffmpeg_args);
            args.push("pipe:1");
            run("ffmpeg", &args, &wav)
        }
        "pcm" => wav_data(&wav).map(|(rate, pcm)| resample(pcm, rate, 24_000)).ok_or_else(|| "espeak-ng made no audio".into()),
        _ => {
            return error(400, &format!("{format} needs ffmpeg, which is not installed; without it this server makes wav and pcm"), Some("response_format"))
        }
    };
    match audio {
        Ok(body) => Answer { status: 200, content_type, body },
        Err(e) => error(500, &format!("audio conversion failed: {e}"), None),
    }
}

fn answer(req: &Request, require_key: Option<&str>) -> Answer {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/health") => Answer { status: 200, content_type: "text/plain", body: b"ok".to_vec() },
        ("POST", "/v1/audio/speech") => {
            if let Some(key) = require_key {
                if req.header("authorization") != Some(&format!("Bearer {key}")) {
                    return error(401, "missing or wrong API key", None);
                }
            }
            speech(&req.body)
        }
        (_, "/v1/audio/speech") | (_, "/health") => error(405, "method not allowed", None),
        _ => error(404, "not found", None),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    }
}

fn serve(stream: TcpStream, require_key: Option<String>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let (ans, close, line) = match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(req)) => {
                let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                let ans = answer(&req, require_key.as_deref());
                (ans, close, format!("{} {}", req.method, req.path))
            }
            Err(e) if e.contains("too large") => (error(413, "request body is over 1 MiB", None), true, "-".into()),
            Err(e) => (error(400, &format!("bad HTTP request: {e}"), None), true, "-".into()),
        };
        eprintln!("local-tts: {line} -> {} ({} bytes)", ans.status, ans.body.len());
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}\r\n",
            ans.status,
            reason(ans.status),
            ans.content_type,
            ans.body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&ans.body)).is_err() || close {
            return;
        }
    }
}

fn main() {
    let mut listen = "127.0.0.1:8090".to_string();
    let mut require_key = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--require-key" => require_key = args.next(),
            _ => {
                eprintln!("usage: local-tts [--listen 127.0.0.1:8090] [--require-key KEY]");
                std::process::exit(2);
            }
        }
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("local-tts: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("local-tts: listening on {listen} (ffmpeg: {})", if has_ffmpeg() { "yes" } else { "no" });
    for stream in listener.incoming().flatten() {
        let key = require_key.clone();
        std::thread::spawn(move || serve(stream, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voices() {
        assert_eq!(espeak_voice("alloy").as_deref(), Some("en-us+f3"));
        assert_eq!(espeak_voice("fr").as_deref(), Some("fr"));
        assert_eq!(espeak_voice("-x; rm"), None);
        assert_eq!(espeak_voice(""), None);
    }

    #[test]
    fn bad_requests() {
        assert_eq!(speech(b"[]").status, 400);
        assert_eq!(speech(br#"{"model":"m","input":""}"#).status, 400);
        assert_eq!(speech(br#"{"model":"m","input":"a","response_format":"ogg"}"#).status, 400);
        assert_eq!(speech(br#"{"model":"m","input":"a","speed":9}"#).status, 400);
    }

    #[test]
    fn resampling_keeps_length_in_proportion() {
        let pcm: Vec<u8> = (0..22_050i16).flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(resample(&pcm, 22_050, 24_000).len(), 48_000);
    }
}
