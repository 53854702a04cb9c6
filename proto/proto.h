/* The wire protocol shared by weightd and its clients.
 *
 * Newline-delimited JSON over a SOCK_STREAM Unix socket; one JSON object per
 * line, at most WP_MAX_LINE bytes with its newline. File descriptors travel
 * as SCM_RIGHTS ancillary data on the first byte of the message that names
 * them.
 *   request  {"id": 7, "op": "load", "args": {...}}
 *   reply    {"id": 7, "ok": true, "result": {...}}
 *            {"id": 7, "ok": false, "error": {"code": "ENOSPC", "message": "..."}}
 *   event    {"event": "progress", "id": 7, ...}
 * The first request on a connection is "hello" with {"version": "1.0"}; a
 * different major version is refused with EPROTONOSUPPORT. */
#ifndef WP_PROTO_H
#define WP_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "common/errors.h"

#define WP_VERSION_MAJOR 1
#define WP_VERSION "1.0"
#define WP_MAX_LINE (1u << 20)  /* bytes, newline included */
/* Descriptors carried by one message: the kernel's own limit (SCM_MAX_FD).
 * More travel in several messages, each saying which its descriptors are. */
#define WP_MAX_FDS 253
/* A request's "id": a whole number below 10^15 in size (cJSON writes 15
 * significant digits: the reply echoes it exactly), or a string of at most
 * this many bytes (every reply and event fits a message whatever the id). */
#define WP_MAX_ID_LEN 128

/* ---- reading: bytes and descriptors in, lines out ---------------------- */

typedef struct wp_reader {
    char *buf;
    size_t len, cap, consumed;
    uint64_t base;            /* stream offset of buf[0] */
    int fds[WP_MAX_FDS * 2];  /* one recvmsg brings one message's at most */
    /* Stream offset where the read that brought each descriptor ended: the
     * message they came with starts before it, so a line that starts at or
     * after it cannot be theirs. */
    uint64_t fd_until[WP_MAX_FDS * 2];
    size_t n_fds;
} wp_reader;

void wp_reader_init(wp_reader *r);
/* Closes any descriptors not taken. */
void wp_reader_free(wp_reader *r);
/* One recvmsg() on sock. >0: bytes read; 0: the peer closed; -EAGAIN: nothing
 * now (non-blocking socket); other negative errno on error. Descriptors beyond
 * what the reader can hold are closed and reported as -EMSGSIZE. */
int wp_reader_fill(wp_reader *r, int sock);
/* 1 and *line (NUL-terminated, without its newline, valid until the next call)
 * when a whole line is buffered; 0 when more bytes are needed; -EMSGSIZE when
 * a line runs past WP_MAX_LINE. Descriptors that came before the line it
 * returns or waits for starts are closed: they were sent with earlier lines. */
int wp_reader_next(wp_reader *r, char **line, size_t *len);
/* Bytes received and not yet returned as lines (a line still half read). */
static inline size_t wp_reader_buffered(const wp_reader *r)
{
    return r->len - r->consumed;
}
/* Moves up to max received descriptors to fds; returns how many. */
size_t wp_reader_take_fds(wp_reader *r, int *fds, size_t max);
/* Closes the received descriptors nobody took. */
void wp_reader_drop_fds(wp_reader *r);

/* ---- writing: a queue of messages, each with its descriptors ----------- */

typedef struct wp_chunk wp_chunk;
typedef struct wp_writer {
    wp_chunk *head, *tail;
    size_t queued;     /* bytes not yet sent */
    size_t queued_fds; /* descriptors held for messages not yet sent */
} wp_writer;

void wp_writer_init(wp_writer *w);
void wp_writer_free(wp_writer *w);
/* Queues len bytes and duplicates of the n descriptors (the caller keeps its own). */
int wp_writer_push(wp_writer *w, const char *data, size_t len, const int *fds, size_t n);
/* Sends what it can without blocking. 0: all sent; -EAGAIN: more left; other
 * negative errno: the connection is broken. */
int wp_writer_flush(wp_writer *w, int sock);
static inline bool wp_writer_empty(const wp_writer *w)
{
    return w->head == NULL;
}

/* ---- messages ------------------------------------------------------------ */

/* Parses one line: a JSON object in valid UTF-8, or -EBADMSG with why in err. */
int wp_parse(const char *line, size_t len, cJSON **out, wd_error *err);
/* Encodes msg as one line with its newline (malloc'd); NULL when out of memory. */
char *wp_encode(const cJSON *msg, size_t *len);

cJSON *wp_request_new(int64_t id, const char *op, cJSON *args);
/* id: the request's id as received (any JSON value, may be NULL); result may be NULL. */
cJSON *wp_reply_ok(const cJSON *id, cJSON *result);
cJSON *wp_reply_error(const cJSON *id, int code, const char *message);
cJSON *wp_event_new(const cJSON *id, const char *event);

/* Typed argument access for handlers: each returns 0, -ENOENT when the key is
 * absent (and not required), or -EINVAL with a message naming the key. */
int wp_arg_string(const cJSON *args, const char *key, bool required, const char **out, wd_error *err);
int wp_arg_int(const cJSON *args, const char *key, bool required, int64_t min, int64_t max, int64_t *out,
               wd_error *err);
int wp_arg_bool(const cJSON *args, const char *key, bool *out, wd_error *err);
/* A JSON value as a whole number in [min, max] (0, or -EINVAL saying what
 * it must be); for what the daemon reads back, such as its fd store's record. */
int wp_int_value(const cJSON *v, const char *what, int64_t min, int64_t max, int64_t *out, wd_error *err);

/* The socket path: $WEIGHTD_SOCKET, else /run/weightd/weightd.sock as root,
 * else $XDG_RUNTIME_DIR/weightd.sock, else /tmp/weightd-UID.sock. */
const char *wp_default_socket(char *buf, size_t len);

#endif
