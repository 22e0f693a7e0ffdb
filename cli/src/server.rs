//! The OpenAI-compatible HTTP server behind `q3c serve`.
//!
//! - `POST /v1/chat/completions`: streaming (SSE, `"stream": true`) or not; `reasoning_content` in messages
//!   and deltas; `usage` with `completion_tokens_details.reasoning_tokens`; per-request `enable_thinking`
//!   (also as `chat_template_kwargs.enable_thinking`) and `thinking_budget`.
//! - `POST /v1/completions`: a raw prompt (text or token ids) continued as is, streamed or not.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text: requests, running and waiting ones,
//!   prompt, cached and completion tokens, batched steps, latency histograms).
//!
//! Each request decodes on a blocking thread in a session (KV cache) of its own for the time it runs (a
//! request with `n` choices decodes each in its own session, on a thread each); up to `--max-concurrent`
//! sequences run at once, fed together by the scheduler, and the rest wait in line. Sessions are kept between requests ([`PromptCache`]): a prompt that begins with the
//! tokens a kept session holds (a system prompt, a chat's earlier turns) feeds only the rest, and
//! `usage.prompt_tokens_details.cached_tokens` says how many were reused. Bad requests get a 400 with an OpenAI-style
//! `{"error": {...}}` body; a client that disconnects from a stream cancels its request.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use q3c_runtime::chat::{
    self, ChatOutput, ChatRequest, CompletionRequest, FinishReason, Piece, Planned, TokenLogprob,
    ToolCallStream,
};
use q3c_runtime::text::TextModel;
use q3c_runtime::{RuntimeError, Session};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::metrics::{Gauge, Metrics};
use crate::prompt_cache::PromptCache;

/// What the handlers share.
pub struct Served {
    /// The sessions requests run in, kept between requests for their prompts' common prefixes.
    pub sessions: PromptCache,
    pub text: TextModel,
    /// The model name reported by `/v1/models` and in responses.
    pub name: String,
    /// Most tokens a conversation may hold (prompt and answer).
    pub context: usize,
    /// Sequences decoding at once (a request takes one per choice); more wait in line.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The permits `slots` started with (`--max-concurrent`).
    pub parallel: usize,
    /// Most requests waiting in line; more are refused with 503 and `Retry-After`.
    pub queue: usize,
    /// Served at `GET /metrics`.
    pub metrics: Metrics,
}

/// Serves on `addr` until the process is stopped. `ready` is called with the bound address.
pub fn run(served: Served, addr: &str, ready: impl FnOnce(std::net::SocketAddr)) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        ready(listener.local_addr()?);
        let app = Router::new()
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/v1/models", get(models))
            .route("/metrics", get(metrics))
            .route(
                "/v1/chat/completions",
                post(|s: State<Arc<Served>>, body: Body| completions(s, body, Kind::Chat)),
            )
            .route(
                "/v1/completions",
                post(|s: State<Arc<Served>>, body: Body| completions(s, body, Kind::Text)),
            )
            .with_state(Arc::new(served));
        // SIGTERM or Ctrl-C: stop accepting, let running requests (streams included) finish, then exit.
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal())
            .await
            .context("serving")
    })
}

/// Resolves at SIGTERM or SIGINT.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    eprintln!("q3c serve: stopping: finishing the running requests");
}

async fn metrics(State(s): State<Arc<Served>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Served>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "q3c"}],
    }))
}

/// An OpenAI-style error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}})),
    )
        .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// What a session holds after a request: the prompt and every id after it (`None` after a failure).
fn fed<E>(prompt: &[u32], out: &Result<ChatOutput, E>) -> Option<Vec<u32>> {
    let out = out.as_ref().ok()?;
    Some(prompt.iter().chain(&out.ids).copied().collect())
}

/// One token's entry of OpenAI's `logprobs.content`.
fn logprob_json(lp: &TokenLogprob) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let mut v = entry(&lp.token, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|(_, t, l)| entry(t, *l)).collect();
    v
}

