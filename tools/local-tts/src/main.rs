//! An OpenAI-compatible speech server that really speaks, with espeak-ng.
//!
//! `POST /v1/audio/speech` with `{model, input, voice, response_format, speed}`
//! answers audio: WAV and PCM from espeak-ng directly, mp3/opus/aac/flac through
//! ffmpeg when it is installed (else a 400 naming what it can make; ffmpeg is
//! looked for once, at start). `GET /health` answers `ok`. HTTP/1.1 with
//! keep-alive comes from `tiny_http`; every request is answered on its own
//! thread, so a long synthesis does not hold up the others. It prints the
//! address it listens on (`--listen 127.0.0.1:0` picks a free port).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::{Header, Response, Server};

const MAX_BODY: usize = 1 << 20;

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn error(status: u16, message: &str, param: Option<&str>) -> Answer {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
    Answer {
        status,
        content_type: "application/json",
        body: body.to_string().into_bytes(),
    }
}

/// What the server was started with: read by every request thread.
struct Settings {
    require_key: Option<String>,
    ffmpeg: bool,
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
                && other
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-'));
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
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn has_ffmpeg() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Linear resampling of 16-bit mono PCM, for raw PCM at OpenAI's 24 kHz without ffmpeg.
fn resample(pcm: &[u8], from: u32, to: u32) -> Vec<u8> {
    let samples: Vec<i16> = pcm
        .chunks_exact(2)
        .filter_map(|c| Some(i16::from_le_bytes(c.try_into().ok()?)))
        .collect();
    if samples.is_empty() || from == 0 {
        return Vec::new();
    }
    let out_len = (samples.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let mut out = Vec::with_capacity(out_len * 2);
    for i in 0..out_len {
        let pos = i as f64 * f64::from(from) / f64::from(to);
        let j = pos as usize;
        let frac = pos - j as f64;
        let at = |k: usize| f64::from(samples.get(k).or(samples.last()).copied().unwrap_or(0));
        let (a, b) = (at(j), at(j + 1));
        out.extend_from_slice(&((a + (b - a) * frac) as i16).to_le_bytes());
    }
    out
}

fn speech(body: &[u8], ffmpeg: bool) -> Answer {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return error(400, "request body must be a JSON object", None);
    };
    let request = match speech_request(&req) {
        Ok(request) => request,
        Err(answer) => return answer,
    };
    let format = request.format;
    let Some((content_type, ffmpeg_args)) = output_format(format) else {
        return error(
            400,
            "response_format must be one of mp3, opus, aac, flac, wav, pcm",
            Some("response_format"),
        );
    };
    if !ffmpeg && !matches!(format, "wav" | "pcm") {
        return error(
            400,
            &format!("{format} needs ffmpeg, which is not installed; without it this server makes wav and pcm"),
            Some("response_format"),
        );
    }
    let wav = match espeak(&request) {
        Ok(w) => w,
        Err(e) => return error(500, &format!("speech synthesis failed: {e}"), None),
    };
    match convert(wav, format, ffmpeg_args, ffmpeg) {
        Ok(body) => Answer {
            status: 200,
            content_type,
            body,
        },
        Err(e) => error(500, &format!("audio conversion failed: {e}"), None),
    }
}

/// A speech request's fields, checked, defaults filled in.
struct SpeechRequest<'a> {
    input: &'a str,
    /// The espeak-ng voice.
    voice: String,
    speed: f64,
    /// The `response_format` asked for, not yet checked.
    format: &'a str,
}

/// Reads the request's fields: `model` and `input` are required; `voice` defaults to alloy,
/// `speed` to 1 and `response_format` to mp3.
fn speech_request(req: &serde_json::Map<String, Value>) -> Result<SpeechRequest<'_>, Answer> {
    let text = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("");
    if text("model").is_empty() {
        return Err(error(400, "model is required", Some("model")));
    }
    let input = text("input");
    if input.is_empty() {
        return Err(error(400, "input is required", Some("input")));
    }
    let Some(voice) = espeak_voice(if text("voice").is_empty() {
        "alloy"
    } else {
        text("voice")
    }) else {
        return Err(error(400, "voice is not a known voice name", Some("voice")));
    };
    let speed = req.get("speed").and_then(Value::as_f64).unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(error(
            400,
            "speed must be between 0.25 and 4",
            Some("speed"),
        ));
    }
    let format = if text("response_format").is_empty() {
        "mp3"
    } else {
        text("response_format")
    };
    Ok(SpeechRequest {
        input,
        voice,
        speed,
        format,
    })
}

