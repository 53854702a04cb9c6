/* weightd-replay: replay an allocation trace through the allocator on the
 * fake backend and print its figures. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "allocator/allocator.h"
#include "allocator/trace.h"
#include "common/size.h"

#define MIN_CAPACITY_STEP (64ULL << 20)

static void usage(FILE *f)
{
    fprintf(f,
            "usage: weightd-replay TRACE [--capacity SIZE] [--conf CONF] [--policy pytorch|weightd]\n"
            "                      [--load-policy CONF] [--min-capacity] [--check] [--json]\n"
            "\n"
            "Replays an allocation trace (alloc/free/policy/mark lines) through weightd's\n"
            "allocator on the fake backend (2 MiB granularity, as CUDA).\n"
            "\n"
            "  --capacity SIZE   device capacity (default: unlimited); K/M/G/T, KiB/MiB/GiB/TiB\n"
            "  --conf CONF       starting allocator configuration (PYTORCH_CUDA_ALLOC_CONF syntax)\n"
            "  --policy pytorch  apply the trace's policy lines literally, as PyTorch would (default)\n"
            "  --policy weightd  each policy line that sets a configuration starts weightd's load\n"
            "                    policy (" WA_WEIGHTD_POLICY ")\n"
            "                    and \"policy default\" ends it\n"
            "  --load-policy CONF  as --policy weightd, with CONF as the load policy\n"
            "  --min-capacity    also search the smallest capacity, in 64 MiB steps, that completes\n"
            "  --check           check the allocator's invariants after every operation (slow)\n"
            "  --json            print one JSON object\n");
}

static void print_text(const char *path, const wa_replay_result *r, size_t ops, bool have_min, uint64_t min_cap)
{
    char a[32], b[32], c[32], d[32];

    printf("trace:          %s (%zu operations)\n", path, ops);
    if (r->ok)
        printf("result:         completed\n");
    else
        printf("result:         out of memory at line %zu: %s\n", r->oom_line, r->oom_message);
    printf("peak live:      %llu B (%s)\n", (unsigned long long)r->peak_live, wd_size_format(r->peak_live, a, sizeof a));
    printf("peak allocated: %llu B (%s)\n", (unsigned long long)r->peak_allocated,
           wd_size_format(r->peak_allocated, a, sizeof a));
    printf("peak reserved:  %llu B (%s)\n", (unsigned long long)r->peak_reserved,
           wd_size_format(r->peak_reserved, a, sizeof a));
    for (size_t i = 0; i < r->n_marks; i++) {
        const wa_replay_mark *m = &r->marks[i];
        printf("mark %-20s allocated %s, reserved %s, inactive split %s, largest free %s\n", m->label,
               wd_size_format(m->allocated, a, sizeof a), wd_size_format(m->reserved, b, sizeof b),
               wd_size_format(m->inactive_split, c, sizeof c), wd_size_format(m->largest_free, d, sizeof d));
    }
    if (have_min)
        printf("min capacity:   %llu B (%s), %.4f x peak live\n", (unsigned long long)min_cap,
               wd_size_format(min_cap, a, sizeof a), r->peak_live ? (double)min_cap / (double)r->peak_live : 0.0);
    printf("replay time:    %.3f s (%.2f M operations/s)\n", r->seconds,
           r->seconds > 0 ? (double)r->ops / r->seconds / 1e6 : 0.0);
}

static int print_json(const char *path, const char *load_policy, const wa_replay_result *r, size_t ops, bool have_min,
                      uint64_t min_cap)
{
    cJSON *o = cJSON_CreateObject(), *marks;
    char *text;

    if (!o)
        return -1;
    cJSON_AddStringToObject(o, "trace", path);
    cJSON_AddStringToObject(o, "policy", load_policy ? load_policy : "pytorch");
    cJSON_AddBoolToObject(o, "ok", r->ok);
    cJSON_AddNumberToObject(o, "operations", (double)ops);
    cJSON_AddNumberToObject(o, "peak_live", (double)r->peak_live);
    cJSON_AddNumberToObject(o, "peak_allocated", (double)r->peak_allocated);
    cJSON_AddNumberToObject(o, "peak_reserved", (double)r->peak_reserved);
    if (!r->ok) {
        cJSON_AddNumberToObject(o, "oom_line", (double)r->oom_line);
        cJSON_AddStringToObject(o, "oom_message", r->oom_message);
    }
    marks = cJSON_AddArrayToObject(o, "marks");
    for (size_t i = 0; i < r->n_marks; i++) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "label", r->marks[i].label);
        cJSON_AddNumberToObject(m, "allocated", (double)r->marks[i].allocated);
        cJSON_AddNumberToObject(m, "reserved", (double)r->marks[i].reserved);
        cJSON_AddNumberToObject(m, "inactive_split", (double)r->marks[i].inactive_split);
        cJSON_AddNumberToObject(m, "largest_free", (double)r->marks[i].largest_free);
        cJSON_AddItemToArray(marks, m);
    }
    if (have_min)
        cJSON_AddNumberToObject(o, "min_capacity", (double)min_cap);
    cJSON_AddNumberToObject(o, "seconds", r->seconds);
    text = cJSON_PrintUnformatted(o);
    if (text)
        puts(text);
    free(text);
    cJSON_Delete(o);
    return text ? 0 : -1;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"capacity", required_argument, NULL, 'c'}, {"conf", required_argument, NULL, 'C'},
        {"min-capacity", no_argument, NULL, 'm'},   {"check", no_argument, NULL, 'k'},
        {"json", no_argument, NULL, 'j'},           {"help", no_argument, NULL, 'h'},
        {"policy", required_argument, NULL, 'p'},   {"load-policy", required_argument, NULL, 'L'},
        {NULL, 0, NULL, 0},
    };
    wa_replay_opts opts = {0};
    wa_replay_result r;
    wa_trace *trace = NULL;
    wd_error err = {0};
    bool json = false, want_min = false;
    uint64_t min_cap = 0;
    int c, rc;

    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            if (wd_size_parse(optarg, &opts.capacity) || opts.capacity == 0) {
                fprintf(stderr, "weightd-replay: --capacity: bad size \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'C': opts.conf = optarg; break;
        case 'p':
            if (strcmp(optarg, "weightd") == 0) {
                opts.load_policy = WA_WEIGHTD_POLICY;
            } else if (strcmp(optarg, "pytorch") != 0) {
                fprintf(stderr, "weightd-replay: --policy: \"%s\" is neither pytorch nor weightd\n", optarg);
                return 2;
            }
            break;
        case 'L': opts.load_policy = optarg; break;
        case 'm': want_min = true; break;
        case 'k': opts.check = true; break;
        case 'j': json = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 2;
    }
    if ((rc = wa_trace_load(argv[optind], &trace, &err)))
        goto fail;
    if ((rc = wa_trace_replay(trace, &opts, &r, &err)))
        goto fail;
    if (want_min && (rc = wa_trace_min_capacity(trace, &opts, MIN_CAPACITY_STEP, &min_cap, &err))) {
        wa_replay_result_free(&r);
        goto fail;
    }
    if (json)
        rc = print_json(argv[optind], opts.load_policy, &r, wa_trace_ops(trace), want_min, min_cap);
    else
        print_text(argv[optind], &r, wa_trace_ops(trace), want_min, min_cap);
    wa_replay_result_free(&r);
    wa_trace_free(trace);
    return rc ? 1 : (r.ok ? 0 : 3);
fail:
    fprintf(stderr, "weightd-replay: %s\n", wd_error_text(&err));
    wa_trace_free(trace);
    return 1;
}