/// The usage of a request's choices: its prompt, `cached` of its tokens found in the KV cache, and the
/// answers' tokens summed.
fn usage(outs: &[&ChatOutput], cached: usize) -> Value {
    let sum = |f: fn(&ChatOutput) -> usize| outs.iter().map(|o| f(o)).sum::<usize>();
    let completion = sum(|o| o.ids.len());
    let thinking = sum(|o| o.thinking_tokens);
    let prompt = outs.first().map_or(0, |o| o.prompt_tokens);
    json!({
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": thinking},
        "thinking": {"tokens": thinking, "budget_hit": outs.iter().any(|o| o.budget_hit),
                     "answer_tokens": sum(|o| o.answer_tokens)},
    })
}

/// Before the choices of a request with several: feeds its prompt (all but the last token) once into a
/// sequence the prompt cache keeps, so that each choice forks it and feeds one token instead of the whole
/// prompt. Returns the prompt tokens the cache held before (the request's `cached_tokens`).
fn prefill_shared(served: &Served, job: &Planned) -> Result<usize, RuntimeError> {
    let mut lease = served.sessions.take(&job.prompt);
    let (cached, upto) = (lease.cached, job.prompt.len() - 1);
    let fed = match cached < upto {
        true => lease
            .session
            .forward_last(&job.prompt[cached..upto])
            .map(|_| ()),
        false => Ok(()),
    };
    let held = fed.as_ref().ok().map(|_| job.prompt[..upto].to_vec());
    served.sessions.give_back(lease, held);
    fed.map(|_| cached)
}

/// The prompt tokens a request with several choices found cached ([`prefill_shared`]), its prompt counted
/// once in the metrics here; `None` for one choice, which reports and counts its own.
fn choices_cached(job: &Planned, served: &Served) -> Result<Option<usize>, RuntimeError> {
    match job.n {
        1 => Ok(None),
        _ => {
            let cached = prefill_shared(served, job)?;
            served.metrics.tokens(job.prompt.len(), cached, 0);
            Ok(Some(cached))
        }
    }
}

/// Runs `f(i)` for each choice `i` of `n`, each on a thread of its own (the scheduler feeds their steps
/// together); `f(0)` in place when there is one.
fn per_choice<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if n == 1 {
        return vec![f(0)];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let running: Vec<_> = (0..n).map(|i| scope.spawn(move || f(i))).collect();
        running
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Decodes choice `i` of `job` in a session lent by the prompt cache (given back after), passing each piece
/// to `on_piece`, and counts it in the metrics.
fn run_choice(
    served: &Served,
    job: &Planned,
    i: usize,
    stream: bool,
    mut on_piece: impl FnMut(Piece),
) -> Result<ChatOutput, RuntimeError> {
    let _running = Gauge::enter(&served.metrics.running);
    let start = Instant::now();
    let mut first = None;
    let opts = job.choice_options(i);
    let mut lease = served.sessions.take(&job.prompt);
    let out = chat::decode_after(
        &mut lease.session,
        &served.text.tokenizer,
        &job.prompt,
        lease.cached,
        &opts,
        |p| {
            first.get_or_insert_with(Instant::now);
            on_piece(p)
        },
    );
    served.sessions.give_back(lease, fed(&job.prompt, &out));
    match &out {
        // The prompt of several choices is counted once, by `choices_cached`.
        Ok(o) => served.metrics.finished(start, first, o, stream, job.n == 1),
        Err(e) if stream => crate::metrics::access_log(&json!({
            "status": 200, "stream": true, "error": e.to_string(),
            "duration_s": start.elapsed().as_secs_f64(),
        })),
        Err(_) => {}
    }
    out
}

/// Choice `i` of a chat completion: the message (with tool calls parsed where tools were offered), its
/// finish reason and, if asked for, its tokens' log-probabilities.
fn chat_choice(i: usize, out: &ChatOutput, offered_tools: bool, logprobs: bool) -> Value {
    let mut message =
        json!({"role": "assistant", "content": out.content, "reasoning_content": out.reasoning});
    let mut finish = finish_reason(out.finish_reason);
    // With tools offered, <tool_call> blocks become structured calls.
    if offered_tools {
        let (text, calls) = chat::parse_tool_calls(&out.content);
        if !calls.is_empty() {
            message["content"] = if text.is_empty() {
                Value::Null
            } else {
                text.into()
            };
            message["tool_calls"] = calls.into();
            finish = "tool_calls";
        }
    }
    let mut choice = json!({"index": i, "message": message, "finish_reason": finish});
    if logprobs {
        let content: Vec<Value> = out.logprobs.iter().map(logprob_json).collect();
        choice["logprobs"] = json!({"content": content});
    }
    choice
}

/// The largest request body read (a chat with a long history fits many times over).
const BODY_LIMIT: usize = 16 << 20;
/// A body past [`BODY_LIMIT`] is still read to its end, up to this much, and answered 413: a client that
/// sends its whole body before reading the response then gets the answer instead of a broken pipe.
const DRAIN_LIMIT: usize = 1 << 30;

/// The request body, or the response refusing it (413 past [`BODY_LIMIT`]).
async fn read_body(body: Body) -> Result<Vec<u8>, Response> {
    let mut stream = body.into_data_stream();
    let (mut kept, mut total) = (Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        })?;
        total += chunk.len();
        if total <= BODY_LIMIT {
            kept.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > BODY_LIMIT {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body has more than {BODY_LIMIT} bytes"),
        ));
    }
    Ok(kept)
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `/v1/chat/completions`: messages through the chat template; answers as messages and deltas.
    Chat,
    /// `/v1/completions`: a raw prompt continued; answers as `text`.
    Text,
}

