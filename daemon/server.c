/* The loop's side of weightd: the listening socket, connections, request
 * dispatch, systemd notifications and the orderly stop.
 *
 * Connections are raw non-blocking sockets watched by uv_poll so that every
 * message can carry descriptors (SCM_RIGHTS) exactly where the protocol puts
 * them; framing lives in proto/. */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>


#include "common/fault.h"
#include "common/size.h"

#define TICK_MS 200
#define MAX_QUEUED_OUTPUT (64u << 20) /* a client this far behind is dropped */
#define PAUSE_QUEUED_OUTPUT (1u << 20) /* a client this far behind is not read until it catches up */
#define PAUSE_QUEUED_FDS 256           /* and one with this many descriptors queued for it */

double wd_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double wd_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- peers: what each uid holds, for the per-uid bounds -------------------- */

static wd_peer *peer_get(wd_server *s, uid_t uid)
{
    wd_peer *p;

    for (p = s->peers; p; p = p->next)
        if (p->uid == uid)
            return p;
    if (!(p = calloc(1, sizeof *p)))
        return NULL;
    p->uid = uid;
    p->next = s->peers;
    s->peers = p;
    return p;
}

static void peer_put(wd_server *s, wd_peer *p)
{
    if (p->conns || p->requests || p->leases)
        return;
    for (wd_peer **pp = &s->peers; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            free(p);
            return;
        }
}

/* ---- connections ----------------------------------------------------------- */

static void conn_close(wd_conn *c, const char *why);

static void on_conn_closed(uv_handle_t *h)
{
    wd_conn *c = h->data;

    if (--c->handles)
        return;
    close(c->fd);
    if (c->peer_fd >= 0)
        close(c->peer_fd);
    wp_reader_free(&c->rd);
    wp_writer_free(&c->wr);
    free(c->groups);
    free(c);
}

/* A client that does not read its replies gets no more requests handled
 * (they wait in its socket) until it catches up: its backlog stays bounded
 * (bytes, and descriptors: each attach queues duplicates of its model's)
 * and the loop stays free for the other clients. */
static bool conn_paused(const wd_conn *c)
{
    return c->wr.queued >= PAUSE_QUEUED_OUTPUT || c->wr.queued_fds >= PAUSE_QUEUED_FDS;
}

/* A connection that can no longer be sent to is closed by the loop (the
 * reaper), never under the code that was sending: that code may be walking
 * the jobs, the leases or the models that the close ends and frees. */
static void on_reap(uv_idle_t *h);

static void conn_fail(wd_conn *c, const char *why)
{
    if (c->dead || c->broken)
        return;
    c->broken = true;
    c->broken_why = why;
    uv_poll_stop(&c->poll);
    uv_idle_start(&c->srv->reaper, on_reap);
}

static void conn_update_poll(wd_conn *c)
{
    int events = c->closing || conn_paused(c) ? 0 : UV_READABLE;

    if (c->broken)
        return;
    if (!wp_writer_empty(&c->wr))
        events |= UV_WRITABLE;
    if (events)
        uv_poll_start(&c->poll, events, c->poll.poll_cb);
    else
        uv_poll_stop(&c->poll);
}

static void conn_flush(wd_conn *c)
{
    int rc;

    if (c->dead || c->broken)
        return;
    rc = wp_writer_flush(&c->wr, c->fd);

    if (rc && rc != -EAGAIN) {
        conn_fail(c, rc == -EPIPE || rc == -ECONNRESET ? "peer went away" : strerror(-rc));
        return;
    }
    if (c->closing && wp_writer_empty(&c->wr)) {
        conn_fail(c, NULL);
        return;
    }
    conn_update_poll(c);
}

static void conn_send_line(wd_conn *c, char *line, size_t len, const int *fds, size_t n_fds);

static void conn_send(wd_conn *c, cJSON *msg, const int *fds, size_t n_fds)
{
    char *line;
    size_t len = 0;

    if (!c || c->dead || c->broken || !msg) {
        cJSON_Delete(msg);
        return;
    }
    line = wp_encode(msg, &len);
    cJSON_Delete(msg);
    conn_send_line(c, line, len, fds, n_fds);
}

/* Queues one encoded line (consumed) with its descriptors, and sends what
 * the socket takes. */
static void conn_send_line(wd_conn *c, char *line, size_t len, const int *fds, size_t n_fds)
{
    int rc;

    if (!c || c->dead || c->broken) {
        free(line);
        return;
    }
    if (!line || len > WP_MAX_LINE) {
        wd_log(WD_LOG_error, "client %llu: a reply of %zu bytes does not fit a message; dropping the client",
               (unsigned long long)c->serial, line ? len : 0);
        free(line);
        conn_fail(c, "reply too large");
        return;
    }
    if ((rc = wp_writer_push(&c->wr, line, len, fds, n_fds))) {
        free(line);
        conn_fail(c, rc == -ENOMEM ? "out of memory queueing a reply"
                                   : "cannot duplicate a descriptor for it (too many open files)");
        return;
    }
    free(line);
    if (c->wr.queued > MAX_QUEUED_OUTPUT) {
        conn_fail(c, "client does not read its replies");
        return;
    }
    conn_flush(c);
}

