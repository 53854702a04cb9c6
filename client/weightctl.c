/* weightctl: the command line over libweightd-client. One table of commands;
 * each is a small function that sends one request and prints its result, as
 * text for people or, with --json, as one JSON object for programs. */
#include <ctype.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <fcntl.h>

#include <cjson/cJSON.h>

#include "client/weightd-client.h"
#include "common/errors.h"
#include "common/checksum.h"
#include "common/size.h"
#include "loader/checkpoint.h"
#include "loader/moe.h"
#include "loader/placement.h"

#define EXIT_FAILED 1
#define EXIT_USAGE 2

typedef struct ctl {
    const char *socket;
    bool json;
    int timeout_ms;
    wdc_client *client;
} ctl;

typedef struct command {
    const char *name;
    int (*run)(ctl *c, int argc, char **argv);
    const char *args;
    const char *help;
} command;

/* ---- output helpers ---------------------------------------------------------- */

static void print_json(const cJSON *o)
{
    char *text = cJSON_Print(o);

    if (text)
        puts(text);
    free(text);
}

/* Reports a failed call: text on stderr, or the error object with --json. */
static int report_error(ctl *c, const char *what, int rc, const char *message)
{
    if (c->json) {
        cJSON *o = cJSON_CreateObject(), *e;
        cJSON_AddBoolToObject(o, "ok", 0);
        e = cJSON_AddObjectToObject(o, "error");
        cJSON_AddStringToObject(e, "code", wd_errname(rc));
        cJSON_AddStringToObject(e, "message", message);
        print_json(o);
        cJSON_Delete(o);
    } else {
        fprintf(stderr, "weightctl: %s: %s\n", what, message);
    }
    return EXIT_FAILED;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;

    fputs("weightctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs(" (see weightctl --help)\n", stderr);
    return EXIT_USAGE;
}

static double num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : 0.0;
}

static const char *str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static const char *size_text(double bytes, char *buf, size_t len)
{
    return wd_size_format(bytes > 0 ? (uint64_t)bytes : 0, buf, len);
}

/* The words for the last failure of a call. */
static const char *last_error(const ctl *c)
{
    return c->client ? wdc_error_message(c->client) : "out of memory";
}

/* Connects on first use, so that a command's usage errors come before any
 * talk with the daemon. */
static int connect_once(ctl *c)
{
    if (c->client)
        return 0;
    if (!(c->client = wdc_new()))
        return -ENOMEM;
    return wdc_connect(c->client, c->socket, c->timeout_ms);
}

/* Sends one request; on success *out is the parsed result (cJSON_Delete it).
 * A load of load_path opens its files here and sends them (wdc_load). */
static int call_load(ctl *c, const char *op, cJSON *args, const char *load_path, int timeout_ms,
                     wdc_event_fn on_event, void *ctx, cJSON **out)
{
    char *args_text, *result = NULL;
    int rc;

    if ((rc = connect_once(c)))
        return rc;
    args_text = args ? cJSON_PrintUnformatted(args) : NULL;
    if (load_path)
        rc = wdc_load(c->client, load_path, args_text, timeout_ms, on_event, ctx, &result);
    else
        rc = wdc_call(c->client, op, args_text, timeout_ms, on_event, ctx, &result);
    free(args_text);
    if (rc)
        return rc;
    *out = cJSON_Parse(result ? result : "null");
    free(result);
    return *out ? 0 : -EPROTO;
}

static int call(ctl *c, const char *op, cJSON *args, int timeout_ms, wdc_event_fn on_event, void *ctx,
                cJSON **out)
{
    return call_load(c, op, args, NULL, timeout_ms, on_event, ctx, out);
}

/* Parses "--flag VALUE" pairs after a command's positional argument. */
static const char *flag_value(int argc, char **argv, int *i, const char *flag)
{
    size_t n = strlen(flag);

    if (strncmp(argv[*i], flag, n) == 0 && argv[*i][n] == '=')
        return argv[*i] + n + 1;
    if (strcmp(argv[*i], flag) == 0 && *i + 1 < argc)
        return argv[++*i];
    return NULL;
}

/* Calls op page after page (each reply's "next" is the next call's
 * "offset") and gathers the list `key` of every page into the first reply,
 * which *out gets without "next" and "offset". Consumes args. */
static int call_paged(ctl *c, const char *op, cJSON *args, const char *key, cJSON **out)
{
    cJSON *all = NULL, *list = NULL;
    double offset = 0;
    int rc;

    for (;;) {
        cJSON *res, *page, *next, *item;
        cJSON_DeleteItemFromObjectCaseSensitive(args, "offset");
        cJSON_AddNumberToObject(args, "offset", offset);
        if ((rc = call(c, op, args, c->timeout_ms, NULL, NULL, &res)))
            break;
        page = cJSON_DetachItemFromObjectCaseSensitive(res, key);
        next = cJSON_GetObjectItemCaseSensitive(res, "next");
        offset = cJSON_IsNumber(next) ? next->valuedouble : -1;
        if (!all) {
            all = res;
            list = cJSON_AddArrayToObject(all, key);
        }
        while (page && (item = cJSON_DetachItemViaPointer(page, page->child)))
            cJSON_AddItemToArray(list, item);
        cJSON_Delete(page);
        if (res != all)
            cJSON_Delete(res);
        if (offset < 0)
            break;
    }
    cJSON_Delete(args);
    if (rc) {
        cJSON_Delete(all);
        return rc;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(all, "next");
    cJSON_DeleteItemFromObjectCaseSensitive(all, "offset");
    *out = all;
    return 0;
}

/* A number of seconds from 0 to max (--timeout, --wait, --hold). */
static bool parse_seconds(const char *text, double max, double *out)
{
    char *end;
    double v = strtod(text, &end);

    if (*end || end == text || !(v >= 0 && v <= max))
        return false;
    *out = v;
    return true;
}

/* ---- load -------------------------------------------------------------------- */

typedef struct progress {
    bool tty, quiet;
    double last_print;
    int last_percent;
    const char *name;
} progress;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void on_progress(const char *event_json, void *ctx)
{
    progress *p = ctx;
    cJSON *ev = cJSON_Parse(event_json);
    double done, total, elapsed, rate;
    char a[32], b[32], r[32];
    int percent;

    if (!ev)
        return;
    done = num(ev, "bytes_done");
    total = num(ev, "bytes_total");
    elapsed = num(ev, "elapsed");
    rate = elapsed > 0 ? done / elapsed : 0;
    percent = total > 0 ? (int)(100.0 * done / total) : 0;
    if (p->quiet) {
        /* nothing */
    } else if (p->tty) {
        char bar[31];
        int fill = percent * 30 / 100;
        memset(bar, '#', (size_t)fill);
        memset(bar + fill, '.', (size_t)(30 - fill));
        bar[30] = '\0';
        if (strcmp(str(ev, "phase"), "reading") == 0 || strcmp(str(ev, "phase"), "verifying") == 0) {
            double eta = rate > 0 ? (total - done) / rate : 0;
            fprintf(stderr, "\r\033[K%s [%s] %3d%% %s / %s  %s  ETA %.0fs", p->name, bar, percent,
                    size_text(done, a, sizeof a), size_text(total, b, sizeof b), wd_rate_format(rate, r, sizeof r),
                    eta);
        } else {
            fprintf(stderr, "\r\033[K%s: %s", p->name, str(ev, "phase"));
        }
        fflush(stderr);
    } else if (percent / 10 != p->last_percent / 10 || now() - p->last_print >= 5.0) {
        /* Not a terminal: a plain line every 10% or every 5 seconds. */
        fprintf(stderr, "%s: %s %d%% (%s of %s, %s)\n", p->name, str(ev, "phase"), percent,
                size_text(done, a, sizeof a), size_text(total, b, sizeof b), wd_rate_format(rate, r, sizeof r));
        p->last_percent = percent;
        p->last_print = now();
    }
    cJSON_Delete(ev);
}

/* A call that shows the daemon's progress events for `label` on stderr. */
static int call_with_progress(ctl *c, const char *op, cJSON *args, const char *load_path, const char *label,
                              cJSON **res)
{
    progress p = {.tty = isatty(STDERR_FILENO), .quiet = c->json, .last_print = now(), .last_percent = -10,
                  .name = label};
    int rc = call_load(c, op, args, load_path, c->timeout_ms, on_progress, &p, res);

    if (p.tty && !p.quiet)
        fputs("\r\033[K", stderr);
    return rc;
}

/* The daemon has its own working directory: it needs an absolute path. Only
 * the folders are resolved; the last component keeps the name it was given,
 * because the name matters: a Hugging Face cache's
 * "snapshots/REV/model.safetensors.index.json" is a symlink to a blob whose
 * name is a hash (no ".index.json", so not read as an index), and the default
 * model name comes from it. Returns 0 or a negative errno. */
static int absolute_path(const char *path, char *out, size_t len)
{
    char tmp[PATH_MAX], dir[PATH_MAX];
    const char *base;
    struct stat st;
    size_t n;

    if (stat(path, &st) < 0)
        return -errno;
    if (strlen(path) >= sizeof tmp)
        return -ENAMETOOLONG;
    strcpy(tmp, path);
    n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/')
        tmp[--n] = '\0';
    base = strrchr(tmp, '/');
    if (!base) {
        base = tmp;
        strcpy(dir, ".");
    } else if (base == tmp) {
        strcpy(dir, "/");
        base++;
    } else {
        tmp[base - tmp] = '\0';
        snprintf(dir, sizeof dir, "%s", tmp);
        base++;
    }
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        /* "." or "..": nothing to keep; resolve it all */
        if (!realpath(path, dir))
            return -errno;
        return snprintf(out, len, "%s", dir) >= (int)len ? -ENAMETOOLONG : 0;
    }
    {
        char resolved[PATH_MAX];
        if (!realpath(dir, resolved))
            return -errno;
        if (snprintf(out, len, "%s/%s", strcmp(resolved, "/") == 0 ? "" : resolved, base) >= (int)len)
            return -ENAMETOOLONG;
    }
    return 0;
}

