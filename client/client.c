/* libweightd-client: a blocking client over proto/'s framing. */
#include "client/internal.h"

#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/grow.h"
#include "loader/checkpoint.h"

int wdc__fail(wdc_client *c, int code, const char *fmt, ...)
{
    va_list ap;

    snprintf(c->code, sizeof c->code, "%s", wd_errname(code));
    va_start(ap, fmt);
    vsnprintf(c->message, sizeof c->message, fmt, ap);
    va_end(ap);
    /* It may quote the daemon (its error's words, a name it sent). */
    wd_text_clean(c->message);
    return code;
}

wdc_client *wdc_new(void)
{
    wdc_client *c = calloc(1, sizeof *c);

    if (!c)
        return NULL;
    c->fd = -1;
    wp_reader_init(&c->rd);
    wp_writer_init(&c->wr);
    return c;
}

void wdc__disconnect(wdc_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    wp_reader_free(&c->rd);
    wp_writer_free(&c->wr);
    wp_reader_init(&c->rd);
    wp_writer_init(&c->wr);
}

void wdc_close(wdc_client *c)
{
    if (!c)
        return;
    wdc__forget_attachments(c);
    if (c->fd >= 0)
        close(c->fd);
    wp_reader_free(&c->rd);
    wp_writer_free(&c->wr);
    for (size_t i = 0; i < c->n_notices; i++)
        free(c->notices[i]);
    free(c->notices);
    free(c->server_info);
    free(c);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Waits for events on the socket; the timeout restarts with each message. */
static int wait_for(wdc_client *c, short events, int timeout_ms)
{
    struct pollfd p = {.fd = c->fd, .events = events};
    int64_t t0 = now_us();
    int n;

    do
        n = poll(&p, 1, timeout_ms);
    while (n < 0 && errno == EINTR);
    c->waited_us += now_us() - t0;
    if (n < 0)
        return wdc__fail(c, -errno, "poll: %s", strerror(errno));
    if (n == 0)
        return wdc__fail(c, -ETIMEDOUT, "no answer from weightd at %s within %d ms", c->path, timeout_ms);
    return 0;
}

static int send_all(wdc_client *c, int timeout_ms)
{
    int rc;

    while ((rc = wp_writer_flush(&c->wr, c->fd)) == -EAGAIN)
        if ((rc = wait_for(c, POLLOUT, timeout_ms)))
            return rc;
    if (rc)
        return wdc__fail(c, rc, "sending to weightd at %s: %s", c->path, strerror(-rc));
    return 0;
}

int wdc__read_message(wdc_client *c, int timeout_ms, cJSON **msg, char **line_out)
{
    wd_error err = {0};
    char *line;
    size_t len;
    int rc;

    for (;;) {
        rc = wp_reader_next(&c->rd, &line, &len);
        if (rc == -EMSGSIZE)
            return wdc__fail(c, -EMSGSIZE, "weightd sent a message longer than %u bytes", WP_MAX_LINE);
        if (rc == 1) {
            if (len == 0)
                continue;
            if ((rc = wp_parse(line, len, msg, &err)))
                return wdc__fail(c, -EPROTO, "weightd sent a malformed message: %s", wd_error_text(&err));
            *line_out = line;
            return 0;
        }
        if ((rc = wait_for(c, POLLIN, timeout_ms)))
            return rc;
        rc = wp_reader_fill(&c->rd, c->fd);
        if (rc == 0)
            return wdc__fail(c, -ECONNRESET, "weightd closed the connection");
        if (rc < 0 && rc != -EAGAIN)
            return wdc__fail(c, rc, "reading from weightd: %s", strerror(-rc));
    }
}

/* Sends a request with n descriptors (duplicated: the caller keeps its own). */
static int send_request_fds(wdc_client *c, const char *op, cJSON *args, const int *fds, size_t n, int timeout_ms,
                            int64_t *id_out)
{
    cJSON *req;
    char *line;
    size_t len;
    int64_t id = ++c->next_id;
    int rc;

    c->code[0] = c->message[0] = '\0';
    if (c->fd < 0) {
        cJSON_Delete(args);
        return wdc__fail(c, -ENOTCONN, "not connected to weightd");
    }
    if (!(req = wp_request_new(id, op, args)) || !(line = wp_encode(req, &len))) {
        cJSON_Delete(req);
        return wdc__fail(c, -ENOMEM, "out of memory");
    }
    cJSON_Delete(req);
    if (len > WP_MAX_LINE) {
        free(line);
        return wdc__fail(c, -EMSGSIZE, "request for %s is longer than %u bytes", op, WP_MAX_LINE);
    }
    rc = wp_writer_push(&c->wr, line, len, fds, n);
    free(line);
    if (rc)
        return wdc__fail(c, rc, rc == -ENOMEM ? "out of memory" : "cannot duplicate a descriptor to send");
    if ((rc = send_all(c, timeout_ms)))
        return rc;
    *id_out = id;
    return 0;
}

int wdc__send_request(wdc_client *c, const char *op, cJSON *args, int timeout_ms, int64_t *id_out)
{
    return send_request_fds(c, op, args, NULL, 0, timeout_ms, id_out);
}

/* An event that names no request (a lease's revoke): kept for wdc_poll,
 * which hands it to the handler once it has stopped reading, so that the
 * handler may call into the library (wdc_detach, say). */
static void queue_notice(wdc_client *c, const char *raw)
{
    char *copy;

    if (!c->on_notice || !(copy = strdup(raw)))
        return;
    if (WD_GROW(c->notices, c->cap_notices, c->n_notices + 1, 4)) {
        free(copy);
        return;
    }
    c->notices[c->n_notices++] = copy;
}

int wdc__next_for(wdc_client *c, int64_t id, int timeout_ms, cJSON **msg, char **raw)
{
    int rc;

    for (;;) {
        const cJSON *mid, *ok;
        *msg = NULL; /* on a failed read too: the last one was deleted */
        if ((rc = wdc__read_message(c, timeout_ms, msg, raw)))
            return rc;
        mid = cJSON_GetObjectItemCaseSensitive(*msg, "id");
        ok = cJSON_GetObjectItemCaseSensitive(*msg, "ok");
        if (cJSON_GetObjectItemCaseSensitive(*msg, "event")) {
            if (cJSON_IsNumber(mid) && mid->valuedouble == (double)id)
                return 0;
            if (!mid || cJSON_IsNull(mid)) {
                wdc__lease_event(c, *msg);
                queue_notice(c, *raw);
            }
            cJSON_Delete(*msg);
            continue;
        }
        /* Our reply, or an error the daemon could not tie to a request. */
        if (cJSON_IsBool(ok) && ((cJSON_IsNumber(mid) && mid->valuedouble == (double)id) ||
                                 (cJSON_IsNull(mid) && cJSON_IsFalse(ok))))
            return 0;
        cJSON_Delete(*msg);
    }
}

int wdc__reply_result(wdc_client *c, const cJSON *msg, const cJSON **result)
{
    const cJSON *e, *code, *text;

    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(msg, "ok"))) {
        *result = cJSON_GetObjectItemCaseSensitive(msg, "result");
        return 0;
    }
    e = cJSON_GetObjectItemCaseSensitive(msg, "error");
    code = cJSON_GetObjectItemCaseSensitive(e, "code");
    text = cJSON_GetObjectItemCaseSensitive(e, "message");
    /* The code as this library knows it (EPROTO for a name not in the
     * table), so that wdc_error_code and the return value agree. */
    return wdc__fail(c, wd_errcode(cJSON_IsString(code) ? code->valuestring : NULL), "%s",
                     cJSON_IsString(text) && text->valuestring[0] ? text->valuestring
                                                                  : "weightd reported an error without a message");
}