/// The content type of `format` and the ffmpeg arguments that make it from WAV; `None` for a
/// format OpenAI does not have.
fn output_format(format: &str) -> Option<(&'static str, &'static [&'static str])> {
    Some(match format {
        "wav" => ("audio/wav", &[]),
        "pcm" => ("audio/pcm", &["-f", "s16le", "-ar", "24000", "-ac", "1"]),
        "mp3" => ("audio/mpeg", &["-f", "mp3"]),
        "opus" => ("audio/ogg", &["-c:a", "libopus", "-f", "ogg"]),
        "aac" => ("audio/aac", &["-c:a", "aac", "-f", "adts"]),
        "flac" => ("audio/flac", &["-f", "flac"]),
        _ => return None,
    })
}

/// Speaks the input with espeak-ng: a WAV file. OpenAI's speed 1 is espeak-ng's default 175
/// words per minute.
fn espeak(request: &SpeechRequest<'_>) -> Result<Vec<u8>, String> {
    let wpm = ((175.0 * request.speed).round() as i64)
        .clamp(80, 450)
        .to_string();
    run(
        "espeak-ng",
        &["-v", &request.voice, "-s", &wpm, "--stdout"],
        request.input.as_bytes(),
    )
}

/// Makes `format` from espeak-ng's WAV: as it is, through ffmpeg with `ffmpeg_args`, or,
/// without ffmpeg, raw PCM resampled here (the only other format allowed then).
fn convert(
    wav: Vec<u8>,
    format: &str,
    ffmpeg_args: &[&str],
    ffmpeg: bool,
) -> Result<Vec<u8>, String> {
    match format {
        "wav" => Ok(wav),
        _ if ffmpeg => {
            let mut args = vec![
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                "wav",
                "-i",
                "pipe:0",
            ];
            args.extend_from_slice(ffmpeg_args);
            args.push("pipe:1");
            run("ffmpeg", &args, &wav)
        }
        _ => async_speech_core::wav::parse(&wav)
            .map(|w| resample(w.data, w.format.sample_rate, 24_000))
            .map_err(|_| "espeak-ng made no audio".into()),
    }
}

/// The answer to one request; `authorization` is its Authorization header.
fn answer(
    method: &str,
    url: &str,
    authorization: Option<&str>,
    body: &[u8],
    settings: &Settings,
) -> Answer {
    let path = url.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/health") => Answer {
            status: 200,
            content_type: "text/plain",
            body: b"ok".to_vec(),
        },
        ("POST", "/v1/audio/speech") => {
            if let Some(key) = &settings.require_key {
                if authorization != Some(&format!("Bearer {key}")) {
                    return error(401, "missing or wrong API key", None);
                }
            }
            speech(body, settings.ffmpeg)
        }
        (_, "/v1/audio/speech") | (_, "/health") => error(405, "method not allowed", None),
        _ => error(404, "not found", None),
    }
}

/// The request body, up to `MAX_BODY` bytes (tiny_http undoes chunked encoding).
fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, Answer> {
    let too_large = || error(413, "request body is over 1 MiB", None);
    if request.body_length().is_some_and(|len| len > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| error(400, &format!("bad HTTP request: {e}"), None))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn handle(mut request: tiny_http::Request, settings: &Settings) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let ans = match read_body(&mut request) {
        Ok(body) => {
            let authorization = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("authorization"))
                .map(|h| h.value.as_str().to_string());
            answer(&method, &url, authorization.as_deref(), &body, settings)
        }
        Err(ans) => ans,
    };
    eprintln!(
        "local-tts: {method} {url} -> {} ({} bytes)",
        ans.status,
        ans.body.len()
    );
    let mut response = Response::from_data(ans.body)
        .with_status_code(ans.status)
        // Always a content-length, never chunked, whatever the size.
        .with_chunked_threshold(usize::MAX);
    if let Ok(header) = Header::from_bytes("content-type", ans.content_type) {
        response.add_header(header);
    }
    if let Err(e) = request.respond(response) {
        eprintln!("local-tts: {method} {url}: cannot answer: {e}");
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
    let server = match Server::http(&listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("local-tts: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let settings = Arc::new(Settings {
        require_key,
        ffmpeg: has_ffmpeg(),
    });
    // The address bound, so that `--listen 127.0.0.1:0` says which port it got.
    let bound = server
        .server_addr()
        .to_ip()
        .map_or(listen, |addr| addr.to_string());
    eprintln!(
        "local-tts: listening on {bound} (ffmpeg: {})",
        if settings.ffmpeg { "yes" } else { "no" }
    );
    serve(&server, &settings);
}

