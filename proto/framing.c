/* Line framing with descriptor passing over a stream socket. */
#include "proto/proto.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_CHUNK (64u * 1024u)

struct wp_chunk {
    wp_chunk *next;
    size_t len, off;
    size_t n_fds;
    int *fds;            /* n_fds of them, after data */
    char data[];
};

/* ---- reader -------------------------------------------------------------- */

void wp_reader_init(wp_reader *r)
{
    memset(r, 0, sizeof *r);
}

void wp_reader_drop_fds(wp_reader *r)
{
    for (size_t i = 0; i < r->n_fds; i++)
        close(r->fds[i]);
    r->n_fds = 0;
}

/* Closes the descriptors that came before stream offset line_start. */
static void drop_stale_fds(wp_reader *r, uint64_t line_start)
{
    size_t kept = 0;

    for (size_t i = 0; i < r->n_fds; i++) {
        if (r->fd_until[i] <= line_start) {
            close(r->fds[i]);
        } else {
            r->fds[kept] = r->fds[i];
            r->fd_until[kept++] = r->fd_until[i];
        }
    }
    r->n_fds = kept;
}

void wp_reader_free(wp_reader *r)
{
    wp_reader_drop_fds(r);
    free(r->buf);
    memset(r, 0, sizeof *r);
}

static int reader_room(wp_reader *r)
{
    if (r->consumed) {
        memmove(r->buf, r->buf + r->consumed, r->len - r->consumed);
        r->len -= r->consumed;
        r->base += r->consumed;
        r->consumed = 0;
    }
    if (r->cap - r->len < READ_CHUNK) {
        size_t cap = r->cap ? r->cap * 2 : 2 * READ_CHUNK;
        char *buf;
        if (cap > WP_MAX_LINE + 2 * READ_CHUNK)
            cap = WP_MAX_LINE + 2 * READ_CHUNK;
        if (cap <= r->cap)
            return r->cap > r->len ? 0 : -EMSGSIZE;
        if (!(buf = realloc(r->buf, cap)))
            return -ENOMEM;
        r->buf = buf;
        r->cap = cap;
    }
    return 0;
}

int wp_reader_fill(wp_reader *r, int sock)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * WP_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov;
    struct msghdr msg = {0};
    ssize_t n;
    int rc = 0;

    if ((rc = reader_room(r)))
        return rc;
    iov.iov_base = r->buf + r->len;
    iov.iov_len = r->cap - r->len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int fds[WP_MAX_FDS];
        memcpy(fds, CMSG_DATA(c), count * sizeof(int));
        for (size_t i = 0; i < count; i++) {
            if (r->n_fds < sizeof r->fds / sizeof r->fds[0]) {
                r->fd_until[r->n_fds] = r->base + r->len + (size_t)n;
                r->fds[r->n_fds++] = fds[i];
            } else {
                close(fds[i]);
                rc = -EMSGSIZE;
            }
        }
    }
    if (msg.msg_flags & MSG_CTRUNC)
        rc = -EMSGSIZE;
    r->len += (size_t)n;
    return rc ? rc : (int)n; /* n is at most the buffer's room, a few MiB */
}

int wp_reader_next(wp_reader *r, char **line, size_t *len)
{
    size_t avail = r->len - r->consumed;
    char *start, *nl;

    drop_stale_fds(r, r->base + r->consumed);
    if (!avail)
        return 0; /* before the first read, buf is NULL */
    start = r->buf + r->consumed;
    nl = memchr(start, '\n', avail);
    if (!nl)
        return avail >= WP_MAX_LINE ? -EMSGSIZE : 0;
    if ((size_t)(nl - start) + 1 > WP_MAX_LINE)
        return -EMSGSIZE;
    *nl = '\0';
    *line = start;
    *len = (size_t)(nl - start);
    r->consumed += *len + 1;
    return 1;
}

size_t wp_reader_take_fds(wp_reader *r, int *fds, size_t max)
{
    size_t n = r->n_fds < max ? r->n_fds : max;

    memcpy(fds, r->fds, n * sizeof *fds);
    memmove(r->fds, r->fds + n, (r->n_fds - n) * sizeof *fds);
    memmove(r->fd_until, r->fd_until + n, (r->n_fds - n) * sizeof *r->fd_until);
    r->n_fds -= n;
    return n;
}

/* ---- writer -------------------------------------------------------------- */

void wp_writer_init(wp_writer *w)
{
    memset(w, 0, sizeof *w);
}

static void chunk_free(wp_chunk *c)
{
    for (size_t i = 0; i < c->n_fds; i++)
        close(c->fds[i]);
    free(c);
}

void wp_writer_free(wp_writer *w)
{
    while (w->head) {
        wp_chunk *next = w->head->next;
        chunk_free(w->head);
        w->head = next;
    }
    memset(w, 0, sizeof *w);
}

int wp_writer_push(wp_writer *w, const char *data, size_t len, const int *fds, size_t n)
{
    wp_chunk *c;

    if (n > WP_MAX_FDS || len == 0)
        return -EINVAL;
    /* The descriptors after the bytes, aligned for int. */
    size_t at = (len + sizeof(int) - 1) / sizeof(int) * sizeof(int);
    if (!(c = malloc(sizeof *c + at + n * sizeof(int))))
        return -ENOMEM;
    c->next = NULL;
    c->len = len;
    c->off = 0;
    c->n_fds = 0;
    c->fds = (int *)(void *)(c->data + at);
    memcpy(c->data, data, len);
    for (size_t i = 0; i < n; i++) {
        int fd = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
        if (fd < 0) {
            int rc = -errno;
            chunk_free(c);
            return rc;
        }
        c->fds[c->n_fds++] = fd;
    }
    if (w->tail)
        w->tail->next = c;
    else
        w->head = c;
    w->tail = c;
    w->queued += len;
    w->queued_fds += c->n_fds;
    return 0;
}

int wp_writer_flush(wp_writer *w, int sock)
{
    while (w->head) {
        wp_chunk *c = w->head;
        union {
            char buf[CMSG_SPACE(sizeof(int) * WP_MAX_FDS)];
            struct cmsghdr align;
        } control;
        struct iovec iov = {c->data + c->off, c->len - c->off};
        struct msghdr msg = {0};
        ssize_t n;

        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (c->n_fds && c->off == 0) {
            struct cmsghdr *cm;
            memset(&control, 0, sizeof control);
            msg.msg_control = control.buf;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * c->n_fds);
            cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * c->n_fds);
            memcpy(CMSG_DATA(cm), c->fds, sizeof(int) * c->n_fds);
        }
        do
            n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        if (c->n_fds && c->off == 0) {
            /* The kernel holds its own references now. */
            for (size_t i = 0; i < c->n_fds; i++)
                close(c->fds[i]);
            w->queued_fds -= c->n_fds;
            c->n_fds = 0;
        }
        c->off += (size_t)n;
        w->queued -= (size_t)n;
        if (c->off == c->len) {
            w->head = c->next;
            if (!w->head)
                w->tail = NULL;
            free(c);
        }
    }
    return 0;
}