static void request_unlink(wd_request *r)
{
    wd_conn *c = r->conn;

    if (!c)
        return;
    c->n_pending--;
    c->peer->requests--;
    c->last_active = wd_now();
    if (r->prev)
        r->prev->next = r->next;
    else
        c->pending = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->conn = NULL;
    r->prev = r->next = NULL;
}

static void request_free(wd_request *r)
{
    request_unlink(r);
    for (size_t i = 0; i < r->n_fds; i++)
        if (r->fds[i] >= 0)
            close(r->fds[i]);
    free(r->fds);
    cJSON_Delete(r->id);
    cJSON_Delete(r->args);
    free(r);
}

/* A reply ends its request. A send that fails only marks the connection
 * broken (conn_fail): r and its connection stay until the reaper runs. */
void wd_reply_ok(wd_request *r, cJSON *result)
{
    conn_send(r->conn, wp_reply_ok(r->id, result), NULL, 0);
    request_free(r);
}

void wd_reply_error(wd_request *r, int code, const char *fmt, ...)
{
    wd_conn *c = r->conn;
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    wd_text_clean(msg); /* may quote the peer, and be cut mid-character */
    if (c)
        wd_log(WD_LOG_debug, "client %llu: %s failed: %s: %s", (unsigned long long)c->serial, r->op,
               wd_errname(code), msg);
    conn_send(c, wp_reply_error(r->id, code, msg), NULL, 0);
    request_free(r);
}

void wd_reply_err(wd_request *r, const wd_error *e)
{
    wd_reply_error(r, e->code ? e->code : -EIO, "%s", wd_error_text(e));
}

void wd_request_event(wd_request *r, cJSON *ev)
{
    if (r->conn && r->want_events)
        conn_send(r->conn, ev, NULL, 0);
    else
        cJSON_Delete(ev);
}

bool wd_request_send(wd_request *r, char *line, size_t len, const int *fds, size_t n)
{
    wd_conn *c = r->conn;

    conn_send_line(c, line, len, fds, n);
    return c && !c->dead && !c->broken;
}

bool wd_conn_send(wd_conn *c, char *line, size_t len, const int *fds, size_t n)
{
    if (c->closing) {
        free(line);
        return false;
    }
    conn_send_line(c, line, len, fds, n);
    return !c->dead && !c->broken;
}

void wd_conn_event(wd_conn *c, cJSON *ev)
{
    if (c->closing) {
        cJSON_Delete(ev);
        return;
    }
    conn_send(c, ev, NULL, 0);
}

/* Sends an error that belongs to no request (a line we could not parse). */
static void send_stray_error(wd_conn *c, const cJSON *id, int code, const char *msg)
{
    conn_send(c, wp_reply_error(id, code, msg), NULL, 0);
}

/* conn_close unlinks c and may end leases and jobs of others, but it never
 * closes another connection (sends only mark them broken). */
static void close_broken(wd_server *s)
{
    for (wd_conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (c->broken)
            conn_close(c, c->broken_why);
    }
}

static void on_reap(uv_idle_t *h)
{
    wd_server *s = h->data;

    uv_idle_stop(h);
    close_broken(s);
    wd_server_maybe_finish(s); /* a stop may wait for these */
}

static void conn_close(wd_conn *c, const char *why)
{
    wd_server *s = c->srv;

    if (c->dead)
        return;
    c->dead = true;
    if (why)
        wd_log(WD_LOG_info, "client %llu (pid %d): closed: %s", (unsigned long long)c->serial, (int)c->pid, why);
    else
        wd_log(WD_LOG_debug, "client %llu (pid %d): closed", (unsigned long long)c->serial, (int)c->pid);
    /* Requests still running lose their client: loads it started are
     * cancelled, a forced unload it waits for stops waiting. None is a
     * running handler's: sends never close (the reaper does, from the
     * loop), and shutdown replies before it closes every connection. */
    while (c->pending) {
        wd_request *r = c->pending;
        wd_jobs_request_gone(s, r);
        wd_models_request_gone(s, r);
        wd_sleep_request_gone(s, r);
        request_free(r);
    }
    wd_leases_conn_gone(s, c, why ? why : "the connection closed");
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_conns--;
    c->peer->conns--;
    peer_put(s, c->peer);
    c->peer = NULL;
    uv_close((uv_handle_t *)&c->poll, on_conn_closed);
    if (c->peer_fd >= 0)
        uv_close((uv_handle_t *)&c->peer_poll, on_conn_closed);
}

