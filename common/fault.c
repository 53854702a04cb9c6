#include "common/fault.h"

#ifndef WD_RELEASE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
static pthread_once_t once = PTHREAD_ONCE_INIT;
static const char *armed;

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

const char *wd_fault_armed(void)
{
    pthread_once(&once, parse);
    return armed;
}
#endif