/* "0,2,GPU-8c1e..." into a JSON array of device numbers and UUIDs (anything
 * that does not start with a digit, sign or space); NULL if it is not one. */
static cJSON *parse_device_list(const char *text)
{
    cJSON *arr = cJSON_CreateArray();
    const char *p = text;

    for (;;) {
        size_t len = strcspn(p, ",");
        char *end;
        if (len == 0 || *p == '-' || *p == '+' || *p == ' ') {
            cJSON_Delete(arr);
            return NULL;
        }
        if (isdigit((unsigned char)*p)) {
            long d = strtol(p, &end, 10);
            if (d > INT_MAX || end != p + len) {
                cJSON_Delete(arr);
                return NULL;
            }
            cJSON_AddItemToArray(arr, cJSON_CreateNumber((double)d));
        } else {
            char uuid[128];
            if (len >= sizeof uuid) {
                cJSON_Delete(arr);
                return NULL;
            }
            snprintf(uuid, sizeof uuid, "%.*s", (int)len, p);
            cJSON_AddItemToArray(arr, cJSON_CreateString(uuid));
        }
        if (!p[len])
            return arr;
        p += len + 1;
    }
}

/* A placement plan: {"devices": [0, 1], "placement": "expert-parallel"},
 * either key optional. Its keys go into args; flags given too win. */
static int read_plan(const char *file, cJSON *args)
{
    char text[64 * 1024];
    size_t n;
    FILE *f = fopen(file, "r");
    cJSON *plan, *item;
    int rc = 0;

    if (!f) {
        fprintf(stderr, "weightctl: plan %s: %s\n", file, strerror(errno));
        return EXIT_FAILED;
    }
    n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    if (ferror(f) || !feof(f)) {
        fprintf(stderr, "weightctl: plan %s: %s\n", file, ferror(f) ? "read error" : "larger than 64 KiB");
        fclose(f);
        return EXIT_FAILED;
    }
    fclose(f);
    if (!(plan = cJSON_Parse(text)) || !cJSON_IsObject(plan)) {
        cJSON_Delete(plan);
        fprintf(stderr, "weightctl: plan %s: not a JSON object\n", file);
        return EXIT_FAILED;
    }
    cJSON_ArrayForEach(item, plan)
    {
        bool ok = (strcmp(item->string, "devices") == 0 && cJSON_IsArray(item)) ||
                  (strcmp(item->string, "placement") == 0 && cJSON_IsString(item));
        if (!ok) {
            fprintf(stderr, "weightctl: plan %s: \"%s\" is not a plan key (\"devices\": [N, ...], "
                            "\"placement\": \"replicate\" or \"expert-parallel\")\n",
                    file, item->string);
            rc = EXIT_FAILED;
            break;
        }
        if (!cJSON_HasObjectItem(args, item->string))
            cJSON_AddItemToObject(args, item->string, cJSON_Duplicate(item, true));
    }
    cJSON_Delete(plan);
    return rc;
}

static const char *devices_text(const cJSON *devices, char *buf, size_t len)
{
    const cJSON *d;
    size_t used = 0;

    buf[0] = '\0';
    cJSON_ArrayForEach(d, devices)
    {
        if (used < len)
            used += (size_t)snprintf(buf + used, len - used, "%s%.0f", used ? "," : "", d->valuedouble);
    }
    return buf;
}

static int cmd_load(ctl *c, int argc, char **argv)
{
    const char *path = NULL, *name = NULL, *plan = NULL, *flag, *v;
    char abs[PATH_MAX], a[32], r[32], devs[128];
    cJSON *args = cJSON_CreateObject(), *res = NULL, *devices;
    int rc = EXIT_USAGE;

    for (int i = 1; i < argc; i++) {
        if ((v = flag_value(argc, argv, &i, "--name"))) {
            name = v;
        } else if ((v = flag_value(argc, argv, &i, flag = "--device")) ||
                   (v = flag_value(argc, argv, &i, flag = "--devices"))) {
            if (cJSON_HasObjectItem(args, "devices")) {
                usage_error("load: give --device or --devices once");
                goto out;
            }
            if (!(devices = parse_device_list(v))) {
                usage_error("%s: \"%s\" is not a device (number or UUID) or a list of them (0,1)", flag, v);
                goto out;
            }
            cJSON_AddItemToObject(args, "devices", devices);
        } else if ((v = flag_value(argc, argv, &i, "--placement"))) {
            wl_placement placement;
            if (wl_placement_parse(v, &placement)) {
                usage_error("--placement: \"%s\" is not replicate or expert-parallel", v);
                goto out;
            }
            cJSON_AddStringToObject(args, "placement", v);
        } else if ((v = flag_value(argc, argv, &i, "--plan"))) {
            plan = v;
        } else if (argv[i][0] == '-') {
            usage_error("load: unknown option \"%s\"", argv[i]);
            goto out;
        } else if (!path) {
            path = argv[i];
        } else {
            usage_error("load: one PATH only");
            goto out;
        }
    }
    if (!path) {
        usage_error("load: PATH is required");
        goto out;
    }
    if (plan && (rc = read_plan(plan, args)))
        goto out;
    /* The daemon has its own working directory: send an absolute path. */
    if ((rc = absolute_path(path, abs, sizeof abs))) {
        rc = report_error(c, path, rc, strerror(-rc));
        goto out;
    }
    if (name)
        cJSON_AddStringToObject(args, "name", name);
    rc = call_with_progress(c, "load", args, abs, name ? name : path, &res);
    if (rc) {
        rc = report_error(c, "load", rc, last_error(c));
        goto out;
    }
    if (c->json) {
        print_json(res);
    } else {
        double secs = num(res, "seconds");
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(res, "devices");
        printf("loaded %s: %.0f tensors in %.0f shard%s, %s in %.2f s (%s) on device%s %s", str(res, "name"),
               num(res, "tensors"), num(res, "shards"), num(res, "shards") == 1 ? "" : "s",
               size_text(num(res, "bytes"), a, sizeof a), secs,
               wd_rate_format(secs > 0 ? num(res, "bytes") / secs : 0, r, sizeof r),
               cJSON_GetArraySize(list) == 1 ? "" : "s", devices_text(list, devs, sizeof devs));
        if (cJSON_GetArraySize(list) > 1)
            printf(" (%s, %s on the devices together)", str(res, "placement"),
                   size_text(num(res, "device_bytes"), a, sizeof a));
        putchar('\n');
    }
    rc = 0;
out:
    cJSON_Delete(res);
    cJSON_Delete(args);
    return rc;
}