static void on_peer_exit(uv_poll_t *h, int status, int events)
{
    wd_conn *c = h->data;
    (void)status;
    (void)events;

    conn_close(c, "its process exited");
}

void wd_conn_watch_peer(wd_conn *c)
{
    int fd;

    if (c->peer_fd >= 0 || c->pid <= 0)
        return;
    /* Without pidfds (Linux before 5.3) the socket's close is the only sign. */
    if ((fd = (int)syscall(SYS_pidfd_open, c->pid, 0)) < 0)
        return;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (uv_poll_init(c->srv->loop, &c->peer_poll, fd)) {
        close(fd);
        return;
    }
    c->peer_fd = fd;
    c->handles++;
    c->peer_poll.data = c;
    uv_poll_start(&c->peer_poll, UV_READABLE, on_peer_exit);
}

bool wd_conn_privileged(const wd_conn *c)
{
    return c->uid == 0 || c->uid == geteuid();
}

/* The descriptors r's "files" name, from those received with it. */
static int request_take_fds(wd_conn *c, wd_request *r)
{
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(r->args, "files");
    size_t want, got;

    if (!files || cJSON_IsNull(files))
        return 0;
    if (!cJSON_IsArray(files) || (want = (size_t)cJSON_GetArraySize(files)) < 1 || want > WP_MAX_FDS)
        return wd_error_set(&r->err, -EINVAL, "argument \"files\" must be an array of 1 to %d paths, one for each "
                            "descriptor sent with the request", WP_MAX_FDS);
    if (!(r->fds = malloc(want * sizeof *r->fds)))
        return wd_error_set(&r->err, -ENOMEM, "out of memory");
    got = wp_reader_take_fds(&c->rd, r->fds, want);
    r->n_fds = got;
    if (got < want)
        return wd_error_set(&r->err, -EINVAL, "the request names %zu files and came with %zu descriptors", want, got);
    return 0;
}

static void handle_line(wd_conn *c, const char *line, size_t len)
{
    wd_server *s = c->srv;
    wd_error err = {0};
    cJSON *msg = NULL, *id, *op, *args;
    const wd_op *desc;
    wd_request *r;
    int rc;

    if (len == 0)
        return; /* blank lines are allowed between messages */
    c->last_active = wd_now();
    if ((rc = wp_parse(line, len, &msg, &err))) {
        wd_log_peer(WD_LOG_info, "client %llu: bad message: %s", (unsigned long long)c->serial, wd_error_text(&err));
        send_stray_error(c, NULL, rc, wd_error_text(&err));
        return;
    }
    id = cJSON_GetObjectItemCaseSensitive(msg, "id");
    op = cJSON_GetObjectItemCaseSensitive(msg, "op");
    args = cJSON_GetObjectItemCaseSensitive(msg, "args");
    if (id && !cJSON_IsNumber(id) && !cJSON_IsString(id) && !cJSON_IsNull(id)) {
        send_stray_error(c, NULL, -EINVAL, "\"id\" must be a number or a string");
        goto out;
    }
    if (cJSON_IsNumber(id) && !(fabs(id->valuedouble) < 1e15 && id->valuedouble == floor(id->valuedouble))) {
        /* cJSON writes numbers with 15 significant digits: others could not be echoed exactly */
        send_stray_error(c, NULL, -EINVAL, "a numeric \"id\" is a whole number below 10^15 in size");
        goto out;
    }
    if (cJSON_IsString(id) && strlen(id->valuestring) > WP_MAX_ID_LEN) {
        char text[96];
        snprintf(text, sizeof text, "a string \"id\" is at most %d bytes", WP_MAX_ID_LEN);
        send_stray_error(c, NULL, -EINVAL, text);
        goto out;
    }
    if (!cJSON_IsString(op)) {
        send_stray_error(c, id, -EINVAL, "\"op\" must be a string naming the operation");
        goto out;
    }
    if (args && !cJSON_IsObject(args)) {
        send_stray_error(c, id, -EINVAL, "\"args\" must be an object");
        goto out;
    }
    if (!(desc = wd_op_find(op->valuestring))) {
        char text[160];
        snprintf(text, sizeof text, "unknown operation \"%.64s\"", op->valuestring);
        wd_text_clean(text);
        send_stray_error(c, id, -ENOSYS, text);
        goto out;
    }
    if (!c->hello && strcmp(desc->name, "hello") != 0) {
        send_stray_error(c, id, -EPROTO, "the first request must be \"hello\"");
        goto out;
    }
    /* Bounds on what one peer keeps the daemon busy with: requests that
     * may stay in flight (the others are answered before the next line). */
    if (desc->lasts && (c->n_pending >= (size_t)s->conf->max_requests_per_client ||
                        c->peer->requests >= (size_t)s->conf->max_requests_per_uid)) {
        bool mine = c->n_pending >= (size_t)s->conf->max_requests_per_client;
        char text[200];
        snprintf(text, sizeof text, "%zu requests of this %s are in flight (%s %lld); wait for their replies",
                 mine ? c->n_pending : c->peer->requests, mine ? "connection" : "user",
                 mine ? "max_requests_per_client" : "max_requests_per_uid",
                 (long long)(mine ? s->conf->max_requests_per_client : s->conf->max_requests_per_uid));
        wd_log_peer(WD_LOG_info, "client %llu (uid %d): refused %s: %s", (unsigned long long)c->serial, (int)c->uid,
                    desc->name, text);
        send_stray_error(c, id, -EAGAIN, text);
        goto out;
    }
    if (!(r = calloc(1, sizeof *r))) {
        send_stray_error(c, id, -ENOMEM, "out of memory");
        goto out;
    }
    r->conn = c;
    r->id = id ? cJSON_DetachItemViaPointer(msg, id) : NULL;
    r->args = args ? cJSON_DetachItemViaPointer(msg, args) : cJSON_CreateObject();
    snprintf(r->op, sizeof r->op, "%s", desc->name);
    r->next = c->pending;
    if (c->pending)
        c->pending->prev = r;
    c->pending = r;
    c->n_pending++;
    c->peer->requests++;
    if ((rc = wd_auth_require(r, desc->role, desc->name)) ||
        (desc->takes_fds && (rc = request_take_fds(c, r))) ||
        (rc = wp_arg_bool(r->args, "events", &r->want_events, &r->err)) == -EINVAL) {
        wd_reply_err(r, &r->err);
        goto out;
    }
    wd_log(WD_LOG_debug, "client %llu: %s", (unsigned long long)c->serial, r->op);
    rc = desc->fn(s, r);
    if (rc) {
        r->err.code = rc;
        wd_reply_err(r, &r->err);
    }
out:
    cJSON_Delete(msg);
}