/// Answers requests until the server is unblocked, each on a thread of its own.
fn serve(server: &Server, settings: &Arc<Settings>) {
    for request in server.incoming_requests() {
        let settings = Arc::clone(settings);
        std::thread::spawn(move || handle(request, &settings));
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
        assert_eq!(speech(b"[]", true).status, 400);
        assert_eq!(speech(br#"{"model":"m","input":""}"#, true).status, 400);
        assert_eq!(
            speech(
                br#"{"model":"m","input":"a","response_format":"ogg"}"#,
                true
            )
            .status,
            400
        );
        assert_eq!(
            speech(br#"{"model":"m","input":"a","speed":9}"#, true).status,
            400
        );
    }

    #[test]
    fn without_ffmpeg_other_formats_are_400_naming_wav_and_pcm() {
        for format in ["mp3", "opus", "aac", "flac"] {
            let body = format!(r#"{{"model":"m","input":"a","response_format":"{format}"}}"#);
            let ans = speech(body.as_bytes(), false);
            assert_eq!(ans.status, 400, "{format}");
            let err: Value = serde_json::from_slice(&ans.body).unwrap();
            assert_eq!(err["error"]["param"], "response_format");
            let message = err["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("needs ffmpeg") && message.contains("wav and pcm"),
                "{message}"
            );
        }
    }

    #[test]
    fn routes_and_key() {
        let open = Settings {
            require_key: None,
            ffmpeg: true,
        };
        assert_eq!(answer("GET", "/health?x=1", None, b"", &open).body, b"ok");
        assert_eq!(answer("POST", "/health", None, b"", &open).status, 405);
        assert_eq!(
            answer("GET", "/v1/audio/speech", None, b"", &open).status,
            405
        );
        assert_eq!(answer("GET", "/nope", None, b"", &open).status, 404);
        assert_eq!(
            answer("POST", "/v1/audio/speech", None, b"[]", &open).status,
            400
        );
        let locked = Settings {
            require_key: Some("k".into()),
            ffmpeg: true,
        };
        assert_eq!(
            answer("POST", "/v1/audio/speech", None, b"[]", &locked).status,
            401
        );
        assert_eq!(
            answer("POST", "/v1/audio/speech", Some("Bearer x"), b"[]", &locked).status,
            401
        );
        assert_eq!(
            answer("POST", "/v1/audio/speech", Some("Bearer k"), b"[]", &locked).status,
            400
        );
    }

    /// Sends raw HTTP/1.1 and reads `n` answers off one keep-alive connection.
    fn exchange(addr: std::net::SocketAddr, raw: &[u8], n: usize) -> Vec<String> {
        use std::io::{BufRead, BufReader};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream.write_all(raw).unwrap();
        let mut reader = BufReader::new(stream);
        (0..n)
            .map(|_| {
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    assert!(
                        !line.to_ascii_lowercase().starts_with("transfer-encoding"),
                        "{line}"
                    );
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                head + &String::from_utf8_lossy(&body)
            })
            .collect()
    }

    #[test]
    fn speaks_http_with_keep_alive_chunked_bodies_and_a_size_limit() {
        let server = Arc::new(Server::http("127.0.0.1:0").unwrap());
        let addr = server.server_addr().to_ip().unwrap();
        let settings = Arc::new(Settings {
            require_key: None,
            ffmpeg: false,
        });
        let serving = {
            let server = Arc::clone(&server);
            std::thread::spawn(move || serve(&server, &settings))
        };
        let answers = exchange(
            addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n\
              GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            3,
        );
        assert!(
            answers[0].starts_with("HTTP/1.1 200") && answers[0].ends_with("\r\nok"),
            "{}",
            answers[0]
        );
        assert!(
            answers[0]
                .to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "{}",
            answers[0]
        );
        assert!(
            answers[1].starts_with("HTTP/1.1 400") && answers[1].contains("JSON object"),
            "{}",
            answers[1]
        );
        assert!(answers[2].starts_with("HTTP/1.1 404"), "{}", answers[2]);
        let big = format!(
            "POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let [answer] = exchange(addr, big.as_bytes(), 1).try_into().unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        server.unblock();
        serving.join().unwrap();
    }

    #[test]
    fn resampling_keeps_length_in_proportion() {
        let pcm: Vec<u8> = (0..22_050i16).flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(resample(&pcm, 22_050, 24_000).len(), 48_000);
    }
}