/* ---- commands on one model ------------------------------------------------------ */

static cJSON *name_args(const char *name)
{
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "name", name);
    return args;
}

static int one_name(int argc, char **argv, const char **name)
{
    if (argc != 2 || argv[1][0] == '-')
        return usage_error("%s: expected exactly one NAME", argv[0]);
    *name = argv[1];
    return 0;
}

static int cmd_unload(ctl *c, int argc, char **argv)
{
    const char *name = NULL, *v;
    bool force = false, keep_cached = false;
    double wait = -1;
    cJSON *args, *res;
    char a[32];
    int rc;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--force") == 0) {
            force = true;
        } else if (strcmp(argv[i], "--keep-cached") == 0) {
            keep_cached = true;
        } else if ((v = flag_value(argc, argv, &i, "--wait"))) {
            if (!parse_seconds(v, 3600, &wait))
                return usage_error("--wait: \"%s\" is not a number of seconds (0 to 3600)", v);
        } else if (argv[i][0] == '-' || name) {
            return usage_error("unload: expected NAME [--force [--wait SECONDS]] [--keep-cached], not \"%s\"",
                               argv[i]);
        } else {
            name = argv[i];
        }
    }
    if (!name)
        return usage_error("unload: NAME is required");
    args = name_args(name);
    if (force)
        cJSON_AddBoolToObject(args, "force", 1);
    if (keep_cached)
        cJSON_AddBoolToObject(args, "keep_cached", 1);
    if (wait >= 0)
        cJSON_AddNumberToObject(args, "wait", ceil(wait));
    /* A forced unload waits for the holders: give the reply that long too. */
    rc = call(c, "unload", args, c->timeout_ms < 0 ? -1 : c->timeout_ms + (int)(wait < 0 ? 10 : ceil(wait)) * 1000,
              NULL, NULL, &res);
    cJSON_Delete(args);
    if (rc)
        return report_error(c, "unload", rc, last_error(c));
    if (c->json)
        print_json(res);
    else
        printf("unloaded %s (%s freed%s)\n", str(res, "name"), size_text(num(res, "device_bytes"), a, sizeof a),
               keep_cached ? ", segments kept in the allocator's cache" : "");
    cJSON_Delete(res);
    return 0;
}

/* ---- sleep and wake ------------------------------------------------------------------ */

static void print_moved(const cJSON *res, const char *what)
{
    char a[32], b0[32], b1[32], f0[32], f1[32], r[32];

    printf("%s %s: %s in %.2f s (%s); device free %s -> %s, reserved %s -> %s\n", what, str(res, "name"),
           size_text(num(res, "device_bytes"), a, sizeof a), num(res, "seconds"),
           wd_rate_format(num(res, "rate"), r, sizeof r), size_text(num(res, "free_bytes_before"), f0, sizeof f0),
           size_text(num(res, "free_bytes_after"), f1, sizeof f1),
           size_text(num(res, "reserved_bytes_before"), b0, sizeof b0),
           size_text(num(res, "reserved_bytes_after"), b1, sizeof b1));
}

/* sleep or wake with args (consumed), and what it moved. */
static int move(ctl *c, const char *op, cJSON *args)
{
    cJSON *res;
    int rc = call(c, op, args, -1, NULL, NULL, &res);

    cJSON_Delete(args);
    if (rc)
        return report_error(c, op, rc, last_error(c));
    if (c->json)
        print_json(res);
    else if (strcmp(op, "sleep") == 0)
        print_moved(res, strcmp(str(res, "sleeps_in"), "host") == 0 ? "offloaded" : "discarded");
    else
        print_moved(res, strcmp(str(res, "from"), "host") == 0 ? "woke from host memory" : "woke from the checkpoint");
    cJSON_Delete(res);
    return 0;
}

static int cmd_sleep(ctl *c, int argc, char **argv)
{
    const char *name = NULL, *mode = NULL;
    bool force = false;
    cJSON *args;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--offload") == 0 || strcmp(argv[i], "--discard") == 0) {
            if (mode)
                return usage_error("sleep: --offload and --discard exclude each other");
            mode = argv[i] + 2;
        } else if (strcmp(argv[i], "--force") == 0) {
            force = true;
        } else if (argv[i][0] == '-' || name) {
            return usage_error("sleep: expected NAME [--offload|--discard] [--force], not \"%s\"", argv[i]);
        } else {
            name = argv[i];
        }
    }
    if (!name)
        return usage_error("sleep: NAME is required");
    args = name_args(name);
    cJSON_AddStringToObject(args, "mode", mode ? mode : "offload");
    if (force)
        cJSON_AddBoolToObject(args, "force", 1);
    return move(c, "sleep", args);
}

static int cmd_wake(ctl *c, int argc, char **argv)
{
    const char *name = NULL;
    int rc;

    if ((rc = one_name(argc, argv, &name)))
        return rc;
    return move(c, "wake", name_args(name));
}

/* ---- attach: map a model as a worker would ---------------------------------------- */

typedef struct hold_state {
    bool revoked;
    char reason[64];
    unsigned sleeps, wakes;   /* the library unmapped and mapped again by itself */
} hold_state;

static void on_notice(const char *event_json, void *ctx)
{
    hold_state *h = ctx;
    cJSON *ev = cJSON_Parse(event_json);

    if (ev && strcmp(str(ev, "event"), "revoke") == 0) {
        h->revoked = true;
        snprintf(h->reason, sizeof h->reason, "%s", str(ev, "reason"));
    } else if (ev && strcmp(str(ev, "event"), "sleep") == 0) {
        h->sleeps++;
    } else if (ev && strcmp(str(ev, "event"), "wake") == 0) {
        h->wakes++;
    }
    cJSON_Delete(ev);
}

/* Every part the attachment maps, against the checkpoint's bytes, read from
 * the files here with this user's rights; and each tensor the attachment
 * holds whole against the checksum the daemon computed while loading
 * (*summed counts those). Counts the tensors that differ or are missing; 0
 * or a negative errno with err set. */
