/* Chat with a compiled q3c model from C: stream one answer, then print the result object.
 *
 *   cc capi/examples/chat.c -Icapi -Ltarget/release -lq3c_capi -o chat
 *   LD_LIBRARY_PATH=target/release ./chat model.so weights/ "What is 2+2?"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "q3c_runtime.h"

static int on_piece(void *user, int kind, const char *text) {
    int *pieces = user;
    ++*pieces;
    /* Reasoning in brackets, answer as is. */
    printf(kind == 0 ? "[%s]" : "%s", text);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.so WEIGHTS_DIR [PROMPT]\n", argv[0]);
        return 2;
    }
    if (q3c_runtime_api_version() != 1) {
        fprintf(stderr, "unexpected q3c runtime API version %u\n", q3c_runtime_api_version());
        return 1;
    }
    q3c_model *model = q3c_model_load(argv[1], argv[2], 0);
    if (!model) {
        fprintf(stderr, "error: %s\n", q3c_last_error());
        return 1;
    }
    /* The prompt goes into a JSON string: keep the example's escaping simple. */
    const char *prompt = argc > 3 ? argv[3] : "What is 2+2?";
    char request[4096];
    snprintf(request, sizeof request,
             "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}],"
             " \"max_tokens\": 48, \"thinking_budget\": 4, \"seed\": 1}",
             prompt);
    int pieces = 0;
    char *result = q3c_chat(model, request, on_piece, &pieces);
    if (!result) {
        fprintf(stderr, "error: %s\n", q3c_last_error());
        q3c_model_free(model);
        return 1;
    }
    printf("\n%d pieces\n%s\n", pieces, result);
    q3c_string_free(result);

    /* A bad request is an error, not a crash. */
    char *bad = q3c_chat(model, "{\"messages\": 7}", NULL, NULL);
    if (bad || !q3c_last_error() || !strstr(q3c_last_error(), "invalid request body")) {
        fprintf(stderr, "a bad request was not refused\n");
        return 1;
    }
    printf("bad request refused: %s\n", q3c_last_error());
    /* q3c_chat answers one choice. */
    char *several = q3c_chat(model, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 2}",
                             NULL, NULL);
    if (several || !strstr(q3c_last_error(), "n is 2")) {
        fprintf(stderr, "n = 2 was not refused\n");
        return 1;
    }
    printf("n refused: %s\n", q3c_last_error());
    q3c_model_free(model);
    return 0;
}