/* Sends op with args (consumed) and n descriptors, and waits for its reply. */
static int call_with(wdc_client *c, const char *op, cJSON *args, const int *fds, size_t n, int timeout_ms,
                     wdc_event_fn on_event, void *ctx, char **result_json)
{
    cJSON *msg = NULL;
    const cJSON *result;
    char *raw;
    int64_t id;
    int rc;

    if (on_event)
        cJSON_AddBoolToObject(args, "events", 1);
    if ((rc = send_request_fds(c, op, args, fds, n, timeout_ms, &id)))
        return rc;
    for (;;) {
        if ((rc = wdc__next_for(c, id, timeout_ms, &msg, &raw)))
            return rc;
        if (!cJSON_GetObjectItemCaseSensitive(msg, "event"))
            break;
        if (on_event)
            on_event(raw, ctx);
        cJSON_Delete(msg);
    }
    if (!(rc = wdc__reply_result(c, msg, &result)) && result_json &&
        !(*result_json = result ? cJSON_PrintUnformatted(result) : strdup("null")))
        rc = wdc__fail(c, -ENOMEM, "out of memory");
    cJSON_Delete(msg);
    return rc;
}

/* Arguments as JSON text (NULL or "": none), parsed; NULL with c's error set. */
static cJSON *parse_args(wdc_client *c, const char *op, const char *args_json)
{
    wd_error err = {0};
    cJSON *args = NULL;

    c->code[0] = c->message[0] = '\0';
    /* Descriptors nobody took from an earlier reply are not kept. */
    wp_reader_drop_fds(&c->rd);
    if (c->fd < 0) {
        wdc__fail(c, -ENOTCONN, "not connected to weightd");
        return NULL;
    }
    if (!args_json || !*args_json) {
        if (!(args = cJSON_CreateObject()))
            wdc__fail(c, -ENOMEM, "out of memory");
        return args;
    }
    if (wp_parse(args_json, strlen(args_json), &args, &err))
        wdc__fail(c, -EINVAL, "arguments for %s: %s", op, wd_error_text(&err));
    return args;
}

