/* One logging entry point with levels. Under systemd (stderr is the journal)
 * lines carry sd-daemon priority prefixes; otherwise a timestamp. */
#include "daemon/daemon.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static wd_log_level log_threshold = WD_LOG_info;
static int log_to_journal = -1;

static const char *const level_names[] = {
#define X(name) #name,
    WD_LOG_LEVELS(X)
#undef X
};

/* syslog priorities: err, warning, notice, info, debug */
static const int level_priority[] = {3, 4, 5, 6, 7};

int wd_log_level_parse(const char *text, wd_log_level *out)
{
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++)
        if (strcmp(text, level_names[i]) == 0) {
            *out = (wd_log_level)i;
            return 0;
        }
    return -EINVAL;
}

const char *wd_log_level_name(wd_log_level level)
{
    return level_names[level];
}

void wd_log_set_level(wd_log_level level)
{
    log_threshold = level;
}

/* JOURNAL_STREAM is "dev:inode" of the journal's stream when stderr goes there. */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

static void log_line(wd_log_level level, const char *msg)
{
    if (log_to_journal < 0)
        log_to_journal = stderr_is_journal();
    if (log_to_journal) {
        fprintf(stderr, "<%d>%s\n", level_priority[level], msg);
    } else {
        struct timespec ts;
        struct tm tm;
        char when[32];
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
        fprintf(stderr, "%s.%03ldZ weightd[%d] %s: %s\n", when, ts.tv_nsec / 1000000, (int)getpid(),
                level_names[level], msg);
    }
    fflush(stderr);
}

void wd_log(wd_log_level level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    if (level > log_threshold)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_line(level, msg);
}

/* What peers can make the daemon say: at most peer_rate lines a second;
 * the rest are counted, and the count logged when lines flow again. */
static unsigned peer_rate = 10, peer_lines, peer_dropped;
static double peer_window;

void wd_log_set_peer_rate(unsigned per_second)
{
    peer_rate = per_second;
}

void wd_log_peer(wd_log_level level, const char *fmt, ...)
{
    char msg[1024];
    double now = wd_now();
    va_list ap;

    if (level > log_threshold)
        return;
    if (now - peer_window >= 1.0) {
        if (peer_dropped) {
            snprintf(msg, sizeof msg, "%u more messages about clients were not logged (log_rate %u a second)",
                     peer_dropped, peer_rate);
            log_line(WD_LOG_notice, msg);
        }
        peer_window = now;
        peer_lines = peer_dropped = 0;
    }
    if (peer_rate && peer_lines >= peer_rate) {
        peer_dropped++;
        return;
    }
    peer_lines++;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    wd_text_clean(msg); /* peers' words may be in it */
    log_line(level, msg);
}
