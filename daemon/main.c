/* weightd: the daemon's entry point. */
#include "daemon/daemon.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

/* Every segment is a file descriptor (host and cuda backends): take all the
 * descriptors the hard limit allows. */
static void raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            wd_log(WD_LOG_warning, "cannot raise the descriptor limit: %s", strerror(errno));
    }
}

int main(int argc, char **argv)
{
    wd_config conf;
    wd_server srv;
    wd_error err = {0};
    uv_loop_t loop;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    wd_block_signals();
    rc = wd_config_load(&conf, argc, argv, stdout, &err);
    if (rc == 1) /* --help, --version or --print-config: what was written must be there */
        return fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1;
    if (rc < 0) {
        fprintf(stderr, "weightd: %s\n", wd_error_text(&err));
        return 2;
    }
    wd_log_set_level(conf.log_level);
    raise_fd_limit();
    if ((rc = uv_loop_init(&loop))) {
        fprintf(stderr, "weightd: uv_loop_init: %s\n", uv_strerror(rc));
        wd_config_free(&conf);
        return 1;
    }
    if ((rc = wd_server_start(&srv, &loop, &conf, &err))) {
        wd_log(WD_LOG_error, "%s", wd_error_text(&err));
        uv_loop_close(&loop);
        wd_config_free(&conf);
        return 1;
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    /* Every handle must be closed by now: anything else is a leak. */
    if ((rc = uv_loop_close(&loop))) {
        wd_log(WD_LOG_error, "handles still open at exit: %s", uv_strerror(rc));
        srv.exit_code = 1;
    }
    wd_config_free(&conf);
    return srv.exit_code;
}