/* Handles the complete lines buffered, while the client keeps up. */
static void conn_handle_lines(wd_conn *c)
{
    char *line;
    size_t len;
    int rc;

    while (!c->dead && !c->broken && !c->closing && !conn_paused(c)) {
        rc = wp_reader_next(&c->rd, &line, &len);
        if (rc == 1) {
            handle_line(c, line, len);
            continue;
        }
        if (rc == -EMSGSIZE) {
            char text[96];
            snprintf(text, sizeof text, "message longer than %u bytes; closing the connection", WP_MAX_LINE);
            wd_log_peer(WD_LOG_info, "client %llu: %s", (unsigned long long)c->serial, text);
            send_stray_error(c, NULL, -EMSGSIZE, text);
            if (!c->dead && !c->broken) {
                c->closing = true;
                conn_flush(c);
            }
        }
        return;
    }
}

static void on_conn_event(uv_poll_t *h, int status, int events)
{
    wd_conn *c = h->data;
    int rc;

    if (status < 0) {
        conn_close(c, uv_strerror(status));
        return;
    }
    if (events & UV_WRITABLE) {
        bool was_paused = conn_paused(c);
        conn_flush(c);
        if (c->dead || c->broken)
            return;
        if (was_paused && !conn_paused(c)) {
            /* caught up: the requests it sent meanwhile */
            conn_handle_lines(c);
            if (c->dead || c->broken)
                return;
            conn_update_poll(c);
        }
    }
    if (!(events & UV_READABLE) || c->closing || c->broken)
        return;
    /* A bounded number of reads per wakeup keeps one client from starving others. */
    for (int round = 0; round < 16 && !c->dead && !c->broken && !c->closing && !conn_paused(c); round++) {
        rc = wp_reader_fill(&c->rd, c->fd);
        if (rc == -EAGAIN)
            break;
        if (rc == 0) {
            /* The client sent its last: it gets what is queued for it (a
             * client that only shut its sending side reads on), then the
             * connection closes, and what it still waits for is cancelled. */
            c->closing = true;
            conn_flush(c);
            return;
        }
        if (rc == -EMSGSIZE) {
            send_stray_error(c, NULL, -EMSGSIZE, "too many file descriptors sent with a message");
        } else if (rc < 0) {
            conn_close(c, strerror(-rc));
            return;
        }
        /* Descriptors belong to the request that names them ("files"),
         * which they arrive with: the reader drops those a later line
         * cannot own. */
        conn_handle_lines(c);
    }
}