static int verify_attachment(const wdc_attachment *att, const char *path, bool all_devices, size_t *bad,
                             size_t *summed, char *first_bad, size_t len, wd_error *err)
{
    wl_checkpoint ck;
    size_t chunk = 8u << 20;
    char *want = malloc(chunk), *have = malloc(chunk);
    int rc, fd = -1;
    uint32_t fd_shard = UINT32_MAX;

    *bad = 0;
    if (!want || !have) {
        free(want);
        free(have);
        return wd_error_set(err, -ENOMEM, "out of memory");
    }
    if ((rc = wl_checkpoint_open(path, &ck, err)))
        goto out;
    for (size_t i = 0; i < ck.n_tensors && all_devices; i++)
        if (!wdc_attachment_find(att, ck.tensors[i].st->name)) {
            if (!(*bad)++)
                snprintf(first_bad, len, "tensor \"%s\" is missing", ck.tensors[i].st->name);
        }
    for (size_t i = 0; i < wdc_attachment_tensor_count(att) && !rc; i++) {
        const wdc_tensor *t = wdc_attachment_tensor(att, i);
        const wl_tensor *ct = wl_checkpoint_find(&ck, t->name);
        bool differs = !ct || (uint64_t)st_tensor_nbytes(ct->st) != t->bytes;
        for (size_t p = 0; p < t->n_parts && !differs && !rc; p++) {
            const wdc_part *part = &t->parts[p];
            const wl_shard *sh = ct ? &ck.shards[ct->shard] : NULL;
            if (fd_shard != ct->shard) {
                if (fd >= 0)
                    close(fd);
                fd_shard = ct->shard;
                if ((fd = open(sh->path, O_RDONLY | O_CLOEXEC)) < 0) {
                    rc = wd_error_set(err, -errno, "%s: %s", sh->path, strerror(errno));
                    break;
                }
            }
            for (uint64_t off = 0; off < part->bytes && !differs; off += chunk) {
                size_t n = part->bytes - off < chunk ? (size_t)(part->bytes - off) : chunk;
                uint64_t at = sh->st.data_offset + ct->st->begin + part->tensor_offset + off;
                ssize_t got = pread(fd, want, n, (off_t)at);
                if (got != (ssize_t)n) {
                    rc = wd_error_set(err, -EIO, "%s: short read at byte %llu", sh->path, (unsigned long long)at);
                    break;
                }
                if ((rc = wdc_read(att, part, off, have, n))) {
                    wd_error_set(err, rc, "reading tensor \"%s\" where it is mapped: %s", t->name, strerror(-rc));
                    break;
                }
                if (memcmp(want, have, n) != 0) {
                    size_t k = 0;
                    while (want[k] == have[k])
                        k++;
                    differs = true;
                    if (!*bad)
                        snprintf(first_bad, len, "tensor \"%s\": first difference at byte %llu (device %d)", t->name,
                                 (unsigned long long)(part->tensor_offset + off + k), part->device);
                }
            }
        }
        if (!differs && !rc && t->has_checksum) {
            uint64_t sum;
            int r2 = wdc_tensor_checksum(att, t, &sum);
            char h1[17], h2[17];
            if (r2 == 0) {
                (*summed)++;
                if (sum != t->checksum) {
                    differs = true;
                    if (!*bad)
                        snprintf(first_bad, len, "tensor \"%s\": checksum %s where mapped, %s when loaded", t->name,
                                 wd_sum_format(sum, h1), wd_sum_format(t->checksum, h2));
                }
            } else if (r2 != -ENODATA) {
                rc = wd_error_set(err, r2, "hashing tensor \"%s\" where it is mapped: %s", t->name, strerror(-r2));
            }
        }
        if (differs && !rc) {
            if (!*bad && !ct)
                snprintf(first_bad, len, "tensor \"%s\" is not in the checkpoint", t->name);
            else if (!*bad && !first_bad[0])
                snprintf(first_bad, len, "tensor \"%s\": %llu bytes mapped, %llu in the checkpoint", t->name,
                         (unsigned long long)t->bytes, (unsigned long long)st_tensor_nbytes(ct->st));
            (*bad)++;
        }
    }
out:
    if (fd >= 0)
        close(fd);
    wl_checkpoint_close(&ck);
    free(want);
    free(have);
    return rc;
}

static int cmd_attach(ctl *c, int argc, char **argv)
{
    const char *name = NULL, *device = NULL, *v;
    bool verify = false, writable = false;
    double hold = 0, t0;
    hold_state held = {0};
    wdc_attachment *att = NULL;
    cJSON *info = NULL;
    size_t bad = 0, summed = 0;
    char first_bad[512] = "", a[32], path[4096] = "";
    int rc;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--verify") == 0) {
            verify = true;
        } else if (strcmp(argv[i], "--writable") == 0) {
            writable = true;
        } else if ((v = flag_value(argc, argv, &i, "--device"))) {
            device = v;
        } else if ((v = flag_value(argc, argv, &i, "--hold"))) {
            if (!parse_seconds(v, 1e6, &hold))
                return usage_error("--hold: \"%s\" is not a number of seconds", v);
        } else if (argv[i][0] == '-' || name) {
            return usage_error("attach: expected NAME [--device D] [--verify] [--hold SECONDS] [--writable], not \"%s\"",
                               argv[i]);
        } else {
            name = argv[i];
        }
    }
    if (!name)
        return usage_error("attach: NAME is required");
    if (verify) {
        /* The checkpoint the daemon loaded it from, read here as this user. */
        cJSON *args = name_args(name), *res;
        cJSON_AddNumberToObject(args, "limit", 1);
        rc = call(c, "info", args, c->timeout_ms, NULL, NULL, &res);
        cJSON_Delete(args);
        if (rc)
            return report_error(c, "attach", rc, last_error(c));
        snprintf(path, sizeof path, "%s", str(res, "path"));
        cJSON_Delete(res);
    }
    if ((rc = connect_once(c)))
        return report_error(c, "attach", rc, last_error(c));
    wdc_set_notice_handler(c->client, on_notice, &held);
    t0 = now();
    if ((rc = wdc_attach(c->client, name, device, writable ? WDC_ATTACH_WRITABLE : 0, c->timeout_ms, &att)))
        return report_error(c, "attach", rc, last_error(c));
    info = cJSON_Parse(wdc_attachment_info(att));
    cJSON_AddNumberToObject(info, "seconds", now() - t0);
    if (verify) {
        wd_error err = {0};
        double tv = now();
        if ((rc = verify_attachment(att, path, device == NULL, &bad, &summed, first_bad, sizeof first_bad, &err))) {
            wdc_detach(c->client, att, c->timeout_ms);
            cJSON_Delete(info);
            return report_error(c, "attach --verify", rc, wd_error_text(&err));
        }
        cJSON_AddBoolToObject(info, "match", bad == 0);
        cJSON_AddNumberToObject(info, "mismatched_tensors", (double)bad);
        cJSON_AddNumberToObject(info, "checksums_checked", (double)summed);
        if (bad)
            cJSON_AddStringToObject(info, "first_mismatch", first_bad);
        cJSON_AddNumberToObject(info, "verify_seconds", now() - tv);
    }
    if (!c->json) {
        printf("attached %s (lease %.0f): %.0f tensors, %.0f parts in %.0f handles from %.0f %s descriptors, %s, "
               "in %.1f ms\n", str(info, "name"), num(info, "lease"), num(info, "tensors"), num(info, "parts"),
               num(info, "handles"), num(info, "descriptors"), str(info, "handle_type"),
               size_text(num(info, "bytes"), a, sizeof a), 1000 * num(info, "seconds"));
        if (verify && !bad)
            printf("verified: every part matches the checkpoint, and %zu tensors their checksums (%.2f s)\n", summed,
                   num(info, "verify_seconds"));
        else if (verify)
            printf("DIFFERS from the checkpoint: %zu tensors; %s\n", bad, first_bad);
        fflush(stdout);
    }
    /* Held as a worker would hold it, until the time is up or the daemon asks
     * for it back. */
    for (double until = now() + hold; hold > 0 && !held.revoked && now() < until;) {
        int left = (int)ceil((until - now()) * 1000);
        if ((rc = wdc_poll(c->client, left > 0 ? left : 0)) < 0)
            break;
    }
    if (held.revoked)
        cJSON_AddStringToObject(info, "revoked", held.reason);
    cJSON_AddNumberToObject(info, "sleeps", held.sleeps);
    cJSON_AddNumberToObject(info, "wakes", held.wakes);
    /* The daemon put the model to sleep and woke it meanwhile: the same
     * addresses hold the same bytes again (unless a wake failed). */
    if (held.sleeps && !c->json) {
        int st = wdc_attachment_state(att);
        printf("the model slept %u time%s and woke %u: %s\n", held.sleeps, held.sleeps == 1 ? "" : "s",
               held.wakes, st == 0 ? "mapped again at the same addresses" : st == WDC_ASLEEP ? "still asleep"
                                                                           : "a wake could not map it");
    }
    if (held.sleeps && verify && wdc_attachment_state(att) == 0) {
        wd_error err = {0};
        size_t bad2 = 0, summed2 = 0;
        if (verify_attachment(att, path, device == NULL, &bad2, &summed2, first_bad, sizeof first_bad, &err) == 0) {
            bad += bad2;
            cJSON_AddBoolToObject(info, "match_after_wake", bad2 == 0);
            if (!c->json && bad2)
                printf("after the wake: DIFFERS from the checkpoint: %zu tensors; %s\n", bad2, first_bad);
            else if (!c->json)
                printf("after the wake: every part matches the checkpoint again\n");
        }
    }
    rc = wdc_detach(c->client, att, c->timeout_ms);
    if (c->json)
        print_json(info);
    else if (held.revoked)
        printf("revoked by the daemon (%s): detached\n", held.reason);
    else
        printf("detached\n");
    cJSON_Delete(info);
    if (rc && !held.revoked && rc != -ECONNRESET)
        return report_error(c, "detach", rc, last_error(c));
    return bad ? EXIT_FAILED : 0;
}

