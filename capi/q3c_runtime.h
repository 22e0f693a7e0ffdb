/*
 * q3c runtime C API, version 1: load a model compiled by `q3c compile` and chat with it.
 *
 * Link with -lq3c_capi (libq3c_capi.so, built by `cargo build --release -p q3c-capi`).
 * Every function is safe to call from any thread; one model serves many concurrent requests, each with its
 * own KV cache. Errors: functions return NULL (or a negative value) and q3c_last_error() says why.
 */
#ifndef Q3C_RUNTIME_H
#define Q3C_RUNTIME_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A loaded model: artifact code, bound weights, tokenizer and chat template. */
typedef struct q3c_model q3c_model;

/* The version of this API: 1. */
uint32_t q3c_runtime_api_version(void);

/* The last error on the calling thread (UTF-8), or NULL. Valid until the next q3c call on this thread. */
const char *q3c_last_error(void);

/*
 * Loads `artifact` (a .so from `q3c compile`) with the weights in `weights_dir`, which also holds
 * tokenizer.json and tokenizer_config.json. `threads` 0 means all cores. NULL on error.
 */
q3c_model *q3c_model_load(const char *artifact, const char *weights_dir, uint32_t threads);

/* Frees a model (NULL is ignored). No request may be running on it. */
void q3c_model_free(q3c_model *model);

/*
 * Streaming callback: `kind` is 0 for reasoning (inside the thinking block) and 1 for answer content;
 * `text` is UTF-8 with complete characters, valid during the call. Return 0 to go on, non-zero to stop.
 */
typedef int (*q3c_piece_fn)(void *user, int kind, const char *text);

/*
 * Runs one chat request. `request_json` is a JSON object as for POST /v1/chat/completions: "messages"
 * (required), "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
 * "repetition_penalty", "seed", "stop", "tools", and Qwen3's "enable_thinking" and "thinking_budget".
 * `on_piece` (may be NULL) receives the text as it is generated.
 * Returns a JSON object — "ids", "text", "reasoning", "content", "thinking_tokens", "budget_hit",
 * "answer_tokens", "prompt_tokens", "finish_reason" — to free with q3c_string_free, or NULL on error.
 */
char *q3c_chat(q3c_model *model, const char *request_json, q3c_piece_fn on_piece, void *user);

/* Frees a string returned by q3c (NULL is ignored). */
void q3c_string_free(char *s);

#ifdef __cplusplus
}
#endif

#endif /* Q3C_RUNTIME_H */
