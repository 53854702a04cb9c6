/* Every exchange with systemd: the sockets and stored descriptors it
 * passes (LISTEN_FDS), and what the daemon tells it (sd_notify: READY,
 * STATUS, the watchdog, RELOADING, STOPPING). Outside systemd each call
 * does nothing. */
#include "daemon/daemon.h"

#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include "common/size.h"

int wd_systemd_listen(wd_server *s, wd_error *err)
{
    struct sockaddr_un addr;
    socklen_t len = sizeof addr;
    int n = sd_listen_fds(1);

    s->listen_fd = -1;
    if (n < 0)
        return wd_error_set(err, n, "LISTEN_FDS: %s", strerror(-n));
    if (n == 0)
        return 0;
    if (n > 1)
        return wd_error_set(err, -EINVAL, "systemd passed %d sockets; weightd takes one", n);
    if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
        return wd_error_set(err, -EINVAL, "the socket systemd passed is not a listening Unix stream socket");
    s->listen_fd = SD_LISTEN_FDS_START;
    fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
    fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
    if (getsockname(s->listen_fd, (struct sockaddr *)&addr, &len) == 0)
        snprintf(s->socket_path, sizeof s->socket_path, "%s", addr.sun_path);
    return 0;
}

void wd_systemd_status(wd_server *s)
{
    char size[32];
    uint64_t bytes = 0;
    size_t n = 0;

    for (wd_model *m = s->models; m; m = m->next)
        if (m->state == WD_MODEL_READY) {
            n++;
            bytes += m->ckpt.total_bytes;
        }
    sd_notifyf(0, "STATUS=%zu model%s loaded (%s)%s, listening on %s", n, n == 1 ? "" : "s",
               wd_size_format(bytes, size, sizeof size), wd_jobs_load_active(s) ? ", loading" : "", s->socket_path);
}

void wd_systemd_ready(wd_server *s)
{
    if (sd_watchdog_enabled(0, &s->watchdog_usec) <= 0)
        s->watchdog_usec = 0;
    sd_notify(0, "READY=1");
    wd_systemd_status(s);
}

void wd_systemd_watchdog(wd_server *s)
{
    if (s->watchdog_usec && wd_now() - s->watchdog_last >= (double)s->watchdog_usec / 2e6) {
        sd_notify(0, "WATCHDOG=1");
        s->watchdog_last = wd_now();
    }
}

void wd_systemd_reloading(wd_server *s)
{
    (void)s;
    /* MONOTONIC_USEC: systemd 253's Type=notify-reload wants it; 252 ignores it. */
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)(wd_now() * 1e6));
}

void wd_systemd_reloaded(wd_server *s)
{
    sd_notify(0, "READY=1");
    wd_systemd_status(s);
}

void wd_systemd_stopping(wd_server *s)
{
    (void)s;
    sd_notify(0, "STOPPING=1");
}
