//! `q3c serve` over loopback: the OpenAI-compatible API, streaming, thinking budgets per request, concurrent
//! requests, and bad requests and disconnecting clients that must not take the server down.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

mod common;

/// A running server, killed on drop.
struct Server {
    child: Child,
    url: String,
    /// The artifact served and its weights.
    so: std::path::PathBuf,
    model: std::path::PathBuf,
    _dir: tempfile::TempDir,
    /// Servers run one at a time: the batching and soak tests measure how requests share steps, which a
    /// 64-client soak running beside them on two cores would distort.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    start_with(&["--max-concurrent", "2"])
}

/// A server of the tiny model with these extra `serve` arguments.
fn start_with(extra: &[&str]) -> Server {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let bin = env!("CARGO_BIN_EXE_q3c");
    let so = dir.path().join("tiny.so");
    let st = Command::new(bin)
        .args([
            "compile",
            model.to_str().unwrap(),
            "-o",
            so.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let mut child = Command::new(bin)
        .args([
            "serve",
            so.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
        ])
        .args(["--port", "0", "--threads", "2", "--name", "tiny"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = common::listening_url(&mut child);
    Server {
        child,
        url,
        so,
        model,
        _dir: dir,
        _serial: serial,
    }
}

/// The `data:` payloads of a server-sent event stream, which must end with `[DONE]`.
fn sse_data(body: &str) -> Vec<&str> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data
}

/// The JSON chunks of a server-sent event stream (which must end with `[DONE]`).
fn sse_chunks(body: &str) -> Vec<Value> {
    let data = sse_data(body);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The text of one delta field (`content`, `reasoning_content`) over a stream's chunks.
fn joined_deltas(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

/// Sends a streaming chat request over a raw connection (closed by the server after the response) and
/// reads up to its first `data:` line; the rest is left unread in the returned reader.
fn open_stream(addr: &str, body: &str) -> BufReader<TcpStream> {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the stream ended before its first data line");
        }
    }
    reader
}

/// The value of metric `name` in the server's `/metrics` text.
fn metric_of(s: &Server, name: &str) -> f64 {
    let text = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

/// POSTs `body` (any text) and returns (status, JSON body).
fn post(s: &Server, body: &str) -> (u16, Value) {
    let r = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(body);
    let (status, resp) = match r {
        Ok(resp) => (resp.status(), resp),
        Err(ureq::Error::Status(code, resp)) => (code, resp),
        Err(e) => panic!("{e}"),
    };
    (
        status,
        serde_json::from_str(&resp.into_string().unwrap()).unwrap(),
    )
}

fn request(extra: Value) -> Value {
    let mut r = json!({"model": "tiny", "messages": [{"role": "user", "content": "What is 2+2?"}],
                       "max_tokens": 40, "temperature": 0});
    r.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    r
}

#[test]
fn the_api_answers_streams_and_survives_bad_clients() {
    let s = start();
    let get = |path: &str| -> Value {
        let body = ureq::get(&format!("{}{path}", s.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let health = get("/health");
    assert_eq!(health["status"], "ok");
    let models = get("/v1/models");
    assert_eq!(models["data"][0]["id"], "tiny");

    // Non-streaming, with a thinking budget: reasoning and content separated, usage reported.
    let (status, full) = post(&s, &request(json!({"thinking_budget": 3})).to_string());
    assert_eq!(status, 200, "{full}");
    let choice = &full["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(
        choice["message"]["content"].is_string()
            && choice["message"]["reasoning_content"].is_string()
    );
    assert_eq!(choice["finish_reason"], "length");
    let usage = &full["usage"];
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 3);
    assert_eq!(usage["thinking"]["budget_hit"], true);
    // max_tokens bounds the whole answer, the decoder's inserted tokens included; the reasoning shows the
    // early-stop sentence the model saw.
    assert_eq!(usage["completion_tokens"], 40, "{full}");
    assert!(choice["message"]["reasoning_content"]
        .as_str()
        .unwrap()
        .contains("Considering the limited time"));
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    // Thinking off per request: no reasoning.
    let (_, off) = post(
        &s,
        &request(json!({"chat_template_kwargs": {"enable_thinking": false}})).to_string(),
    );
    assert_eq!(off["choices"][0]["message"]["reasoning_content"], "");
    assert_eq!(
        off["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );

    // Streaming: the deltas add up to the non-streamed message; the last chunk has the usage; then [DONE].
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(&request(json!({"thinking_budget": 3, "stream": true})).to_string())
        .unwrap();
    assert_eq!(resp.content_type(), "text/event-stream");
    let body = resp.into_string().unwrap();
    let chunks = sse_chunks(&body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let join = |field: &str| joined_deltas(&chunks, field);
    assert_eq!(
        join("content"),
        choice["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        join("reasoning_content"),
        choice["message"]["reasoning_content"].as_str().unwrap()
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    // The same usage, but that the same prompt was asked before: all of it but its last token came from a
    // kept KV cache (and the answer, checked above, is the same).
    let mut usage = last["usage"].clone();
    let cached = usage["prompt_tokens_details"]["cached_tokens"].take();
    assert_eq!(
        cached.as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() - 1)
    );
    usage["prompt_tokens_details"]["cached_tokens"] =
        full["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    assert_eq!(usage, full["usage"]);

    // With tools offered the stream runs through the tool-call holdback: the same text arrives (a random model
    // writes no calls).
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let (_, with_tools) = post(
        &s,
        &request(json!({"tools": tool, "thinking_budget": 2})).to_string(),
    );
    let body = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(
            &request(json!({"tools": tool, "thinking_budget": 2, "stream": true})).to_string(),
        )
        .unwrap()
        .into_string()
        .unwrap();
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        streamed,
        with_tools["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );

    // Concurrent requests (more than --max-concurrent: one waits in line): each gets the answer it gets alone.
    let url = s.url.clone();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body =
                    request(json!({"seed": i, "temperature": 0.8, "max_tokens": 8})).to_string();
                let text = ureq::post(&format!("{url}/v1/chat/completions"))
                    .send_string(&body)
                    .unwrap()
                    .into_string()
                    .unwrap();
                let v: Value = serde_json::from_str(&text).unwrap();
                (i, v["choices"][0]["message"].clone())
            })
        })
        .collect();
    for h in handles {
        let (i, message) = h.join().unwrap();
        let alone = request(json!({"seed": i, "temperature": 0.8, "max_tokens": 8})).to_string();
        assert_eq!(
            post(&s, &alone).1["choices"][0]["message"],
            message,
            "seed {i}"
        );
    }

    // Bad requests: 400 with an OpenAI-style error, never a crash.
    for (body, want) in [
        ("{ not json", "invalid request body"),
        (r#"{"messages": "hi"}"#, "invalid request body"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            "invalid request body",
        ),
        (r#"{"messages": []}"#, "must not be empty"),
        (r#"{"messages": [{"content": "x"}]}"#, "role"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "top_p": 0}"#,
            "top_p",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}"#,
            "context",
        ),
    ] {
        let (status, err) = post(&s, body);
        assert_eq!(status, 400, "{body}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{body}: {message}");
    }
    let long = "word ".repeat(400);
    let (status, err) = post(
        &s,
        &json!({"messages": [{"role": "user", "content": long}]}).to_string(),
    );
    assert_eq!(status, 400);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("context"));

    // A client that starts a stream and disconnects: the server carries on.
    let addr = s.url.strip_prefix("http://").unwrap();
    let body = request(json!({"stream": true, "max_tokens": 200})).to_string();
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let _ = conn.read(&mut first).unwrap();
    drop(conn);
    // A request cut off mid-body.
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{{\"mess"
    )
    .unwrap();
    drop(conn);
    // A body past the limit (16 MiB), written whole before the response is read: a 413, not a broken pipe.
    let mut conn = TcpStream::connect(addr).unwrap();
    let size = 20 << 20;
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
    )
    .unwrap();
    conn.write_all(&vec![b'a'; size]).unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    drop(conn);
    let (status, _) = post(&s, &request(json!({})).to_string());
    assert_eq!(status, 200);
}

/// A request asking `user` after a long system prompt (~130 tokens, the same for every call), thinking off.
/// Sampled with a seed: the random model's greedy answer after this prompt is its last token ("\n\n") over
/// and over, no text to compare; a seeded draw differs between two computations of the logits only where it
/// falls within their rounding (~1e-6) of a boundary between two tokens.
fn after_system_prompt(user: &str, max_tokens: usize) -> String {
    let system = "You are a careful assistant who answers briefly. ".repeat(12);
    request(json!({
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 5,
        "chat_template_kwargs": {"enable_thinking": false},
    }))
    .to_string()
}

/// Prompt tokens a response says came from a kept KV cache.
fn cached(r: &Value) -> u64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

/// Requests whose prompts begin alike reuse the KV cache a kept session holds: a shared system prompt is
/// not computed again, a repeated request feeds only its last prompt token, and the answers are the ones
/// computed from scratch (seeded samples, see [`after_system_prompt`]).
#[test]
fn prompts_sharing_a_prefix_reuse_the_kv_cache() {
    let s = start();
    let ask = |user: &str| after_system_prompt(user, 12);
    let prompt = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    let content = |r: &Value| r["choices"][0]["message"]["content"].clone();

    let (status, first) = post(&s, &ask("What is 2+2?"));
    assert_eq!(status, 200, "{first}");
    assert_eq!(cached(&first), 0, "{first}");
    assert!(
        content(&first).as_str().is_some_and(|c| !c.is_empty()),
        "{first}"
    );
    // Another question after the same system prompt: the system prompt comes from the cache.
    let (_, other) = post(&s, &ask("Name a color."));
    assert!(
        cached(&other) > 100 && cached(&other) < prompt(&other),
        "{other}"
    );
    // The first question again, after the cache moved on: the same answer as from scratch.
    let (_, again) = post(&s, &ask("What is 2+2?"));
    assert!(cached(&again) > 100, "{again}");
    assert_eq!(content(&again), content(&first));
    // And once more: everything but the last prompt token is reused.
    let (_, twice) = post(&s, &ask("What is 2+2?"));
    assert_eq!(cached(&twice), prompt(&twice) - 1, "{twice}");
    assert_eq!(content(&twice), content(&first));

    // /metrics adds them up (Prometheus text), and nothing is left running; a bad request counts as failed.
    let (status, _) = post(&s, "{");
    assert_eq!(status, 400);
    let resp = ureq::get(&format!("{}/metrics", s.url)).call().unwrap();
    assert!(resp.content_type().starts_with("text/plain"));
    let text = resp.into_string().unwrap();
    let metric = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .parse()
            .unwrap()
    };
    let all = [&first, &other, &again, &twice];
    let sum = |f: &dyn Fn(&Value) -> u64| all.iter().map(|r| f(r)).sum::<u64>();
    let completion = |r: &Value| r["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(metric("q3c_requests_total"), 5, "{text}");
    assert_eq!(metric("q3c_requests_failed_total"), 1, "{text}");
    assert_eq!(metric("q3c_requests_running"), 0);
    assert_eq!(metric("q3c_requests_waiting"), 0);
    assert_eq!(metric("q3c_prompt_tokens_total"), sum(&prompt));
    assert_eq!(metric("q3c_prompt_tokens_cached_total"), sum(&cached));
    assert_eq!(metric("q3c_completion_tokens_total"), sum(&completion));
    assert!(text.contains("# TYPE q3c_requests_total counter"));
    // Latency histograms: every successful request's duration; a first-text time for those with text.
    assert!(text.contains("# TYPE q3c_request_duration_seconds histogram"));
    assert_eq!(metric("q3c_request_duration_seconds_count"), 4, "{text}");
    assert_eq!(
        metric("q3c_request_duration_seconds_bucket{le=\"+Inf\"}"),
        4
    );
    let with_text = all
        .iter()
        .filter(|r| {
            let m = &r["choices"][0]["message"];
            m["content"].as_str().is_some_and(|c| !c.is_empty())
                || m["reasoning_content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
        })
        .count() as u64;
    assert_eq!(
        metric("q3c_time_to_first_token_seconds_count"),
        with_text,
        "{text}"
    );
}

/// Requests running together are fed by one batched step per token (continuous batching): each answers
/// as it would alone, and /metrics shows steps that held both. The answers are sampled with a seed (the
/// random model's greedy answers to these prompts are tokens without text, which would compare nothing):
/// batched rows equal lone ones up to the order of f32 additions (see `tests/tests/batch.rs`), so a draw
/// differs only where it falls within ~1e-6 of a boundary between two tokens' probabilities.
///
/// The overlap does not depend on the machine's speed: a long answer is streaming (its first token has
/// arrived) when the short one is asked, and still has ~170 of its 200 tokens to go when the short one's
/// 24 are done even if the client thread stalls for a while.
#[test]
fn concurrent_requests_are_batched_and_answer_as_alone() {
    let s = start();
    let ask = |user: &str, max_tokens: usize, stream: bool| {
        request(json!({
            "messages": [{"role": "user", "content": user}],
            "max_tokens": max_tokens,
            "stream": stream,
            "temperature": 1.0,
            "seed": 7,
            "chat_template_kwargs": {"enable_thinking": false},
        }))
        .to_string()
    };
    let (long, short) = ("What is 2+2?", "Name three colors of the rainbow, please.");
    let (long_tokens, short_tokens) = (200, 24);
    let mut stream = BufReader::new(
        ureq::post(&format!("{}/v1/chat/completions", s.url))
            .set("Content-Type", "application/json")
            .send_string(&ask(long, long_tokens, true))
            .unwrap()
            .into_reader(),
    );
    // Up to the first chunk with text: the long answer is decoding.
    let mut streamed = String::new();
    loop {
        let mut line = String::new();
        assert_ne!(stream.read_line(&mut line).unwrap(), 0, "{streamed}");
        streamed.push_str(&line);
        let text = line
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .and_then(|c| c["choices"][0]["delta"]["content"].as_str().map(str::len));
        if text.is_some_and(|len| len > 0) {
            break;
        }
    }
    let (status, short_together) = post(&s, &ask(short, short_tokens, false));
    assert_eq!(status, 200, "{short_together}");
    stream.read_to_string(&mut streamed).unwrap();
    let long_together = joined_deltas(&sse_chunks(&streamed), "content");

    let text = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .parse()
            .unwrap()
    };
    let (steps, sequences) = (
        metric("q3c_batch_steps_total"),
        metric("q3c_batch_sequences_total"),
    );
    // At most two sequences run (`--max-concurrent 2`), so sequences - steps counts the steps that held
    // both. The short request is in 24 steps (its prompt's, which yields its first token, and 23 decode
    // steps), all while the long one runs; alone there would be none.
    eprintln!("{sequences} sequences in {steps} steps");
    assert!(
        sequences - steps >= short_tokens as f64,
        "{sequences} sequences in {steps} steps: {text}"
    );
    // Each request's tokens after its first were timed as they came.
    assert!(
        metric("q3c_inter_token_latency_seconds_count") >= (long_tokens + short_tokens - 2) as f64,
        "{text}"
    );
    let (_, long_alone) = post(&s, &ask(long, long_tokens, false));
    assert_eq!(
        long_alone["choices"][0]["message"]["content"], long_together,
        "{long}"
    );
    let (_, short_alone) = post(&s, &ask(short, short_tokens, false));
    assert_eq!(
        short_alone["choices"][0]["message"]["content"],
        short_together["choices"][0]["message"]["content"],
        "{short}"
    );
    assert_eq!(
        short_together["usage"]["completion_tokens"], short_tokens,
        "{short_together}"
    );
}

/// `n` choices decode as sequences of their own, fed together: greedy ones each equal the single answer,
/// seeded samples differ from each other (choice 0 is the single answer with that seed), streams tag every
/// chunk with its choice, usage sums the answers, and `n` past the server's sequences or the limit is a 400.
/// Requests sent to an idle server a few milliseconds apart are read in one step: woken from idle, the
/// scheduler gathers the requests that follow within `GATHER_QUIET` (10 ms) of each other, and a step with
/// nobody decoding takes the gathered prompts whole (up to four budgets). Two prompts each longer than
/// `--batch-tokens 16`, answered with one token each, then take one step between them; without the gathering
/// the second (sent 4 ms after the first) lands in a later step, and without the larger idle budget each
/// prompt takes two steps or more. A loaded machine can delay a request past the window, so the pair is sent
/// up to five times and one pair read in one step passes.
#[test]
fn requests_arriving_together_at_an_idle_server_are_read_in_one_step() {
    let s = start_with(&["--max-concurrent", "4", "--batch-tokens", "16"]);
    let ask = |q: &str| {
        // Thinking off: the template writes the empty block, so the one token is the model's own.
        let body = json!({"messages": [{"role": "user", "content": q}], "max_tokens": 1,
                          "enable_thinking": false});
        request(body).to_string()
    };
    let mut seen = Vec::new();
    for attempt in 1..=5 {
        // Each attempt's own prompts (they differ from their first word on), so little of an earlier
        // attempt's KV can be reused.
        let word = ["First", "Second", "Third", "Fourth", "Fifth"][attempt - 1];
        let questions = [
            format!("{word} question: tell me about the weather today in three short words."),
            format!("{word} question: name one colour that you like and say why, briefly."),
        ];
        let before = metric_of(&s, "q3c_batch_steps_total");
        let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
            let first = scope.spawn(|| post(&s, &ask(&questions[0])));
            std::thread::sleep(std::time::Duration::from_millis(4));
            let second = scope.spawn(|| post(&s, &ask(&questions[1])));
            vec![first.join().unwrap(), second.join().unwrap()]
        });
        let prompts: Vec<u64> = answers
            .iter()
            .map(|(status, r)| {
                assert_eq!(*status, 200, "{r}");
                assert_eq!(r["usage"]["completion_tokens"], 1, "{r}");
                // The tokens fed: those not reused from an earlier request's cache.
                r["usage"]["prompt_tokens"].as_u64().unwrap() - cached(r)
            })
            .collect();
        // The premise: each prompt feeds more than one budget, both fit in one idle step.
        assert!(
            prompts.iter().all(|&p| p > 16) && prompts.iter().sum::<u64>() <= 64,
            "{prompts:?}"
        );
        let steps = metric_of(&s, "q3c_batch_steps_total") - before;
        if steps == 1.0 {
            eprintln!("attempt {attempt}: both prompts ({prompts:?} tokens fed) in one step");
            return;
        }
        seen.push(steps);
    }
    panic!("two prompts sent 4 ms apart to an idle server took {seen:?} steps, never one");
}

#[test]
fn several_choices_decode_as_sequences_of_their_own() {
    let s = start();
    let body = |extra: Value| {
        let mut r = json!({"max_tokens": 12, "chat_template_kwargs": {"enable_thinking": false}});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        request(r).to_string()
    };
    // Greedy, thinking: the random model's greedy answer has text only in its thinking (without it, its
    // answer is "\n\n" over and over, trimmed away).
    let thinking = json!({"chat_template_kwargs": {"enable_thinking": true}});
    let (_, one) = post(&s, &body(thinking.clone()));
    let mut pair = thinking.clone();
    pair["n"] = 2.into();
    let (status, two) = post(&s, &body(pair));
    assert_eq!(status, 200, "{two}");
    let reasoning = &one["choices"][0]["message"]["reasoning_content"];
    assert!(reasoning.as_str().is_some_and(|r| !r.is_empty()), "{one}");
    let choices = two["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{two}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["reasoning_content"], *reasoning, "{two}");
        assert_eq!(
            c["message"]["content"], one["choices"][0]["message"]["content"],
            "{two}"
        );
    }
    let answer = |r: &Value| r["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(answer(&two), 2 * answer(&one), "{two}");
    assert_eq!(two["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    // The prompt is computed once for all choices: a new prompt with n = 2 feeds it (less its last token)
    // once, then each choice its last token and its answer; it is counted once, like usage counts it.
    let fed = metric_of(&s, "q3c_batch_tokens_total");
    let (prompt_before, cached_before) = (
        metric_of(&s, "q3c_prompt_tokens_total"),
        metric_of(&s, "q3c_prompt_tokens_cached_total"),
    );
    let long =
        "Tell me, in as many words as you like, why the sky looks blue on a clear afternoon.";
    let (_, fresh) = post(
        &s,
        &body(json!({"n": 2, "messages": [{"role": "user", "content": long}]})),
    );
    let prompt = fresh["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    // Only the chat template's opening is shared with earlier requests.
    let cached = fresh["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as f64;
    assert!(cached < prompt / 2.0, "{fresh}");
    let fed = metric_of(&s, "q3c_batch_tokens_total") - fed;
    assert_eq!(
        metric_of(&s, "q3c_prompt_tokens_total") - prompt_before,
        prompt
    );
    assert_eq!(
        metric_of(&s, "q3c_prompt_tokens_cached_total") - cached_before,
        cached
    );
    // Once: prompt - cached - 1, then 1 + its answer per choice; each choice feeding the prompt would be
    // 2 · (prompt - cached) + the answers.
    let once = prompt - cached + 1.0 + answer(&fresh) as f64;
    assert!(
        fed <= once,
        "{fed} tokens fed, {once} expected at most: {fresh}"
    );
    // Sampled: different seeds per choice.
    let sampled = json!({"temperature": 1.0, "seed": 7});
    let (_, alone) = post(&s, &body(sampled.clone()));
    let mut both = sampled.clone();
    both["n"] = 2.into();
    let (_, pair) = post(&s, &body(both.clone()));
    let content = |r: &Value, i: usize| r["choices"][i]["message"]["content"].clone();
    assert_eq!(content(&pair, 0), content(&alone, 0), "{pair}");
    assert_ne!(content(&pair, 0), content(&pair, 1), "{pair}");
    // Streamed: each chunk names its choice; each choice's deltas join into its answer.
    both["stream"] = true.into();
    both["stream_options"] = json!({"include_usage": true});
    let streamed = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(&body(both))
        .unwrap()
        .into_string()
        .unwrap();
    let chunks = sse_chunks(&streamed);
    for i in 0..2 {
        let mine: Vec<Value> = chunks
            .iter()
            .filter(|c| c["choices"].get(0).is_some_and(|c| c["index"] == i))
            .cloned()
            .collect();
        assert_eq!(
            joined_deltas(&mine, "content"),
            content(&pair, i as usize),
            "{streamed}"
        );
        assert!(mine
            .iter()
            .any(|c| !c["choices"][0]["finish_reason"].is_null()));
    }
    let tail = chunks.last().unwrap();
    assert_eq!(tail["choices"], json!([]), "{streamed}");
    assert_eq!(
        tail["usage"]["completion_tokens"],
        pair["usage"]["completion_tokens"]
    );
    // A raw completion's choices too.
    let raw = ureq::post(&format!("{}/v1/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"prompt": "The sky is", "max_tokens": 6, "temperature": 0, "n": 2}).to_string(),
        )
        .unwrap()
        .into_string()
        .unwrap();
    let raw: Value = serde_json::from_str(&raw).unwrap();
    let texts: Vec<&Value> = raw["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["text"])
        .collect();
    assert_eq!(texts.len(), 2, "{raw}");
    assert_eq!(texts[0], texts[1], "{raw}");
    assert_eq!(raw["choices"][1]["index"], 1, "{raw}");
    // More choices than the server decodes at once (--max-concurrent 2), or than any request may ask.
    for (n, why) in [
        (3, "at most 2 sequences at once"),
        (0, "1 to 8 choices"),
        (9, "1 to 8 choices"),
    ] {
        let (status, r) = post(&s, &body(json!({ "n": n })));
        assert_eq!(status, 400, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(why), "{r}");
    }
}

/// Concurrent requests after the same system prompt all reuse its KV cache: each gets a fork of the kept
/// sequence (shared blocks), not the kept sequence itself, so the second does not start from scratch.
#[test]
fn concurrent_requests_share_a_kept_system_prompt() {
    let s = start();
    let ask = |user: &str| after_system_prompt(user, 8);
    let (status, first) = post(&s, &ask("What is 2+2?"));
    assert_eq!(status, 200, "{first}");
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = ["Name a color.", "Name an animal."]
            .iter()
            .map(|q| {
                let body = ask(q);
                let s = &s;
                scope.spawn(move || post(s, &body).1)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &answers {
        assert!(cached(r) > 100, "{r}");
    }
}

/// Beyond `--max-concurrent` running and `--queue` waiting, a request gets a 503 with `Retry-After` at once.
#[test]
fn a_full_queue_is_refused_with_retry_after() {
    let s = start_with(&["--max-concurrent", "1", "--queue", "0"]);
    let body = |stream: bool| {
        request(json!({"max_tokens": 200, "stream": stream,
                       "chat_template_kwargs": {"enable_thinking": false}}))
        .to_string()
    };
    // One runs: its stream has begun (its slot is taken until its 200 tokens are done, far longer than the
    // three requests below take to be answered), and none may wait.
    let mut running = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(&body(true))
        .unwrap()
        .into_reader();
    let mut first = [0u8; 6];
    running.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"data: ");
    for _ in 0..3 {
        match ureq::post(&format!("{}/v1/chat/completions", s.url)).send_string(&body(false)) {
            Err(ureq::Error::Status(503, r)) => {
                assert_eq!(r.header("retry-after"), Some("1"));
                let text = r.into_string().unwrap();
                assert!(text.contains("the server is busy"), "{text}");
            }
            Ok(r) => panic!("answered while the only slot was taken: {}", r.status()),
            Err(e) => panic!("{e}"),
        }
    }
    let mut rest = String::new();
    running.read_to_string(&mut rest).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    // The slot is free again.
    let (status, r) = post(&s, &body(false));
    assert_eq!(status, 200, "{r}");
}

/// `stream_options.include_usage` ends a stream with a chunk of no choices and the usage; SIGTERM lets a
/// running stream finish, then the server exits cleanly.
#[test]
fn streams_report_usage_and_sigterm_drains_running_requests() {
    let mut s = start();
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(
            &request(
                json!({"stream": true, "max_tokens": 5, "stream_options": {"include_usage": true}}),
            )
            .to_string(),
        )
        .unwrap();
    let body = resp.into_string().unwrap();
    let tail = sse_chunks(&body).pop().unwrap();
    assert_eq!(tail["choices"], json!([]), "{tail}");
    assert_eq!(tail["usage"]["completion_tokens"], 5, "{tail}");

    // A stream in flight when SIGTERM arrives still completes.
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let body = request(json!({"stream": true, "max_tokens": 120})).to_string();
    let mut reader = open_stream(&addr, &body);
    let st = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(&addr).is_err());
}

/// A bounded soak: 64 clients at once (two requests each) mixing streamed and non-streamed requests,
/// malformed bodies and budgets, and clients that vanish mid-stream. The server keeps answering; every
/// well-formed request gets a complete answer equal to the same request alone (greedy, or sampled with a
/// seed), each with text; afterwards nothing runs or waits, and the KV cache holds no more than the kept
/// sequences.
#[test]
fn a_soak_of_64_clients_leaves_the_server_answering_and_clean() {
    let s = start_with(&["--max-concurrent", "8"]);
    let ask = |extra: Value| request(extra).to_string();
    let kinds = [
        // The first two sampled with a seed: the random model's greedy answer to them has no text.
        ask(
            json!({"max_tokens": 10, "chat_template_kwargs": {"enable_thinking": false},
                   "temperature": 1.0, "seed": 3,
                   "messages": [{"role": "user", "content": "Say hi."}]}),
        ),
        ask(
            json!({"max_tokens": 12, "thinking_budget": 3, "temperature": 1.0, "seed": 4,
                   "messages": [{"role": "user", "content": "Count to three."}]}),
        ),
        ask(json!({"max_tokens": 8, "messages": [{"role": "user", "content": "Name a fruit."}]})),
    ];
    let message = |r: &Value| {
        let m = &r["choices"][0]["message"];
        (
            m["content"].as_str().unwrap_or("").to_string(),
            m["reasoning_content"].as_str().unwrap_or("").to_string(),
        )
    };
    let solo: Vec<(String, String)> = kinds
        .iter()
        .map(|k| {
            let (status, r) = post(&s, k);
            assert_eq!(status, 200, "{r}");
            let (content, reasoning) = message(&r);
            assert!(!content.is_empty() || !reasoning.is_empty(), "{r}");
            (content, reasoning)
        })
        .collect();
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let streamed = |body: &str| -> String {
        let with_stream = {
            let mut v: Value = serde_json::from_str(body).unwrap();
            v["stream"] = true.into();
            v.to_string()
        };
        ureq::post(&format!("{}/v1/chat/completions", s.url))
            .send_string(&with_stream)
            .unwrap()
            .into_string()
            .unwrap()
    };
    std::thread::scope(|scope| {
        for c in 0..64usize {
            let (kinds, solo, addr) = (&kinds, &solo, &addr);
            let (streamed, message) = (&streamed, &message);
            let s = &s;
            scope.spawn(move || {
                for n in 0..2 {
                    let kind = (c + n) % kinds.len();
                    match (2 * c + n) % 6 {
                        0..=2 => {
                            let (status, r) = post(s, &kinds[kind]);
                            assert_eq!(status, 200, "{r}");
                            assert_eq!(message(&r), solo[kind], "client {c}, request {n}");
                        }
                        3 => {
                            let chunks = sse_chunks(&streamed(&kinds[kind]));
                            let join = |f: &str| joined_deltas(&chunks, f);
                            assert_eq!(
                                (join("content"), join("reasoning_content")),
                                solo[kind],
                                "client {c}, request {n} (streamed)"
                            );
                            assert!(chunks.last().unwrap()["usage"].is_object());
                        }
                        4 => {
                            let bad = ["{", r#"{"messages": [], "max_tokens": 3}"#,
                                r#"{"messages": [{"role": "user", "content": "hi"}], "thinking_budget": -1}"#];
                            let (status, r) = post(s, bad[c % bad.len()]);
                            assert_eq!(status, 400, "{r}");
                            assert!(r["error"]["message"].is_string(), "{r}");
                        }
                        _ => {
                            // A client that vanishes after the first chunk.
                            let mut v: Value = serde_json::from_str(&kinds[kind]).unwrap();
                            v["stream"] = true.into();
                            v["max_tokens"] = 60.into();
                            drop(open_stream(addr, &v.to_string()));
                        }
                    }
                }
            });
        }
    });
    // Still answering, the same as before.
    let (status, r) = post(&s, &kinds[0]);
    assert_eq!(status, 200, "{r}");
    assert_eq!(message(&r), solo[0]);
    // Nothing left running or waiting once the cancelled streams have noticed (at their next token).
    let metric = |name: &str| metric_of(&s, name) as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric("q3c_requests_running") > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(metric("q3c_requests_running"), 0);
    assert_eq!(metric("q3c_requests_waiting"), 0);
    assert_eq!(metric("q3c_requests_total"), 3 + 128 + 1);
    // At most 8 kept sequences of at most 3 blocks each (prompts and answers under 48 tokens), not the
    // blocks of 130 requests.
    assert!(
        metric("q3c_kv_tokens_used") <= 8 * 48,
        "{}",
        metric("q3c_kv_tokens_used")
    );
}

/// The official `openai` Python client (installed by `./x deps`) against the server: models, a chat
/// completion, the same streamed with `stream_options.include_usage`, and a refused request as the
/// client's own `BadRequestError`.
#[test]
fn the_official_openai_client_works_against_the_server() {
    let has_client = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        let why = "the openai Python client is not installed (./x deps installs it)";
        if std::env::var("Q3C_REQUIRE_FEATURES").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    let s = start();
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
assert [m.id for m in c.models.list().data] == ["tiny"]
ask = dict(model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8,
           temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
r = c.chat.completions.create(**ask)
assert r.object == "chat.completion" and r.choices[0].finish_reason in ("length", "stop"), r
assert 0 < r.usage.completion_tokens <= 8, r.usage
parts, usage = [], None
for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == r.choices[0].message.content, (parts, r)
assert usage.completion_tokens == r.usage.completion_tokens, usage
two = c.chat.completions.create(n=2, **ask)
assert [ch.index for ch in two.choices] == [0, 1], two
assert all(ch.message.content == r.choices[0].message.content for ch in two.choices), two
try:
    c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    raise SystemExit("an unknown role was accepted")
except openai.BadRequestError as e:
    assert "unknown role" in str(e), e
# Log-probabilities: greedy picks the most likely token, so each chosen token is its step's first alternative.
lp = c.chat.completions.create(logprobs=True, top_logprobs=3, **ask)
assert lp.choices[0].message.content == r.choices[0].message.content
entries = lp.choices[0].logprobs.content
assert 0 < len(entries) <= 8, entries
for e in entries:
    assert e.logprob <= 0 and len(e.top_logprobs) == 3, e
    assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True), e
    assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6, e
streamed_lp = [e for ch in c.chat.completions.create(stream=True, logprobs=True, top_logprobs=3, **ask)
               if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
assert [e.token for e in streamed_lp] == [e.token for e in entries], (streamed_lp, entries)
done = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
assert done.object == "text_completion" and done.usage.completion_tokens <= 6, done
streamed = "".join(ch.choices[0].text for ch in c.completions.create(
    model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if ch.choices)
assert streamed == done.choices[0].text, (streamed, done)
print("completion:" + json.dumps(done.choices[0].text))
print("openai client ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &s.url])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("openai client ok"), "{stdout}");
    // /v1/completions continues the raw text as `q3c generate --prompt` does (greedy).
    let text: String = stdout
        .lines()
        .find_map(|l| l.strip_prefix("completion:"))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap();
    let generated = Command::new(env!("CARGO_BIN_EXE_q3c"))
        .args([
            "generate",
            "--model",
            s.so.to_str().unwrap(),
            "--weights",
            s.model.to_str().unwrap(),
        ])
        .args([
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert!(generated.status.success());
    assert!(!text.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&generated.stdout).trim_end(),
        text.trim_end()
    );
}