static int cmd_leases(ctl *c, int argc, char **argv)
{
    cJSON *res, *all;
    int rc;
    (void)argv;

    if (argc != 1)
        return usage_error("leases takes no arguments");
    if ((rc = call_paged(c, "leases", cJSON_CreateObject(), "leases", &res)))
        return report_error(c, "leases", rc, last_error(c));
    all = cJSON_GetObjectItemCaseSensitive(res, "leases");
    if (c->json) {
        print_json(res);
        cJSON_Delete(res);
        return 0;
    }
    if (!cJSON_GetArraySize(all))
        puts("no leases");
    else
        printf("%-8s %-24s %-8s %-8s %-16s %-8s %-5s %10s\n", "LEASE", "MODEL", "PID", "UID", "PROCESS", "DEVICE", "RW",
               "AGE(s)");
    for (cJSON *l = all->child; l; l = l->next) {
        char dev[16];
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(l, "device");
        snprintf(dev, sizeof dev, cJSON_IsNumber(d) ? "%.0f" : "all", cJSON_IsNumber(d) ? d->valuedouble : 0.0);
        printf("%-8.0f %-24s %-8.0f %-8.0f %-16s %-8s %-5s %10.1f\n", num(l, "lease"), str(l, "model"), num(l, "pid"),
               num(l, "uid"), str(l, "process"), dev,
               cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(l, "writable")) ? "yes" : "no", num(l, "age"));
    }
    cJSON_Delete(res);
    return 0;
}

static int cmd_verify(ctl *c, int argc, char **argv)
{
    const char *name = NULL;
    cJSON *args, *res;
    char a[32], r[32];
    bool quick = false;
    int rc, exit_code;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (argv[i][0] == '-' || name)
            return usage_error("verify: expected NAME [--quick], not \"%s\"", argv[i]);
        else
            name = argv[i];
    }
    if (!name)
        return usage_error("verify: NAME is required");
    args = name_args(name);
    if (quick)
        cJSON_AddBoolToObject(args, "quick", 1);
    rc = call_with_progress(c, "verify", args, NULL, name, &res);
    cJSON_Delete(args);
    if (rc)
        return report_error(c, "verify", rc, last_error(c));
    exit_code = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "match")) ? 0 : EXIT_FAILED;
    if (c->json)
        print_json(res);
    else if (exit_code == 0)
        printf("verified %s: all %.0f tensors match %s (%s %s in %.2f s, %s)\n", str(res, "name"),
               num(res, "tensors"), quick ? "their checksums" : "the checkpoint",
               size_text(num(res, "bytes"), a, sizeof a), quick ? "on the devices hashed" : "compared",
               num(res, "seconds"), wd_rate_format(num(res, "rate"), r, sizeof r));
    else
        printf("%s DIFFERS from %s: %.0f of %.0f tensors differ; %s\n", str(res, "name"),
               quick ? "its checksums" : "its checkpoint", num(res, "mismatched_tensors"), num(res, "tensors"),
               str(res, "first_mismatch"));
    cJSON_Delete(res);
    return exit_code;
}

static void print_shape(const cJSON *shape, char *buf, size_t len)
{
    size_t used = 0;
    const cJSON *d;

    used += (size_t)snprintf(buf, len, "[");
    cJSON_ArrayForEach(d, shape)
    {
        if (used < len)
            used += (size_t)snprintf(buf + used, len - used, "%s%.0f", d->prev && d != shape->child ? ", " : "",
                                     d->valuedouble);
    }
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

static int cmd_info(ctl *c, int argc, char **argv)
{
    const char *name = NULL;
    cJSON *all;
    char a[32], b[32], shape[128];
    int rc;

    if ((rc = one_name(argc, argv, &name)))
        return rc;
    if ((rc = call_paged(c, "info", name_args(name), "tensor_list", &all)))
        return report_error(c, "info", rc, last_error(c));
    if (c->json) {
        print_json(all);
    } else {
        const cJSON *t, *d, *pl;
        char devs[128];
        printf("model:    %s\npath:     %s\nstate:    %s\ndevices:  %s (%s)\ntensors:  %.0f in %.0f shard%s\n"
               "bytes:    %.0f (%s; %s on the devices)\ndtypes:  ",
               str(all, "name"), str(all, "path"), str(all, "state"),
               devices_text(cJSON_GetObjectItemCaseSensitive(all, "devices"), devs, sizeof devs),
               str(all, "placement"), num(all, "tensors"), num(all, "shards"), num(all, "shards") == 1 ? "" : "s",
               num(all, "bytes"), size_text(num(all, "bytes"), a, sizeof a),
               size_text(num(all, "device_bytes"), b, sizeof b));
        cJSON_ArrayForEach(d, cJSON_GetObjectItemCaseSensitive(all, "dtypes"))
            printf(" %s %s", d->string, size_text(d->valuedouble, a, sizeof a));
        if (num(all, "shards_replaced") > 0)
            printf("\nwarning:  %.0f shard%s replaced at the path during the load: this model holds the files as "
                   "they were opened", num(all, "shards_replaced"), num(all, "shards_replaced") == 1 ? "" : "s");
        printf("\nslabs:    %d\nleases:   %d", cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(all, "slab_list")),
               cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(all, "leases")));
        cJSON_ArrayForEach(d, cJSON_GetObjectItemCaseSensitive(all, "leases"))
            printf("\n          lease %.0f: pid %.0f (%s, uid %.0f), %.1f s", num(d, "lease"), num(d, "pid"),
                   str(d, "process"), num(d, "uid"), num(d, "age"));
        /* One line per tensor and device; a tensor split by rows shows where
         * each device's part starts within it. */
        printf("\n\n%-60s %-8s %-22s %6s %7s %12s %12s %12s\n", "TENSOR", "DTYPE", "SHAPE", "DEVICE", "SEGMENT",
               "OFFSET", "FROM", "BYTES");
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(all, "tensor_list"))
        {
            print_shape(cJSON_GetObjectItemCaseSensitive(t, "shape"), shape, sizeof shape);
            if (!cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(t, "placements")))
                printf("%-60s %-8s %-22s %6s %7s %12s %12s %12.0f\n", str(t, "name"), str(t, "dtype"), shape, "-",
                       "-", "-", "-", num(t, "bytes"));
            cJSON_ArrayForEach(pl, cJSON_GetObjectItemCaseSensitive(t, "placements"))
                printf("%-60s %-8s %-22s %6.0f %7.0f %12.0f %12.0f %12.0f\n", str(t, "name"), str(t, "dtype"),
                       shape, num(pl, "device"), num(pl, "segment"), num(pl, "offset"), num(pl, "tensor_offset"),
                       num(pl, "bytes"));
        }
    }
    cJSON_Delete(all);
    return 0;
}

/* ---- daemon-wide commands ------------------------------------------------------------ */

