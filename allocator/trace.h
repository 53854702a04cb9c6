/* Allocation traces (shared/traces/README.md, format v1) and their replay
 * through the allocator on the fake backend. */
#ifndef WA_TRACE_H
#define WA_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/errors.h"

typedef struct wa_trace wa_trace;

/* Parses a whole trace; errors name the line. */
int wa_trace_parse(const char *text, size_t len, const char *name, wa_trace **out, wd_error *err);
int wa_trace_load(const char *path, wa_trace **out, wd_error *err);
void wa_trace_free(wa_trace *t);
size_t wa_trace_ops(const wa_trace *t);
int wa_trace_devices(const wa_trace *t);
/* The largest sum of requested bytes alive at once: the floor for any allocator. */
uint64_t wa_trace_peak_live(const wa_trace *t);

typedef struct wa_replay_opts {
    uint64_t capacity;   /* per device; 0 = unlimited */
    const char *conf;    /* starting configuration; NULL = default */
    /* NULL: each "policy CONF" line is applied literally, with PyTorch's
     * semantics (parseArgs). Otherwise each "policy CONF" line starts this
     * load policy instead (on top of the starting configuration), and
     * "policy default" ends it: weightd-replay --policy weightd. */
    const char *load_policy;
    bool check;          /* run wa_check after every operation (slow) */
} wa_replay_opts;

typedef struct wa_replay_mark {
    char label[64];
    uint64_t allocated, reserved, inactive_split, largest_free;
} wa_replay_mark;

typedef struct wa_replay_result {
    bool ok;
    size_t oom_line;           /* the alloc that failed, when !ok */
    char oom_message[768];
    uint64_t peak_live, peak_allocated, peak_reserved;
    size_t n_marks;
    wa_replay_mark *marks;
    uint64_t ops;
    double seconds;
} wa_replay_result;

/* Replays t; an out-of-memory stops the replay (r->ok = false) but is not an
 * error. Errors: a bad policy line, a backend failure, a failed check. */
int wa_trace_replay(const wa_trace *t, const wa_replay_opts *opts, wa_replay_result *r, wd_error *err);
void wa_replay_result_free(wa_replay_result *r);

/* The smallest capacity, in `step`-byte steps, at which the trace completes:
 * a binary search between the peak of live bytes and the uncapped peak
 * reserved (completion is assumed to be monotonic in the capacity). */
int wa_trace_min_capacity(const wa_trace *t, const wa_replay_opts *opts, uint64_t step, uint64_t *out,
                          wd_error *err);

#endif
