/* libweightd-client: talk to weightd over its Unix socket.
 *
 *     wdc_client *c = wdc_new();
 *     if (wdc_connect(c, NULL, 5000) < 0) { puts(wdc_error_message(c)); ... }
 *     char *result;
 *     if (wdc_call(c, "list", NULL, 5000, NULL, NULL, &result) == 0) { ...; free(result); }
 *     wdc_close(c);
 *
 * Every call returns 0 or a negative errno. An error reply from the daemon is
 * returned as its code (-ENOENT for "ENOENT"), with the daemon's words in
 * wdc_error_message(). -ETIMEDOUT means nothing arrived for timeout_ms
 * (< 0: wait forever). Requests and results are JSON text; see DESIGN.md for
 * the operations. Not thread-safe: one thread per client handle. */
#ifndef WEIGHTD_CLIENT_H
#define WEIGHTD_CLIENT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct wdc_client wdc_client;

/* Called for each event of a request in flight ("progress" during a load),
 * with the whole event object as JSON text. */
typedef void (*wdc_event_fn)(const char *event_json, void *ctx);

wdc_client *wdc_new(void);
/* Closes the connection and frees the handle (NULL is fine). */
void wdc_close(wdc_client *c);

/* Connects and says hello. path NULL: $WEIGHTD_SOCKET, else
 * /run/weightd/weightd.sock as root, else $XDG_RUNTIME_DIR/weightd.sock. */
int wdc_connect(wdc_client *c, const char *path, int timeout_ms);

/* Sends {"op": op, "args": args_json} and waits for its reply. args_json may
 * be NULL. With on_event, asks for events and passes them on. On success,
 * *result_json (when not NULL) is the reply's result, to free(). */
int wdc_call(wdc_client *c, const char *op, const char *args_json, int timeout_ms, wdc_event_fn on_event,
             void *ctx, char **result_json);

/* Waits until the daemon closes the connection (after shutdown). */
int wdc_wait_closed(wdc_client *c, int timeout_ms);

const char *wdc_error_code(const wdc_client *c);    /* "ENOENT"; "" when the last call worked */
const char *wdc_error_message(const wdc_client *c); /* one line */
const char *wdc_server_info(const wdc_client *c);   /* hello's result as JSON text */
const char *wdc_socket_path(const wdc_client *c);
/* The socket's descriptor, for poll(); readable means a message is coming. */
int wdc_fd(const wdc_client *c);
/* Descriptors received with the last reply (attach); the caller owns them. */
size_t wdc_take_fds(wdc_client *c, int *fds, size_t max);

#ifdef __cplusplus
}
#endif

#endif