static int cmd_list(ctl *c, int argc, char **argv)
{
    cJSON *res;
    const cJSON *m;
    char a[32], devs[128];
    int rc;
    (void)argv;

    if (argc != 1)
        return usage_error("list takes no arguments");
    if ((rc = call_paged(c, "list", cJSON_CreateObject(), "models", &res)))
        return report_error(c, "list", rc, last_error(c));
    if (c->json) {
        print_json(res);
    } else {
        const cJSON *models = cJSON_GetObjectItemCaseSensitive(res, "models");
        if (!cJSON_GetArraySize(models))
            puts("no models loaded");
        else
            printf("%-24s %-12s %-8s %8s %12s %8s %6s  %s\n", "NAME", "STATE", "DEVICES", "TENSORS", "SIZE",
                   "LOAD(s)", "LEASES", "PATH");
        cJSON_ArrayForEach(m, models) {
            /* asleep:host (offloaded) or asleep:ckpt (discarded) */
            char state[32];
            const char *where = str(m, "sleeps_in");
            snprintf(state, sizeof state, "%s%s%s", str(m, "state"), *where ? ":" : "",
                     strcmp(where, "checkpoint") == 0 ? "ckpt" : where);
            printf("%-24s %-12s %-8s %8.0f %12s %8.2f %6d  %s\n", str(m, "name"), state,
                   devices_text(cJSON_GetObjectItemCaseSensitive(m, "devices"), devs, sizeof devs), num(m, "tensors"),
                   size_text(num(m, "bytes"), a, sizeof a), num(m, "load_seconds"),
                   cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(m, "leases")), str(m, "path"));
        }
    }
    cJSON_Delete(res);
    return 0;
}

static int cmd_stats(ctl *c, int argc, char **argv)
{
    cJSON *res;
    const cJSON *d, *pol;
    char a[32], b[32];
    int rc;
    (void)argv;

    if (argc != 1)
        return usage_error("stats takes no arguments");
    if ((rc = call(c, "stats", NULL, c->timeout_ms, NULL, NULL, &res)))
        return report_error(c, "stats", rc, last_error(c));
    if (c->json) {
        print_json(res);
        cJSON_Delete(res);
        return 0;
    }
    pol = cJSON_GetObjectItemCaseSensitive(res, "policy");
    printf("backend %s, %.0f model%s, %.0f connection%s, up %.0f s\n", str(res, "backend"), num(res, "models"),
           num(res, "models") == 1 ? "" : "s", num(res, "connections"), num(res, "connections") == 1 ? "" : "s",
           num(res, "uptime"));
    printf("allocator policy in force: %s%s (load policy: %s)\n", str(pol, "current"),
           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pol, "load_policy_active")) ? " [a load holds it]" : "",
           str(pol, "load"));
    cJSON_ArrayForEach(d, cJSON_GetObjectItemCaseSensitive(res, "devices"))
    {
        static const char *const keys[] = {"allocated_bytes", "reserved_bytes", "active_bytes",
                                           "inactive_split_bytes", "requested_bytes"};
        printf("\ndevice %.0f (%s, %s): capacity %s\n", num(d, "device"), str(d, "name"), str(d, "uuid"),
               size_text(num(d, "capacity"), a, sizeof a));
        printf("  %-22s %14s %14s\n", "", "current", "peak");
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            const cJSON *s = cJSON_GetObjectItemCaseSensitive(d, keys[i]);
            printf("  %-22s %14s %14s\n", keys[i], size_text(num(s, "current"), a, sizeof a),
                   size_text(num(s, "peak"), b, sizeof b));
        }
        printf("  %-22s %14.0f %14.0f\n", "segments", num(cJSON_GetObjectItemCaseSensitive(d, "segment"), "current"),
               num(cJSON_GetObjectItemCaseSensitive(d, "segment"), "peak"));
        printf("  largest free block %s, fragmentation %.1f%%\n", size_text(num(d, "largest_free_block"), a, sizeof a),
               100.0 * num(d, "fragmentation"));
        printf("  device allocs %.0f, frees %.0f, retries %.0f, out-of-memory %.0f\n", num(d, "num_device_alloc"),
               num(d, "num_device_free"), num(d, "num_alloc_retries"), num(d, "num_ooms"));
    }
    cJSON_Delete(res);
    return 0;
}

static int cmd_shutdown(ctl *c, int argc, char **argv)
{
    cJSON *res;
    int rc;
    (void)argv;

    if (argc != 1)
        return usage_error("shutdown takes no arguments");
    if ((rc = call(c, "shutdown", NULL, c->timeout_ms, NULL, NULL, &res)))
        return report_error(c, "shutdown", rc, last_error(c));
    cJSON_Delete(res);
    /* Wait for the daemon to finish its orderly stop and hang up. */
    if ((rc = wdc_wait_closed(c->client, c->timeout_ms)))
        return report_error(c, "shutdown", rc, last_error(c));
    if (c->json)
        puts("{\"ok\": true, \"stopped\": true}");
    else
        puts("weightd stopped");
    return 0;
}

static int cmd_policy(ctl *c, int argc, char **argv)
{
    cJSON *args = NULL, *res;
    int rc;

    if (argc > 2 || (argc == 2 && argv[1][0] == '-'))
        return usage_error("policy: expected at most one CONF");
    if (argc == 2) {
        args = cJSON_CreateObject();
        cJSON_AddStringToObject(args, "conf", argv[1]);
    }
    rc = call(c, "policy", args, c->timeout_ms, NULL, NULL, &res);
    cJSON_Delete(args);
    if (rc)
        return report_error(c, "policy", rc, last_error(c));
    if (c->json)
        print_json(res);
    else
        printf("in force: %s%s\nload policy: %s\n", str(res, "current"),
               cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "load_policy_active")) ? " (a load holds it)" : "",
               str(res, "load"));
    cJSON_Delete(res);
    return 0;
}

/* Every device's segments and blocks, page by page. */
static int cmd_snapshot(ctl *c, int argc, char **argv)
{
    cJSON *all = cJSON_CreateObject(), *devices = cJSON_AddArrayToObject(all, "devices");
    char a[32], b[32];
    int rc = 0;
    (void)argv;

    if (argc != 1) {
        cJSON_Delete(all);
        return usage_error("snapshot takes no arguments");
    }
    for (int dev = 0;; dev++) {
        cJSON *segs = NULL;
        double seg = 0, blk = 0;
        for (;;) {
            cJSON *args = cJSON_CreateObject(), *res, *page, *next, *sg;
            cJSON_AddNumberToObject(args, "device", dev);
            cJSON_AddNumberToObject(args, "segment", seg);
            cJSON_AddNumberToObject(args, "block", blk);
            rc = call(c, "snapshot", args, c->timeout_ms, NULL, NULL, &res);
            cJSON_Delete(args);
            if (rc == -ENODEV && dev > 0) {
                rc = 0;
                goto done;
            }
            if (rc) {
                cJSON_Delete(all);
                return report_error(c, "snapshot", rc, last_error(c));
            }
            if (!segs) {
                cJSON *d = cJSON_CreateObject();
                cJSON_AddNumberToObject(d, "device", dev);
                segs = cJSON_AddArrayToObject(d, "segments");
                cJSON_AddItemToArray(devices, d);
            }
            /* A segment split over two pages continues its block list. */
            page = cJSON_GetObjectItemCaseSensitive(res, "segments");
            while ((sg = page ? page->child : NULL)) {
                cJSON *last = cJSON_GetArrayItem(segs, cJSON_GetArraySize(segs) - 1);
                cJSON_DetachItemViaPointer(page, sg);
                if (last && num(sg, "first_block") > 0 && num(last, "id") == num(sg, "id")) {
                    cJSON *more = cJSON_GetObjectItemCaseSensitive(sg, "blocks"), *bl;
                    while ((bl = more->child))
                        cJSON_AddItemToArray(cJSON_GetObjectItemCaseSensitive(last, "blocks"),
                                             cJSON_DetachItemViaPointer(more, bl));
                    cJSON_Delete(sg);
                } else {
                    cJSON_DeleteItemFromObjectCaseSensitive(sg, "first_block");
                    cJSON_AddItemToArray(segs, sg);
                }
            }
            next = cJSON_GetObjectItemCaseSensitive(res, "next");
            if (!cJSON_IsObject(next)) {
                cJSON_Delete(res);
                break;
            }
            seg = num(next, "segment");
            blk = num(next, "block");
            cJSON_Delete(res);
        }
    }
done:
    if (c->json) {
        print_json(all);
    } else {
        const cJSON *d, *sg, *bl;
        cJSON_ArrayForEach(d, devices)
        {
            printf("device %.0f: %d segment%s\n", num(d, "device"), cJSON_GetArraySize(cJSON_GetObjectItem(d, "segments")),
                   cJSON_GetArraySize(cJSON_GetObjectItem(d, "segments")) == 1 ? "" : "s");
            cJSON_ArrayForEach(sg, cJSON_GetObjectItemCaseSensitive(d, "segments"))
            {
                printf("  segment %.0f at %#llx: %s, %s mapped, %s pool%s\n", num(sg, "id"),
                       (unsigned long long)num(sg, "address"), size_text(num(sg, "size"), a, sizeof a),
                       size_text(num(sg, "mapped"), b, sizeof b), str(sg, "pool"),
                       cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(sg, "expandable")) ? ", expandable" : "");
                cJSON_ArrayForEach(bl, cJSON_GetObjectItemCaseSensitive(sg, "blocks"))
                    printf("    %#14llx %12s  %-9s requested %s\n", (unsigned long long)num(bl, "address"),
                           size_text(num(bl, "size"), a, sizeof a), str(bl, "state"),
                           size_text(num(bl, "requested"), b, sizeof b));
            }
        }
    }
    cJSON_Delete(all);
    return rc;
}

