//! The C API of the q3c runtime (`q3c_runtime.h`): a thin, panic-free wrapper over
//! [`q3c_runtime::CompiledModel`], the tokenizer and chat template, and [`q3c_runtime::chat`].
//!
//! Requests use the JSON shape of the HTTP server's `/v1/chat/completions` ([`ChatRequest`]), so a
//! service in another language gets the same features — thinking budget, sampling, stop strings, tools —
//! without a C struct for each.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::Ordering;

use q3c_runtime::chat::{self, ChatRequest, Piece};
use q3c_runtime::text::TextModel;
use q3c_runtime::{CompiledModel, RuntimeError};

/// A loaded model as every surface holds it (the server too, so both bound conversations alike).
type Loaded = q3c_runtime::Model;

/// The API version `q3c_runtime_api_version` reports.
pub const API_VERSION: u32 = 1;

/// What a `q3c_model *` points to.
pub struct Model {
    model: Loaded,
    text: TextModel,
    context: usize,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(message: String) {
    let c = CString::new(message.replace('\0', " ")).expect("no NUL left");
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

/// Runs `f`, turning errors and panics into `fallback` plus the thread's last error.
fn guarded<T>(fallback: T, f: impl FnOnce() -> Result<T, String>) -> T {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => {
            set_error(message);
            fallback
        }
        Err(_) => {
            set_error("internal error: a q3c bug panicked".into());
            fallback
        }
    }
}

/// A `&str` from a C string argument.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string valid for the call.
unsafe fn arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{name} is NULL"));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| format!("{name} is not UTF-8"))
}

#[no_mangle]
pub extern "C" fn q3c_runtime_api_version() -> u32 {
    API_VERSION
}

#[no_mangle]
pub extern "C" fn q3c_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// # Safety
/// `artifact` and `weights_dir` must be NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn q3c_model_load(
    artifact: *const c_char,
    weights_dir: *const c_char,
    threads: u32,
) -> *mut Model {
    guarded(std::ptr::null_mut(), || {
        let artifact = Path::new(arg(artifact, "artifact")?);
        let weights = Path::new(arg(weights_dir, "weights_dir")?);
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let text = TextModel::load(weights).map_err(|e| e.to_string())?;
        let model = CompiledModel::load(artifact, weights, threads).map_err(|e| e.to_string())?;
        let model = Loaded::Compiled(Box::new(model));
        let context = model.context();
        Ok(Box::into_raw(Box::new(Model {
            model,
            text,
            context,
        })))
    })
}

/// # Safety
/// `model` must be NULL or a pointer from `q3c_model_load` not freed before, with no request running.
#[no_mangle]
pub unsafe extern "C" fn q3c_model_free(model: *mut Model) {
    if !model.is_null() {
        drop(Box::from_raw(model));
    }
}

/// The piece callback of `q3c_chat`.
pub type PieceFn = Option<unsafe extern "C" fn(*mut c_void, c_int, *const c_char) -> c_int>;

/// # Safety
/// `model` must come from `q3c_model_load`; `request_json` must be a NUL-terminated string; `on_piece`, if
/// not NULL, must be safe to call with `user`.
#[no_mangle]
pub unsafe extern "C" fn q3c_chat(
    model: *const Model,
    request_json: *const c_char,
    on_piece: PieceFn,
    user: *mut c_void,
) -> *mut c_char {
    guarded(std::ptr::null_mut(), || {
        let m = model.as_ref().ok_or("model is NULL")?;
        let body = arg(request_json, "request_json")?;
        let planned = ChatRequest::parse(body.as_bytes())
            .and_then(|r| r.plan(&m.text, m.context))
            .map_err(|e: RuntimeError| e.to_string())?;
        if planned.n > 1 {
            return Err(format!(
                "n is {}: q3c_chat returns one choice (call it once per choice)",
                planned.n
            ));
        }
        let cancel = planned.opts.cancel.clone().expect("plan sets it");
        let mut session = m.model.session_with_capacity(planned.kv_tokens);
        let out = chat::decode(
            &mut *session,
            &m.text.tokenizer,
            &planned.prompt,
            &planned.opts,
            |piece| {
                let Some(f) = on_piece else { return };
                let (kind, text) = match piece {
                    Piece::Reasoning(t) => (0, t),
                    Piece::Content(t) => (1, t),
                    Piece::Logprob(_) => return,
                };
                let text = CString::new(text.replace('\0', "")).expect("no NUL left");
                if f(user, kind, text.as_ptr()) != 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
        )
        .map_err(|e| e.to_string())?;
        let json = serde_json::to_string(&out).map_err(|e| e.to_string())?;
        Ok(CString::new(json).map_err(|e| e.to_string())?.into_raw())
    })
}

/// # Safety
/// `s` must be NULL or a string returned by q3c, not freed before.
#[no_mangle]
pub unsafe extern "C" fn q3c_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}