int wdc_call(wdc_client *c, const char *op, const char *args_json, int timeout_ms, wdc_event_fn on_event,
             void *ctx, char **result_json)
{
    cJSON *args;

    if (result_json)
        *result_json = NULL;
    if (!(args = parse_args(c, op, args_json)))
        return wd_errcode(c->code);
    return call_with(c, op, args, NULL, 0, timeout_ms, on_event, ctx, result_json);
}

int wdc_checkpoint_files(const char *path, char **files, size_t *len, char *errbuf, size_t errlen)
{
    wd_error err = {0};
    char **v = NULL, *out;
    size_t n = 0, total = 0;
    int rc;

    *files = NULL;
    *len = 0;
    if ((rc = wl_checkpoint_files(path, &v, &n, &err)) == 0) {
        for (size_t i = 0; i < n; i++)
            total += strlen(v[i]) + 1;
        if ((out = malloc(total ? total : 1))) {
            for (size_t i = 0, at = 0; i < n; i++) {
                memcpy(out + at, v[i], strlen(v[i]) + 1);
                at += strlen(v[i]) + 1;
            }
            *files = out;
            *len = total;
        } else {
            rc = wd_error_set(&err, -ENOMEM, "out of memory");
        }
    }
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
    if (rc && errbuf && errlen)
        snprintf(errbuf, errlen, "%s", wd_error_text(&err));
    return rc;
}

void wdc_free(void *p)
{
    free(p);
}

int wdc_load(wdc_client *c, const char *path, const char *args_json, int timeout_ms, wdc_event_fn on_event,
             void *ctx, char **result_json)
{
    wd_error err = {0};
    cJSON *args, *list;
    char **files = NULL, *shown;
    int *fds = NULL;
    size_t n = 0, opened = 0;
    int rc;

    if (result_json)
        *result_json = NULL;
    if (!(args = parse_args(c, "load", args_json)))
        return wd_errcode(c->code);
    if (!path || path[0] != '/') {
        cJSON_Delete(args);
        return wdc__fail(c, -EINVAL, "wdc_load takes an absolute path");
    }
    /* The files, opened here: the daemon reads through these descriptors,
     * so it reads what this process can, and nothing a path swapped later
     * would point to. */
    if ((rc = wl_checkpoint_files(path, &files, &n, &err))) {
        rc = wdc__fail(c, rc, "%s", wd_error_text(&err));
        goto out;
    }
    if (n > WP_MAX_FDS) {
        rc = wdc__fail(c, -E2BIG, "%s has %zu files; one load takes at most %d", path, n, WP_MAX_FDS);
        goto out;
    }
    if (!(fds = malloc(n * sizeof *fds))) {
        rc = wdc__fail(c, -ENOMEM, "out of memory");
        goto out;
    }
    for (; opened < n; opened++)
        if ((fds[opened] = open(files[opened], O_RDONLY | O_CLOEXEC | O_NONBLOCK)) < 0) {
            rc = wdc__fail(c, -errno, "cannot open %s: %s", files[opened], strerror(errno));
            goto out;
        }
    /* Paths are for people: one line of UTF-8 each (JSON carries no other). */
    cJSON_DeleteItemFromObjectCaseSensitive(args, "path");
    cJSON_DeleteItemFromObjectCaseSensitive(args, "files");
    if ((shown = strdup(path))) {
        wd_text_clean(shown);
        cJSON_AddStringToObject(args, "path", shown);
        free(shown);
    }
    list = cJSON_AddArrayToObject(args, "files");
    for (size_t i = 0; i < n; i++) {
        wd_text_clean(files[i]);
        cJSON_AddItemToArray(list, cJSON_CreateString(files[i]));
    }
    rc = call_with(c, "load", args, fds, n, timeout_ms, on_event, ctx, result_json);
    args = NULL;
out:
    cJSON_Delete(args);
    for (size_t i = 0; i < opened; i++)
        close(fds[i]);
    free(fds);
    for (size_t i = 0; i < n; i++)
        free(files[i]);
    free(files);
    return rc;
}

void wdc_set_notice_handler(wdc_client *c, wdc_event_fn fn, void *ctx)
{
    c->on_notice = fn;
    c->notice_ctx = ctx;
}