/* ---- inspect: offline ------------------------------------------------------------------ */

static cJSON *moe_json(const wl_moe *m)
{
    cJSON *o = cJSON_CreateObject(), *layers;

    cJSON_AddStringToObject(o, "layout", wl_moe_layout_name(m->layout));
    cJSON_AddNumberToObject(o, "layers", (double)m->n_layers);
    cJSON_AddNumberToObject(o, "experts_per_layer", m->experts_per_layer);
    cJSON_AddNumberToObject(o, "expert_tensors", (double)m->expert_tensors);
    cJSON_AddNumberToObject(o, "expert_bytes", (double)m->expert_bytes);
    cJSON_AddNumberToObject(o, "layer_bytes", (double)m->layer_bytes);
    cJSON_AddNumberToObject(o, "outside_layers_bytes", (double)m->outside_bytes);
    layers = cJSON_AddArrayToObject(o, "per_layer");
    for (size_t i = 0; i < m->n_layers; i++) {
        const wl_moe_layer *l = &m->layers[i];
        cJSON *lo = cJSON_CreateObject();
        cJSON_AddNumberToObject(lo, "layer", (double)l->index);
        cJSON_AddNumberToObject(lo, "experts", l->experts);
        cJSON_AddStringToObject(lo, "experts_stored", l->experts ? (l->fused ? "fused" : "per-expert") : "none");
        cJSON_AddNumberToObject(lo, "expert_bytes", (double)l->expert_bytes);
        cJSON_AddNumberToObject(lo, "bytes_per_expert", l->experts ? (double)(l->expert_bytes / l->experts) : 0.0);
        cJSON_AddNumberToObject(lo, "other_bytes", (double)l->other_bytes);
        cJSON_AddNumberToObject(lo, "bytes", (double)(l->expert_bytes + l->other_bytes));
        cJSON_AddItemToArray(layers, lo);
    }
    return o;
}

static void moe_text(const wl_moe *m, uint64_t total)
{
    char a[32], b[32], e[32];

    if (!m->n_layers) {
        printf("layers:     none found in the tensor names\n");
        return;
    }
    printf("layers:     %zu (%llu to %llu), %s per layer on average\n", m->n_layers,
           (unsigned long long)m->layers[0].index, (unsigned long long)m->layers[m->n_layers - 1].index,
           wd_size_format(m->layer_bytes / m->n_layers, a, sizeof a));
    if (m->layout == WL_MOE_DENSE) {
        printf("experts:    none (a dense model)\n");
        return;
    }
    printf("experts:    %u per layer, stored %s; %s of experts per layer, %s per expert; experts hold %.1f%% "
           "of the bytes\n",
           m->experts_per_layer, wl_moe_layout_name(m->layout),
           wd_size_format(m->expert_bytes / m->n_layers, a, sizeof a),
           wd_size_format(m->experts_per_layer ? m->expert_bytes / m->n_layers / m->experts_per_layer : 0, e, sizeof e),
           total ? 100.0 * (double)m->expert_bytes / (double)total : 0.0);
    printf("\n  %6s %8s %10s %14s %14s %14s\n", "LAYER", "EXPERTS", "STORED", "EXPERT BYTES", "PER EXPERT",
           "OTHER BYTES");
    for (size_t i = 0; i < m->n_layers; i++) {
        const wl_moe_layer *l = &m->layers[i];
        printf("  %6llu %8u %10s %14s %14s %14s\n", (unsigned long long)l->index, l->experts,
               l->experts ? (l->fused ? "fused" : "per-expert") : "-", wd_size_format(l->expert_bytes, a, sizeof a),
               wd_size_format(l->experts ? l->expert_bytes / l->experts : 0, e, sizeof e),
               wd_size_format(l->other_bytes, b, sizeof b));
    }
}

/* Every tensor's checksum (common/checksum.h), read from its file from
 * start to end: the figure the daemon's readers compute in pieces. */
static int checkpoint_sums(const wl_checkpoint *ck, uint64_t *sums, wd_error *err)
{
    const size_t chunk = 8u << 20;
    wd_summer *sum = wd_summer_new();
    char *buf = malloc(chunk);
    int rc = 0;

    if (!sum || !buf)
        rc = wd_error_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < ck->n_tensors && !rc; i++) {
        const wl_shard *sh = &ck->shards[ck->tensors[i].shard];
        const st_tensor *t = ck->tensors[i].st;
        uint64_t len = st_tensor_nbytes(t);
        wd_summer_start(sum, len);
        for (uint64_t off = 0; off < len && !rc; off += chunk) {
            size_t n = len - off < chunk ? (size_t)(len - off) : chunk;
            uint64_t at = sh->st.data_offset + t->begin + off;
            if (pread(sh->fd, buf, n, (off_t)at) != (ssize_t)n)
                rc = wd_error_set(err, -EIO, "%s: short read at byte %llu", sh->path, (unsigned long long)at);
            else
                wd_summer_feed(sum, buf, n);
        }
        sums[i] = wd_summer_end(sum, NULL);
    }
    wd_summer_free(sum);
    free(buf);
    return rc;
}

