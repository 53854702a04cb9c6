#include "common/fault.h"

#ifndef WD_RELEASE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

static const char *const names[] = {
#define X(name) #name,
    WD_FAULT_POINTS(X)
#undef X
};

static struct {
    unsigned long at;  /* the pass that fails; 0: none */
    bool onward;       /* and every one after it */
    _Atomic unsigned long passes;
} points[WD_FAULT_COUNT];

/* The allocation sites reached since the daemon serves, with their passes:
 * looked up by name under a lock, only while alloc faults are armed. */
#define MAX_SITES 1024
#define LIST_PASSES 4 /* passes listed a site: a loop's first few, or as many allocations on one line */
static struct {
    bool armed, list;
    char file[128];
    int line;
    unsigned long at;
    atomic_bool serving;
    pthread_mutex_t lock;
    size_t n;
    struct {
        const char *file;
        int line;
        unsigned long passes;
    } seen[MAX_SITES];
} sites = {.lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const char *armed;

/* "FILE:LINE[@N]" or "list". A test that names a site it did not mean
 * would pass having tried nothing: what does not parse stops the process. */
static void parse_site(const char *w)
{
    const char *colon = strrchr(w, ':');
    char *end = NULL;

    if (strcmp(w, "list") == 0) {
        sites.armed = sites.list = true;
        return;
    }
    if (colon && colon > w && (size_t)(colon - w) < sizeof sites.file) {
        memcpy(sites.file, w, (size_t)(colon - w));
        sites.file[colon - w] = '\0';
        sites.line = (int)strtol(colon + 1, &end, 10);
        sites.at = 1;
        if (*end == '@')
            sites.at = strtoul(end + 1, &end, 10);
    }
    if (!end || *end || sites.line <= 0 || sites.at == 0 || sites.armed) {
        fprintf(stderr, "weightd: WEIGHTD_FAULTS: \"alloc:%s\" is not alloc:list or alloc:FILE:LINE[@N] (N from 1; "
                        "one alloc entry)\n", w);
        exit(2);
    }
    sites.armed = true;
}

static void parse(void)
{
    const char *env = getenv("WEIGHTD_FAULTS");
    char *copy, *save = NULL;

    if (!env || !*env || !(copy = strdup(env)))
        return;
    for (char *w = strtok_r(copy, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(w, ':'), *end;
        if (!colon)
            continue;
        *colon = '\0';
        if (strcmp(w, "alloc") == 0) {
            parse_site(colon + 1);
            armed = sites.armed ? env : armed;
        }
        for (int p = 0; p < WD_FAULT_COUNT; p++)
            if (strcmp(w, names[p]) == 0) {
                points[p].at = strtoul(colon + 1, &end, 10);
                points[p].onward = *end == '+';
                armed = env;
            }
    }
    free(copy);
}

bool wd_fault(wd_fault_point p)
{
    unsigned long n;

    pthread_once(&once, parse);
    if (!points[p].at)
        return false;
    n = atomic_fetch_add(&points[p].passes, 1) + 1;
    if (n != points[p].at && !(points[p].onward && n > points[p].at))
        return false;
    /* straight to stderr (the daemon's log): tests look for it */
    fprintf(stderr, "weightd: injected fault: %s, pass %lu\n", names[p], n);
    return true;
}

bool wd_fault__site(const char *file, int line)
{
    unsigned long n = 0;
    bool fire;
    size_t i;

    pthread_once(&once, parse);
    if (!sites.armed || !atomic_load_explicit(&sites.serving, memory_order_relaxed))
        return false;
    pthread_mutex_lock(&sites.lock);
    for (i = 0; i < sites.n; i++)
        if (sites.seen[i].line == line && strcmp(sites.seen[i].file, file) == 0)
            break;
    if (i == sites.n && i < MAX_SITES)
        sites.seen[sites.n++] = (typeof(sites.seen[0])){.file = file, .line = line};
    if (i < MAX_SITES)
        n = ++sites.seen[i].passes;
    pthread_mutex_unlock(&sites.lock);
    if (sites.list) {
        if (n && n <= LIST_PASSES)
            fprintf(stderr, "weightd: fault site: alloc %s:%d, pass %lu\n", file, line, n);
        return false;
    }
    fire = n == sites.at && line == sites.line && strcmp(file, sites.file) == 0;
    if (fire)
        fprintf(stderr, "weightd: injected fault: alloc %s:%d, pass %lu\n", file, line, n);
    return fire;
}

const char *wd_fault_armed(void)
{
    pthread_once(&once, parse);
    return armed;
}

void wd_fault_serving(void)
{
    atomic_store(&sites.serving, true);
}
#endif