int wdc_poll(wdc_client *c, int timeout_ms)
{
    int handled = 0, rc = 0;

    if (c->fd < 0 && !c->n_notices)
        return wdc__fail(c, -ENOTCONN, "not connected to weightd");
    /* Every message buffered or readable now, and, while no notice has come,
     * what arrives within the timeout. */
    while (c->fd >= 0) {
        const cJSON *mid;
        cJSON *msg;
        char *line;
        if ((rc = wdc__read_message(c, c->n_notices ? 0 : timeout_ms, &msg, &line))) {
            if (rc == -ETIMEDOUT) {
                c->code[0] = c->message[0] = '\0';
                rc = 0;
            }
            break;
        }
        mid = cJSON_GetObjectItemCaseSensitive(msg, "id");
        if (cJSON_GetObjectItemCaseSensitive(msg, "event") && (!mid || cJSON_IsNull(mid))) {
            wdc__lease_event(c, msg);
            queue_notice(c, line);
        }
        cJSON_Delete(msg);
    }
    /* Reading is over: the handler may use the client (not close it). */
    while (c->n_notices) {
        char *ev = c->notices[0];
        memmove(c->notices, c->notices + 1, --c->n_notices * sizeof *c->notices);
        if (c->on_notice)
            c->on_notice(ev, c->notice_ctx);
        free(ev);
        handled++;
    }
    return handled ? handled : rc;
}

/* A daemon that refuses a connection (max_clients, stopping) says why and
 * closes at once, perhaps before our hello went: its words, if they came. */
static int refusal(wdc_client *c, int rc)
{
    const cJSON *result;
    cJSON *msg = NULL;
    char *line;
    size_t len;
    wd_error err = {0};

    while (wp_reader_fill(&c->rd, c->fd) > 0)
        ;
    if (wp_reader_next(&c->rd, &line, &len) == 1 && wp_parse(line, len, &msg, &err) == 0 &&
        cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(msg, "ok")))
        rc = wdc__reply_result(c, msg, &result);
    cJSON_Delete(msg);
    return rc;
}

int wdc_connect(wdc_client *c, const char *path, int timeout_ms)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char def[4096]; /* longer than any sun_path: a long $WEIGHTD_SOCKET is refused, not truncated */
    int rc;

    if (c->fd >= 0)
        return wdc__fail(c, -EISCONN, "already connected");
    if (!path || !*path)
        path = wp_default_socket(def, sizeof def);
    if (strlen(path) >= sizeof addr.sun_path)
        return wdc__fail(c, -ENAMETOOLONG, "socket path too long: %s", path);
    snprintf(c->path, sizeof c->path, "%s", path);
    strcpy(addr.sun_path, path);
    if ((c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return wdc__fail(c, -errno, "socket: %s", strerror(errno));
    /* A Unix connect completes at once (or waits for room in the backlog);
     * everything after it is non-blocking with poll() timeouts. */
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        rc = -errno;
        close(c->fd);
        c->fd = -1;
        if (rc == -ENOENT || rc == -ECONNREFUSED)
            return wdc__fail(c, -ECONNREFUSED, "weightd is not running at %s (%s)", path, strerror(-rc));
        return wdc__fail(c, rc, "connecting to %s: %s", path, strerror(-rc));
    }
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    rc = wdc_call(c, "hello", "{\"version\":\"" WP_VERSION "\",\"client\":\"libweightd-client\"}", timeout_ms, NULL,
                  NULL, &c->server_info);
    if (rc == -EPIPE || rc == -ECONNRESET)
        rc = refusal(c, rc);
    if (rc) {
        close(c->fd);
        c->fd = -1;
    }
    return rc;
}

int wdc_wait_closed(wdc_client *c, int timeout_ms)
{
    int64_t deadline = now_ms() + (timeout_ms < 0 ? (int64_t)1 << 40 : timeout_ms);
    int rc;

    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return wdc__fail(c, -ETIMEDOUT, "weightd did not close the connection within %d ms", timeout_ms);
        if ((rc = wait_for(c, POLLIN, (int)left)))
            return rc;
        rc = wp_reader_fill(&c->rd, c->fd);
        if (rc == 0 || rc == -ECONNRESET)
            return 0;
        if (rc < 0 && rc != -EAGAIN)
            return wdc__fail(c, rc, "reading from weightd: %s", strerror(-rc));
        c->rd.len = c->rd.consumed = 0; /* whatever arrives now is not waited for */
    }
}

const char *wdc_error_code(const wdc_client *c) { return c->code; }
const char *wdc_error_message(const wdc_client *c) { return c->message; }
const char *wdc_server_info(const wdc_client *c) { return c->server_info ? c->server_info : "{}"; }
const char *wdc_socket_path(const wdc_client *c) { return c->path; }
int wdc_fd(const wdc_client *c) { return c->fd; }

size_t wdc_take_fds(wdc_client *c, int *fds, size_t max)
{
    return wp_reader_take_fds(&c->rd, fds, max);
}