/* Refuses fd with an EBUSY line (best effort: it may not read it). */
static void refuse(wd_server *s, int fd, uid_t uid, const char *why)
{
    char line[320];
    int n = snprintf(line, sizeof line, "{\"id\":null,\"ok\":false,\"error\":{\"code\":\"EBUSY\",\"message\":"
                                        "\"weightd refused the connection: %s\"}}\n", why);
    char drain[4096];
    ssize_t ignored;

    /* What it sent already is read first: a close with unread bytes would
     * reset the connection, and the client would not see why. */
    while (recv(fd, drain, sizeof drain, MSG_DONTWAIT) > 0)
        ;
    ignored = send(fd, line, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)ignored;
    shutdown(fd, SHUT_WR);
    close(fd);
    wd_log_peer(WD_LOG_warning, "refused a client (uid %d): %s", (int)uid, why);
    s->accept_refused++;
}

/* At the connection limit: connections whose peers have gone but whose
 * close the loop has not seen yet, and broken ones, are closed first. */
static void reap_departed(wd_server *s)
{
    close_broken(s);
    for (wd_conn *c = s->conns, *next; c; c = next) {
        char b;
        next = c->next;
        if (recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0)
            conn_close(c, NULL);
    }
}

static void on_accept_retry(uv_timer_t *h)
{
    wd_server *s = h->data;

    if (!s->stopping)
        uv_poll_start(&s->listen_poll, UV_READABLE, s->listen_poll.poll_cb);
}

/* Out of descriptors (or kernel memory): stop listening for a while rather
 * than spin on a socket that stays readable, 10 ms at first, doubling to 1 s. */
static void accept_backoff(wd_server *s, int errnum)
{
    if (!s->accept_delay_ms) {
        wd_log(WD_LOG_warning, "cannot accept connections: %s (%zu open); trying again with a growing delay",
               strerror(errnum), s->n_conns);
        s->accept_delay_ms = 10;
    } else if (s->accept_delay_ms < 1000) {
        s->accept_delay_ms *= 2;
    }
    uv_poll_stop(&s->listen_poll);
    uv_timer_start(&s->accept_retry, on_accept_retry, s->accept_delay_ms, 0);
}

#define ADMIN_RESERVE 16 /* connections beyond max_clients, for administrators only */

static void on_listen(uv_poll_t *h, int status, int events)
{
    wd_server *s = h->data;
    (void)events;

    if (status < 0) {
        wd_log(WD_LOG_error, "listening socket: %s", uv_strerror(status));
        return;
    }
    /* A bounded number a turn: a flood of connections does not starve the
     * clients already served. */
    for (int round = 0; round < 64; round++) {
        wd_conn *c;
        wd_peer *peer;
        char why[160];
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                accept_backoff(s, errno);
            else if (errno != EAGAIN && errno != EWOULDBLOCK)
                wd_log(WD_LOG_warning, "accept: %s", strerror(errno));
            return;
        }
        if (s->accept_delay_ms) {
            wd_log(WD_LOG_notice, "accepting connections again");
            s->accept_delay_ms = 0;
        }
        if (!(c = calloc(1, sizeof *c))) {
            close(fd);
            continue;
        }
        c->srv = s;
        c->fd = fd;
        wd_auth_peer(&s->auth, c);
        if (s->stopping) {
            refuse(s, fd, c->uid, "it is stopping");
            free(c->groups);
            free(c);
            continue;
        }
        if ((int64_t)s->n_conns >= s->conf->max_clients)
            reap_departed(s);
        peer = peer_get(s, c->uid);
        why[0] = '\0';
        if (!peer)
            snprintf(why, sizeof why, "out of memory");
        else if ((int64_t)s->n_conns >= s->conf->max_clients + (c->role == WD_ROLE_ADMIN ? ADMIN_RESERVE : 0))
            snprintf(why, sizeof why, "it serves %zu connections (max_clients %lld)", s->n_conns,
                     (long long)s->conf->max_clients);
        else if (c->role != WD_ROLE_ADMIN && (int64_t)peer->conns >= s->conf->max_clients_per_uid)
            snprintf(why, sizeof why, "uid %d has %zu connections (max_clients_per_uid %lld)", (int)c->uid,
                     peer->conns, (long long)s->conf->max_clients_per_uid);
        if (why[0] || uv_poll_init(s->loop, &c->poll, fd)) {
            if (why[0])
                refuse(s, fd, c->uid, why);
            else
                close(fd);
            if (peer)
                peer_put(s, peer);
            free(c->groups);
            free(c);
            continue;
        }
        c->peer = peer;
        peer->conns++;
        c->peer_fd = -1;
        c->handles = 1;
        c->serial = ++s->next_serial;
        c->connected_at = c->last_active = wd_now();
        wp_reader_init(&c->rd);
        wp_writer_init(&c->wr);
        /* Room for an attach's stream (150 KB for 687 tensors) in the socket
         * itself (a message at least), so that the daemon writes it in few turns. */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &(int){WP_MAX_LINE}, sizeof(int));
        c->poll.data = c;
        c->next = s->conns;
        if (s->conns)
            s->conns->prev = c;
        s->conns = c;
        s->n_conns++;
        uv_poll_start(&c->poll, UV_READABLE, on_conn_event);
        wd_log(WD_LOG_debug, "client %llu connected (pid %d, uid %d, %s)", (unsigned long long)c->serial, (int)c->pid,
               (int)c->uid, wd_role_name(c->role));
    }
}

