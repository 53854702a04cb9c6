/* fuzz_attach: libFuzzer harness for the worker's side of attach
 * (client/attach.c, over client/client.c): what a daemon, or whatever holds
 * the socket's other end, can send a worker that attaches.
 *
 * The input's first byte says how many memfds (its low 3 bits, 0 to 7) of
 * 64 KiB travel as SCM_RIGHTS with the first of the rest, which is the byte
 * stream the peer sends after the worker's attach request (whose id is 1);
 * the peer's end is then shut. wdc_attach runs to the end of it.
 *
 * Checks: wdc_attach returns 0 or a negative errno with a one-line message;
 * on success every tensor's parts lie inside its handles and read back
 * (wdc_read, every byte: a part past what is mapped would fault), and the
 * counts agree; after wdc_detach (or the failure) and wdc_close, the process
 * holds exactly the descriptors it held before. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client/internal.h"
#include "tests/fuzz/fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int fd_count(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;

    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* The peer: the stream, with n memfds on its first byte. */
static void send_stream(int sock, const uint8_t *data, size_t size, int n)
{
    int fds[8];
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {(void *)data, size};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};

    for (int i = 0; i < n; i++) {
        fds[i] = memfd_create("fuzz", MFD_CLOEXEC);
        FZ_CHECK(fds[i] >= 0 && ftruncate(fds[i], 64 << 10) == 0, "memfd");
    }
    if (n) {
        struct cmsghdr *cm;
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
        cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n);
    }
    if (size || n) {
        char nothing = '\n';
        if (!size) { /* descriptors need a byte to ride on */
            iov.iov_base = &nothing;
            iov.iov_len = 1;
        }
        FZ_CHECK(sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)iov.iov_len, "the stream must fit the socket");
    }
    for (int i = 0; i < n; i++)
        close(fds[i]);
    shutdown(sock, SHUT_WR);
}

static void check_attachment(const wdc_attachment *a)
{
    char buf[4096];

    for (size_t i = 0; i < wdc_attachment_tensor_count(a); i++) {
        const wdc_tensor *t = wdc_attachment_tensor(a, i);
        FZ_CHECK(t && t->name && t->dtype, "tensor %zu", i);
        FZ_CHECK(wdc_attachment_find(a, t->name) != NULL, "find(%s)", t->name);
        for (size_t k = 0; k < t->n_parts; k++) {
            const wdc_part *p = &t->parts[k];
            const wdc_handle *h = wdc_attachment_handle(a, p->handle);
            FZ_CHECK(h && (char *)p->ptr >= (char *)h->ptr && p->bytes <= h->bytes &&
                         (uint64_t)((char *)p->ptr - (char *)h->ptr) <= h->bytes - p->bytes,
                     "a part of %s lies outside its handle", t->name);
            FZ_CHECK(p->tensor_offset <= t->bytes && p->bytes <= t->bytes - p->tensor_offset,
                     "a part of %s lies outside the tensor", t->name);
            for (uint64_t off = 0; off < p->bytes; off += sizeof buf) {
                size_t n = p->bytes - off < sizeof buf ? (size_t)(p->bytes - off) : sizeof buf;
                FZ_CHECK(wdc_read(a, p, off, buf, n) == 0, "wdc_read of %s", t->name);
            }
            FZ_CHECK(wdc_read(a, p, p->bytes, buf, 1) == -ERANGE, "wdc_read past a part");
        }
    }
    FZ_CHECK(wdc_attachment_info(a) != NULL, "no info");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2], before = fd_count(), rc;
    wdc_client *c;
    wdc_attachment *a = NULL;

    if (size < 1 || size > (96u << 10))
        return 0;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return 0;
    send_stream(sv[1], data + 1, size - 1, data[0] & 7);
    c = wdc_new();
    FZ_CHECK(c != NULL, "wdc_new");
    c->fd = sv[0]; /* as wdc_connect leaves it, hello done */
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    rc = wdc_attach(c, "m", NULL, 0, 1000, &a);
    if (rc == 0) {
        FZ_CHECK(a != NULL, "success without an attachment");
        check_attachment(a);
        wdc_detach(c, a, 1000); /* the peer may even answer it */
    } else {
        FZ_CHECK(rc < 0 && a == NULL, "wdc_attach: rc %d", rc);
        fz_check_msg(wdc_error_message(c), 1024);
        FZ_CHECK(wdc_error_code(c)[0] == 'E', "no error code for %d", rc);
    }
    wdc_close(c); /* closes sv[0] when the attach left it open */
    close(sv[1]);
    FZ_CHECK(fd_count() == before, "descriptors leaked: %d before, %d after", before, fd_count());
    return 0;
}