async fn completions(State(s): State<Arc<Served>>, body: Body, kind: Kind) -> Response {
    let start = Instant::now();
    let response = answer(Arc::clone(&s), body, kind).await;
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    // Answered requests are logged where they finish (with their tokens); refusals and failures here.
    if !response.status().is_success() {
        s.metrics.failed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::access_log(&json!({
            "status": response.status().as_u16(),
            "duration_s": start.elapsed().as_secs_f64(),
        }));
    }
    response
}

async fn answer(s: Arc<Served>, body: Body, kind: Kind) -> Response {
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let planned = match kind {
        Kind::Chat => ChatRequest::parse(&body).and_then(|req| req.plan(&s.text, s.context)),
        Kind::Text => CompletionRequest::parse(&body).and_then(|req| req.plan(&s.text, s.context)),
    };
    let job = match planned {
        Ok(job) => job,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Each choice is a sequence of its own: a request takes one slot per choice.
    if job.n > s.parallel {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "n is {}: this server decodes at most {} sequences at once (--max-concurrent)",
                job.n, s.parallel
            ),
        );
    }
    let permits = job.n as u32;
    // A full line gets a 503 at once (clients retry), rather than a wait without end.
    let slot = match Arc::clone(&s.slots).try_acquire_many_owned(permits) {
        Ok(slot) => Ok(slot),
        Err(_) if s.metrics.waiting.load(Ordering::Relaxed) as usize >= s.queue => {
            let mut refused = error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server is busy: {} requests are waiting (--queue); retry later",
                    s.queue
                ),
            );
            refused
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return refused;
        }
        Err(_) => {
            let waiting = Gauge::enter(&s.metrics.waiting);
            let slot = Arc::clone(&s.slots).acquire_many_owned(permits).await;
            drop(waiting);
            slot
        }
    };
    let Ok(slot) = slot else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    };
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Text => "cmpl",
    };
    let id = format!("{prefix}-{:x}", now() ^ (body.len() as u64).rotate_left(32));
    let job = Arc::new(job);
    if !job.stream {
        let (served, planned) = (Arc::clone(&s), Arc::clone(&job));
        let result = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let cached = choices_cached(&planned, &served)?;
            let outs = per_choice(planned.n, |i| {
                run_choice(&served, &planned, i, false, |_| {})
            });
            let outs = outs.into_iter().collect::<Result<Vec<_>, _>>()?;
            Ok::<_, RuntimeError>((cached.unwrap_or(outs[0].cached_tokens), outs))
        })
        .await;
        let (cached, outs) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the request failed: {e}"),
                )
            }
        };
        let all: Vec<&ChatOutput> = outs.iter().collect();
        let (object, choices): (_, Vec<Value>) = match kind {
            Kind::Text => (
                "text_completion",
                outs.iter()
                    .enumerate()
                    .map(|(i, out)| {
                        json!({"index": i, "text": out.content, "logprobs": null,
                               "finish_reason": finish_reason(out.finish_reason)})
                    })
                    .collect(),
            ),
            Kind::Chat => (
                "chat.completion",
                outs.iter()
                    .enumerate()
                    .map(|(i, out)| chat_choice(i, out, job.tools, job.opts.logprobs.is_some()))
                    .collect(),
            ),
        };
        return Json(json!({
            "id": id, "object": object, "created": now(), "model": s.name,
            "choices": choices, "usage": usage(&all, cached),
        }))
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    let served = Arc::clone(&s);
    let (name, chunk_id) = (s.name.clone(), id.clone());
    let chunk = move |i: usize, delta: Value, finish: Option<&str>| match kind {
        Kind::Chat => json!({
            "id": chunk_id, "object": "chat.completion.chunk", "created": now(), "model": name,
            "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
        }),
        // A raw completion has no reasoning and no tool calls: its deltas are content.
        Kind::Text => json!({
            "id": chunk_id, "object": "text_completion", "created": now(), "model": name,
            "choices": [{"index": i, "text": delta["content"].as_str().unwrap_or(""),
                         "logprobs": null, "finish_reason": finish}],
        }),
    };
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let cancel = job.opts.cancel.clone().expect("set in prepare");
        let send = |v: Value| {
            if tx.blocking_send(v).is_err() {
                // The client went away: stop decoding (every choice).
                cancel.store(true, Ordering::Relaxed);
            }
        };
        let shared = match choices_cached(&job, &served) {
            Ok(cached) => cached,
            Err(e) => {
                send(json!({"error": {"message": e.to_string(), "type": "server_error"}}));
                return;
            }
        };
        let results = per_choice(job.n, |i| {
            if kind == Kind::Chat {
                send(chunk(i, json!({"role": "assistant", "content": ""}), None));
            }
            // With tools offered, <tool_call> blocks are held back and sent as tool_calls at the end.
            let mut tool_stream = job.tools.then(ToolCallStream::new);
            // Log-probabilities ride on the next content chunk (their text may be held back a while).
            let mut logprobs: Vec<Value> = Vec::new();
            let with_logprobs = |mut c: Value, logprobs: &mut Vec<Value>| {
                if !logprobs.is_empty() {
                    c["choices"][0]["logprobs"] = json!({"content": std::mem::take(logprobs)});
                }
                c
            };
            let result = run_choice(&served, &job, i, true, |p| match p {
                Piece::Logprob(lp) => logprobs.push(logprob_json(&lp)),
                Piece::Reasoning(t) => send(chunk(i, json!({"reasoning_content": t}), None)),
                Piece::Content(t) => {
                    let shown = match tool_stream.as_mut() {
                        Some(ts) => ts.push(&t),
                        None => Some(t),
                    };
                    if let Some(t) = shown {
                        send(with_logprobs(
                            chunk(i, json!({"content": t}), None),
                            &mut logprobs,
                        ));
                    }
                }
            });
            match &result {
                Ok(out) => {
                    let mut finish = finish_reason(out.finish_reason);
                    if let Some(ts) = tool_stream {
                        let (rest, calls) = ts.finish();
                        if let Some(rest) = rest {
                            send(chunk(i, json!({"content": rest}), None));
                        }
                        if !calls.is_empty() {
                            let calls: Vec<Value> = calls
                                .into_iter()
                                .enumerate()
                                .map(|(k, mut c)| {
                                    c["index"] = k.into();
                                    c
                                })
                                .collect();
                            send(chunk(i, json!({"tool_calls": calls}), None));
                            finish = "tool_calls";
                        }
                    }
                    let mut last = with_logprobs(chunk(i, json!({}), Some(finish)), &mut logprobs);
                    last["usage"] = usage(&[out], shared.unwrap_or(out.cached_tokens));
                    send(last);
                }
                Err(e) => {
                    send(json!({"error": {"message": e.to_string(), "type": "server_error"}}))
                }
            }
            result
        });
        let outs: Vec<&ChatOutput> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        if job.include_usage && outs.len() == results.len() {
            // As OpenAI's stream_options.include_usage: a chunk with no choices and the usage.
            let mut tail = chunk(0, json!({}), None);
            tail["choices"] = json!([]);
            tail["usage"] = usage(&outs, shared.unwrap_or(outs[0].cached_tokens));
            send(tail);
        }
    });
    let events = ReceiverStream::new(rx)
        .map(|v| Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