/* Connections that said nothing in time: no hello within hello_timeout, or
 * idle for idle_timeout holding no lease and waiting for nothing. */
static void conns_tick(wd_server *s)
{
    double now = wd_now();

    for (wd_conn *c = s->conns; c; c = c->next) {
        char text[128];
        if (c->broken || c->closing)
            continue;
        if (!c->hello && now - c->connected_at >= (double)s->conf->hello_timeout)
            snprintf(text, sizeof text, "no hello within %lld s (hello_timeout)", (long long)s->conf->hello_timeout);
        else if (c->hello && s->conf->idle_timeout && !c->leases && !c->pending &&
                 now - c->last_active >= (double)s->conf->idle_timeout)
            snprintf(text, sizeof text, "idle for %lld s (idle_timeout); closing", (long long)s->conf->idle_timeout);
        else
            continue;
        wd_log_peer(WD_LOG_info, "client %llu (pid %d): %s", (unsigned long long)c->serial, (int)c->pid, text);
        send_stray_error(c, NULL, -ETIMEDOUT, text);
        conn_fail(c, NULL); /* what it could take was sent; the reaper closes it */
    }
}

/* ---- the listening socket -------------------------------------------------- */

static int bind_socket(wd_server *s, const char *path, wd_error *err)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int fd, rc;

    if (strlen(path) >= sizeof addr.sun_path)
        return wd_error_set(err, -ENAMETOOLONG, "socket path too long (%zu bytes, at most %zu): %s", strlen(path),
                            sizeof addr.sun_path - 1, path);
    strcpy(addr.sun_path, path);
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0)
        return wd_error_set(err, -errno, "socket: %s", strerror(errno));
    for (int attempt = 0;; attempt++) {
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            break;
        if (errno != EADDRINUSE || attempt > 0) {
            rc = wd_error_set(err, -errno, "cannot listen on %s: %s", path, strerror(errno));
            goto fail;
        }
        /* Something is there: a live daemon answers, a stale socket refuses. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof addr) == 0) {
            close(probe);
            rc = wd_error_set(err, -EADDRINUSE, "another weightd is already listening on %s", path);
            goto fail;
        }
        if (probe >= 0)
            close(probe);
        if (errno != ECONNREFUSED && errno != ENOENT) {
            rc = wd_error_set(err, -EADDRINUSE, "%s exists and is not a weightd socket (%s)", path, strerror(errno));
            goto fail;
        }
        struct stat st;
        if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
            rc = wd_error_set(err, -EADDRINUSE, "%s exists and is not a socket; not replacing it", path);
            goto fail;
        }
        wd_log(WD_LOG_notice, "replacing the stale socket %s", path);
        unlink(path);
    }
    if ((rc = wd_auth_socket(s->conf, path, err))) {
        unlink(path);
        goto fail;
    }
    if (listen(fd, (int)s->conf->listen_backlog) < 0) {
        rc = wd_error_set(err, -errno, "cannot listen on %s: %s", path, strerror(errno));
        unlink(path);
        goto fail;
    }
    s->listen_fd = fd;
    s->own_socket = true;
    snprintf(s->socket_path, sizeof s->socket_path, "%s", path);
    return 0;
fail:
    close(fd);
    return rc;
}

static int open_listener(wd_server *s, wd_error *err)
{
    /* Longer than any sun_path, so that bind_socket sees (and refuses) a
     * path that does not fit instead of a silently truncated one. */
    char path[4096];
    int rc;

    if ((rc = wd_systemd_listen(s, err)))
        return rc;
    if (s->listen_fd >= 0) {
        s->own_socket = false;
        wd_log(WD_LOG_info, "listening on %s (socket from systemd)", s->socket_path);
        return 0;
    }
    if (s->conf->socket[0])
        snprintf(path, sizeof path, "%s", s->conf->socket);
    else
        wp_default_socket(path, sizeof path);
    return bind_socket(s, path, err);
}

/* ---- life cycle ------------------------------------------------------------ */