static int cmd_inspect(ctl *c, int argc, char **argv)
{
    wl_checkpoint ck;
    wl_moe moe;
    wd_error err = {0};
    uint64_t by_dtype[ST_DTYPE_COUNT], *sums = NULL;
    size_t n_by_dtype[ST_DTYPE_COUNT];
    double t0 = now(), secs;
    char a[32], hex[17];
    const char *path = NULL;
    bool want_sums = false;
    int rc;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--checksums") == 0)
            want_sums = true;
        else if (argv[i][0] == '-' || path)
            return usage_error("inspect: expected PATH [--checksums]");
        else
            path = argv[i];
    }
    if (!path)
        return usage_error("inspect: expected PATH [--checksums]");
    argv[1] = (char *)path;
    if ((rc = wl_checkpoint_open(argv[1], &ck, &err)))
        return report_error(c, "inspect", rc, wd_error_text(&err));
    if (want_sums && (!(sums = calloc(ck.n_tensors + 1, sizeof *sums)) ||
                      (rc = checkpoint_sums(&ck, sums, &err)))) {
        free(sums);
        wl_checkpoint_close(&ck);
        return report_error(c, "inspect", rc ? rc : -ENOMEM, rc ? wd_error_text(&err) : "out of memory");
    }
    secs = now() - t0;
    if ((rc = wl_moe_analyse(&ck, &moe, &err))) {
        wl_checkpoint_close(&ck);
        return report_error(c, "inspect", rc, wd_error_text(&err));
    }
    wl_checkpoint_dtype_totals(&ck, by_dtype, n_by_dtype);
    if (c->json) {
        cJSON *o = cJSON_CreateObject(), *shards, *dt;
        cJSON_AddBoolToObject(o, "ok", 1);
        cJSON_AddStringToObject(o, "path", argv[1]);
        if (ck.index_path)
            cJSON_AddStringToObject(o, "index", ck.index_path);
        cJSON_AddNumberToObject(o, "tensors", (double)ck.n_tensors);
        cJSON_AddNumberToObject(o, "bytes", (double)ck.total_bytes);
        cJSON_AddNumberToObject(o, "seconds", secs);
        dt = cJSON_AddObjectToObject(o, "dtypes");
        for (int d = 0; d < ST_DTYPE_COUNT; d++)
            if (n_by_dtype[d]) {
                cJSON *e = cJSON_AddObjectToObject(dt, st_dtype_name((st_dtype)d));
                cJSON_AddNumberToObject(e, "tensors", (double)n_by_dtype[d]);
                cJSON_AddNumberToObject(e, "bytes", (double)by_dtype[d]);
            }
        cJSON_AddItemToObject(o, "moe", moe_json(&moe));
        shards = cJSON_AddArrayToObject(o, "shards");
        for (size_t i = 0; i < ck.n_shards; i++) {
            cJSON *s = cJSON_CreateObject();
            cJSON_AddStringToObject(s, "path", ck.shards[i].path);
            cJSON_AddNumberToObject(s, "tensors", (double)ck.shards[i].st.n_tensors);
            cJSON_AddNumberToObject(s, "bytes", (double)ck.shards[i].st.data_len);
            cJSON_AddItemToArray(shards, s);
        }
        if (sums) {
            cJSON *cs = cJSON_AddObjectToObject(o, "checksums");
            for (size_t i = 0; i < ck.n_tensors; i++)
                cJSON_AddStringToObject(cs, ck.tensors[i].st->name, wd_sum_format(sums[i], hex));
        }
        print_json(o);
        cJSON_Delete(o);
    } else {
        printf("checkpoint: %s\n", argv[1]);
        if (ck.index_path)
            printf("index:      %s\n", ck.index_path);
        printf("valid:      yes (headers read in %.3f s)\n", secs);
        printf("tensors:    %zu in %zu shard%s\n", ck.n_tensors, ck.n_shards, ck.n_shards == 1 ? "" : "s");
        printf("bytes:      %llu (%s)\n", (unsigned long long)ck.total_bytes,
               wd_size_format(ck.total_bytes, a, sizeof a));
        printf("dtypes:    ");
        for (int d = 0; d < ST_DTYPE_COUNT; d++)
            if (n_by_dtype[d])
                printf(" %s %zu tensors %s;", st_dtype_name((st_dtype)d), n_by_dtype[d],
                       wd_size_format(by_dtype[d], a, sizeof a));
        printf("\n");
        moe_text(&moe, ck.total_bytes);
        printf("\nshards:\n");
        for (size_t i = 0; i < ck.n_shards; i++)
            printf("  %s: %zu tensors, %s\n", ck.shards[i].path, ck.shards[i].st.n_tensors,
                   wd_size_format(ck.shards[i].st.data_len, a, sizeof a));
        if (sums) {
            printf("\nchecksums (XXH3, as weightd computes them):\n");
            for (size_t i = 0; i < ck.n_tensors; i++)
                printf("  %s  %s\n", wd_sum_format(sums[i], hex), ck.tensors[i].st->name);
        }
    }
    free(sums);
    wl_moe_free(&moe);
    wl_checkpoint_close(&ck);
    return 0;
}

/* ---- the table and main ----------------------------------------------------------------- */

static const command commands[] = {
    {"load", cmd_load, "PATH [--name NAME] [--device D | --devices LIST] [--placement P] [--plan FILE]",
     "load a checkpoint (file, folder or index) onto devices, with progress;\n"
     "P: replicate (default) or expert-parallel (each layer's experts split\n"
     "across the devices); FILE: {\"devices\": [0, 1], \"placement\": P}"},
    {"unload", cmd_unload, "NAME [--force [--wait SECONDS]] [--keep-cached]",
     "free a model's memory, every segment back to the devices (--keep-cached:\n"
     "left in the allocator's cache); refused while workers are attached,\n"
     "unless --force: they are asked to detach, and waited for (10 s)"},
    {"sleep", cmd_sleep, "NAME [--offload|--discard] [--force]",
     "give every byte of a model back to its devices: --offload (default)\n"
     "keeps a copy in host memory, --discard reads the checkpoint again at\n"
     "wake; attached workers unmap it and keep their addresses (--force:\n"
     "those that do not answer in time lose their lease)"},
    {"wake", cmd_wake, "NAME", "bring a sleeping model back, at the same addresses in its workers"},
    {"list", cmd_list, "", "the models the daemon holds"},
    {"info", cmd_info, "NAME", "every tensor of a model: dtype, shape, and where it lives on each device"},
    {"verify", cmd_verify, "NAME [--quick]",
     "re-read the checkpoint and compare it byte for byte; --quick: hash every copy on the devices\n"
     "and compare with the checksums of the load (exit 1 on a difference)"},
    {"attach", cmd_attach, "NAME [--device D] [--verify] [--hold SECONDS] [--writable]",
     "map every tensor as a worker would; count, bytes and time; --verify:\n"
     "compare what is mapped with the checkpoint's files (exit 1 on a\n"
     "difference); --hold: keep the lease that long (a revoke ends it)"},
    {"leases", cmd_leases, "", "the workers attached: lease, model, pid, uid, process, age"},
    {"stats", cmd_stats, "", "allocator statistics per device and the policy in force"},
    {"policy", cmd_policy, "[CONF]", "the allocator policy in force; with CONF, change the keys it names"},
    {"snapshot", cmd_snapshot, "", "every segment and block of every device"},
    {"shutdown", cmd_shutdown, "", "stop the daemon (every segment released)"},
    {"inspect", cmd_inspect, "PATH [--checksums]", "validate and summarise a checkpoint, without a daemon"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: weightctl [--socket PATH] [--json] [--timeout SECONDS] COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        char left[160];
        const char *h = commands[i].help, *nl;
        snprintf(left, sizeof left, "%s %s", commands[i].name, commands[i].args);
        /* A long synopsis gets a line of its own; help lines stay in their column. */
        if (strlen(left) > 40)
            fprintf(f, "  %s\n%43s", left, "");
        else
            fprintf(f, "  %-40s ", left);
        while ((nl = strchr(h, '\n'))) {
            fprintf(f, "%.*s\n%43s", (int)(nl - h), h, "");
            h = nl + 1;
        }
        fprintf(f, "%s\n", h);
    }
    fprintf(f, "\noptions (before the command):\n"
               "  --socket PATH      the daemon's socket (default: $WEIGHTD_SOCKET, /run/weightd/weightd.sock\n"
               "                     as root, else $XDG_RUNTIME_DIR/weightd.sock)\n"
               "  --json             machine-readable output: one JSON object\n"
               "  --timeout SECONDS  give up when the daemon says nothing for this long (default 60; 0: never)\n"
               "\nexit status: 0 done, 1 failed (or verify found a difference), 2 usage error\n");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'}, {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 't'}, {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},       {NULL, 0, NULL, 0},
    };
    ctl c = {.timeout_ms = 60000};
    const command *cmd = NULL;
    int opt, rc;

    /* Options stop at the command: "+" keeps getopt from permuting. */
    while ((opt = getopt_long(argc, argv, "+h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's': c.socket = optarg; break;
        case 'j': c.json = true; break;
        case 't': {
            double secs;
            if (!parse_seconds(optarg, 1e6, &secs))
                return usage_error("--timeout: \"%s\" is not a number of seconds", optarg);
            c.timeout_ms = secs == 0 ? -1 : (int)ceil(secs * 1000);
            break;
        }
        case 'h': usage(stdout); return 0;
        case 'V': printf("weightctl %s\n", WD_VERSION); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[optind], commands[i].name) == 0)
            cmd = &commands[i];
    if (!cmd)
        return usage_error("unknown command \"%s\"", argv[optind]);
    rc = cmd->run(&c, argc - optind, argv + optind);
    wdc_close(c.client);
    return rc;
}