/* The daemon's signals are blocked in every thread and read from a
 * signalfd: no thread can take them, and no signal handler that a library
 * installs (the CUDA driver's, say) can take them over. */
static void daemon_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGHUP);
}

void wd_block_signals(void)
{
    sigset_t set;

    daemon_signals(&set);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/* The pipeline, the allocator and the backend, in that order. */
static void release_devices(wd_server *s)
{
    wd_fdstore_free(s);
    wl_pipeline_destroy(s->pipeline);
    s->pipeline = NULL;
    wa_destroy(s->alloc);
    s->alloc = NULL;
    wa_backend_destroy(s->backend);
    s->backend = NULL;
}

static void on_signal(uv_poll_t *h, int status, int events)
{
    wd_server *s = h->data;
    struct signalfd_siginfo si;
    (void)status;
    (void)events;

    while (read(s->signal_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGHUP)
            wd_server_reload(s);
        else
            wd_server_stop(s, si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
    }
}

static void on_tick(uv_timer_t *h)
{
    wd_server *s = h->data;

    if (s->stopping) {
        wd_server_maybe_finish(s); /* (it may close this timer) */
        return;
    }
    wd_jobs_progress(s);
    wd_models_tick(s);
    wd_sleep_tick(s);
    wd_leases_tick(s);
    conns_tick(s);
    wd_systemd_watchdog(s);
}

/* Every cuda segment keeps a descriptor (its exported handle) and attach
 * passes duplicates on: take the hard limit of descriptors, not the soft
 * 1024 a process starts with (libuv uses epoll, not select). */
static void raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            wd_log(WD_LOG_warning, "cannot raise the descriptor limit to %llu: %s", (unsigned long long)rl.rlim_max,
                   strerror(errno));
    }
}

int wd_server_start(wd_server *s, uv_loop_t *loop, wd_config *conf, wd_error *err)
{
    wa_backend_opts bopts = {0};
    wa_device_info info;
    char size[32];
    int rc;

    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->conf = conf;
    s->listen_fd = -1;
    s->signal_fd = -1;
    s->started = wd_now();
    raise_fd_limit();
    wd_log_set_peer_rate((unsigned)conf->log_rate);
    if ((rc = wd_auth_init(&s->auth, conf, err)))
        return rc;
    bopts.name = conf->backend;
    bopts.n_devices = (int)conf->host_devices;
    bopts.capacity = strncmp(conf->backend, "cuda", 4) == 0 ? conf->device_capacity : conf->host_capacity;
    bopts.devices = conf->devices;
    if ((rc = wa_backend_create(&bopts, &s->backend, err)))
        return rc;
    if ((rc = wa_create(s->backend, conf->alloc_conf, &s->alloc, err)))
        goto fail;
    /* Check the load policy now rather than at the first load. weightd's
     * own needs expandable segments; where the backend has none and nobody
     * asked for it by name, vLLM's policy stands in (conf keeps what was
     * configured, which a reload compares with the file). */
    s->load_policy = conf->load_alloc_conf;
    if ((rc = wa_policy_push(s->alloc, s->load_policy, err)) == -ENOTSUP &&
        strcmp(s->load_policy, WA_WEIGHTD_POLICY) == 0) {
        wd_log(WD_LOG_notice, "the %s backend has no expandable segments: load policy %s", s->backend->name,
               WA_FALLBACK_POLICY);
        s->load_policy = WA_FALLBACK_POLICY;
        rc = wa_policy_push(s->alloc, s->load_policy, err);
    }
    if (rc) {
        wd_error_prefix(err, "--load-alloc-conf");
        goto fail;
    }
    wa_policy_pop(s->alloc);
    {
        wl_pipeline_opts po = {.threads = (unsigned)conf->read_threads, .staging = conf->staging_memory,
                               .direct = conf->direct_io ? WL_DIRECT_ON : WL_DIRECT_OFF};
        if ((rc = wl_pipeline_create(s->backend, &po, &s->pipeline, err)))
            goto fail;
    }
    {
        sigset_t set;
        daemon_signals(&set);
        if ((s->signal_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
            rc = wd_error_set(err, -errno, "signalfd: %s", strerror(errno));
            goto fail;
        }
    }
    if ((rc = open_listener(s, err)))
        goto fail;
    uv_poll_init(loop, &s->listen_poll, s->listen_fd);
    s->listen_poll.data = s;
    uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
    uv_poll_init(loop, &s->signal_poll, s->signal_fd);
    s->signal_poll.data = s;
    uv_poll_start(&s->signal_poll, UV_READABLE, on_signal);
    uv_idle_init(loop, &s->alloc_idle);
    s->alloc_idle.data = s;
    uv_idle_init(loop, &s->reaper);
    s->reaper.data = s;
    uv_timer_init(loop, &s->accept_retry);
    s->accept_retry.data = s;
    uv_timer_init(loop, &s->tick);
    s->tick.data = s;
    uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
    /* What an earlier daemon left in systemd's fd store is served again
     * before the first client is: its models, without their checkpoints. */
    wd_fdstore_restore(s);

    for (int i = 0; i < s->backend->n_devices; i++) {
        s->backend->describe(s->backend, i, &info);
        wd_log(WD_LOG_info, "device %d: %s, capacity %s", i, info.name,
               wd_size_format(info.capacity, size, sizeof size));
    }
    wd_log(WD_LOG_notice, "weightd %s listening on %s (backend %s, %d device%s, load policy %s, %u reader%s "
           "with %s chunks)", WD_VERSION, s->socket_path, s->backend->name, s->backend->n_devices,
           s->backend->n_devices == 1 ? "" : "s", s->load_policy, wl_pipeline_threads(s->pipeline),
           wl_pipeline_threads(s->pipeline) == 1 ? "" : "s", wd_size_format(wl_pipeline_chunk(s->pipeline), size, sizeof size));
    if (wd_fault_armed())
        wd_log(WD_LOG_warning, "test fault injection armed: WEIGHTD_FAULTS=%s", wd_fault_armed());
    wd_fault_serving();
    wd_systemd_ready(s);
    return 0;
fail:
    if (s->signal_fd >= 0)
        close(s->signal_fd);
    release_devices(s);
    wd_auth_free(&s->auth);
    return rc;
}

void wd_server_stop(wd_server *s, const char *why)
{
    if (s->stopping)
        return;
    s->stopping = true;
    s->stop_started = s->stop_progress = wd_now();
    s->stop_queued = SIZE_MAX;
    wd_log(WD_LOG_notice, "stopping (%s)", why);
    wd_systemd_stopping(s);
    uv_poll_stop(&s->listen_poll);
    uv_timer_stop(&s->accept_retry);
    if (s->own_socket)
        unlink(s->socket_path);
    wd_jobs_cancel_all(s);
    /* Workers hear it first: their mappings outlive the daemon on cuda and
     * host, not on cuda-ipc. Under the fd store they are not told: their
     * leases wait in it for the next daemon, which they reconnect to. */
    for (wd_model *m = s->models; m; m = m->next)
        if (!s->fdstore.on)
            wd_leases_revoke(s, m, "shutdown");
    /* Clients get what is already queued for them, then the connection closes. */
    for (wd_conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        c->closing = true;
        conn_flush(c);
    }
    wd_server_maybe_finish(s);
}

static void on_handle_closed(uv_handle_t *h)
{
    (void)h;
}

/* A stop lets the clients take what is queued for them (the stop's own
 * reply too) while they take it: it waits until 2 s pass without progress,
 * 60 s at most, then closes what is left. */
#define STOP_DRAIN_IDLE 2.0
#define STOP_DRAIN_MAX 60.0

static bool conns_draining(wd_server *s)
{
    double now = wd_now();
    size_t queued = 0;

    for (wd_conn *c = s->conns; c; c = c->next)
        if (!c->dead && !c->broken)
            queued += c->wr.queued;
    if (!queued)
        return false;
    if (queued < s->stop_queued) {
        s->stop_queued = queued;
        s->stop_progress = now;
    }
    return now - s->stop_progress < STOP_DRAIN_IDLE && now - s->stop_started < STOP_DRAIN_MAX;
}

void wd_server_maybe_finish(wd_server *s)
{
    if (!s->stopping || s->jobs_running || s->jobs || !s->alloc || conns_draining(s))
        return;
    /* Connections first: their leases end before the models go. */
    while (s->conns)
        conn_close(s->conns, NULL);
    /* Leases back from the fd store whose workers never came: no
     * connection ended them. (Under the store they stay in it.) */
    for (wd_model *m = s->models; m; m = m->next)
        wd_leases_end_orphans(s, m, "the daemon stopped");
    while (s->models)
        wd_registry_remove(s, s->models, false);
    release_devices(s);
    uv_close((uv_handle_t *)&s->listen_poll, on_handle_closed);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    s->listen_fd = -1;
    uv_close((uv_handle_t *)&s->signal_poll, on_handle_closed);
    close(s->signal_fd);
    uv_close((uv_handle_t *)&s->tick, on_handle_closed);
    uv_close((uv_handle_t *)&s->alloc_idle, on_handle_closed);
    uv_close((uv_handle_t *)&s->reaper, on_handle_closed);
    uv_close((uv_handle_t *)&s->accept_retry, on_handle_closed);
    wd_auth_free(&s->auth);
    wd_log(WD_LOG_notice, "stopped: every segment released");
}
