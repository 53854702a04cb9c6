/* The operations of the protocol, one handler each, and their table. */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/checksum.h"
#include "common/size.h"
#include "common/fault.h"

#define INFO_PAGE_DEFAULT 1000
#define INFO_PAGE_BUDGET (768u * 1024u) /* bytes of tensor entries per reply, under WP_MAX_LINE */

static size_t op_count(void);
static const wd_op *op_at(size_t i);

/* The model r names, once it has finished loading. */
/* The model named in r's args, in the state READY (or also ASLEEP, for
 * operations an asleep model takes). */
static int find_model_in(wd_server *s, wd_request *r, bool asleep_too, wd_model **out)
{
    const char *name;
    wd_model_state st;
    int rc;

    if ((rc = wp_arg_string(r->args, "name", true, &name, &r->err)))
        return rc;
    if (!(*out = wd_registry_find(s, name)))
        return wd_error_set(&r->err, -ENOENT, "no model named \"%s\" is loaded", name);
    st = (*out)->state;
    if (st != WD_MODEL_READY && !(asleep_too && st == WD_MODEL_ASLEEP))
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is %s", name,
                            st == WD_MODEL_LOADING ? "still loading"
                            : st == WD_MODEL_UNLOADING ? "being unloaded"
                            : st == WD_MODEL_ASLEEP ? "asleep (weightctl wake it first)"
                                                    : wd_model_state_name(st));
    return 0;
}

static int find_model(wd_server *s, wd_request *r, wd_model **out)
{
    return find_model_in(s, r, false, out);
}

/* ---- hello ----------------------------------------------------------------- */

static int op_hello(wd_server *s, wd_request *r)
{
    const char *version;
    char *end;
    long major;
    cJSON *res, *ops;
    int rc;

    if ((rc = wp_arg_string(r->args, "version", true, &version, &r->err)))
        return rc;
    major = strtol(version, &end, 10);
    if (end == version || (*end != '.' && *end != '\0'))
        return wd_error_set(&r->err, -EINVAL, "protocol version \"%s\" is not MAJOR.MINOR", version);
    if (major != WP_VERSION_MAJOR)
        return wd_error_set(&r->err, -EPROTONOSUPPORT,
                            "protocol version %s is not supported; this weightd speaks %s", version, WP_VERSION);
    r->conn->hello = true;
    res = cJSON_CreateObject();
    cJSON_AddStringToObject(res, "version", WP_VERSION);
    cJSON_AddStringToObject(res, "server", "weightd " WD_VERSION);
    cJSON_AddStringToObject(res, "backend", s->backend->name);
    cJSON_AddNumberToObject(res, "devices", s->backend->n_devices);
    cJSON_AddNumberToObject(res, "pid", (double)getpid());
    ops = cJSON_AddArrayToObject(res, "ops");
    for (size_t i = 0; i < op_count(); i++)
        cJSON_AddItemToArray(ops, cJSON_CreateString(op_at(i)->name));
    wd_reply_ok(r, res);
    return 0;
}

/* ---- load / unload / verify ------------------------------------------------ */

/* The default name: the checkpoint folder's name, or a file's name without
 * ".safetensors". */
static void default_name(const char *path, char *out, size_t len)
{
    char tmp[4096];
    char *base, *dot;
    size_t n;

    snprintf(tmp, sizeof tmp, "%s", path);
    n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/')
        tmp[--n] = '\0';
    if ((n = strlen(tmp)) > 11 && strcmp(tmp + n - 11, ".index.json") == 0) {
        /* an index names its folder's model */
        if ((base = strrchr(tmp, '/')) && base != tmp)
            *base = '\0';
    }
    base = strrchr(tmp, '/');
    base = base ? base + 1 : tmp;
    if ((dot = strstr(base, ".safetensors")) && dot != base)
        *dot = '\0';
    snprintf(out, len, "%s", base);
}

/* The device whose UUID (as `stats` shows it, in any case) is text, or the
 * only one whose UUID starts with it. */
static int device_by_uuid(wd_server *s, wd_request *r, const char *text, int *out)
{
    size_t len = strlen(text);
    int matches = 0;

    for (int d = 0; len && d < s->backend->n_devices; d++) {
        wa_device_info info;
        if (s->backend->describe(s->backend, d, &info) || strncasecmp(info.uuid, text, len) != 0)
            continue;
        *out = d;
        if (info.uuid[len] == '\0') /* the whole UUID: no other can be meant */
            return 0;
        matches++;
    }
    if (matches == 1)
        return 0;
    if (matches > 1)
        return wd_error_set(&r->err, -EINVAL, "\"%.64s\" is the start of %d devices' UUIDs; give more of it", text,
                            matches);
    return wd_error_set(&r->err, -ENODEV, "no device with UUID \"%.64s\" here (see weightctl stats)", text);
}

/* A device named by its number (a JSON number, or a string of digits) or by
 * its UUID: as weightd's --devices and weightctl read them. */
int wd_device_arg(wd_server *s, wd_request *r, const cJSON *v, int *out)
{
    long d;

    if (cJSON_IsString(v) && !isdigit((unsigned char)v->valuestring[0]))
        return device_by_uuid(s, r, v->valuestring, out);
    if (cJSON_IsString(v)) {
        char *end;
        d = strtol(v->valuestring, &end, 10);
        if (*end || d > INT32_MAX)
            return wd_error_set(&r->err, -EINVAL, "\"%.64s\" is not a device number", v->valuestring);
    } else if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= INT32_MAX &&
               v->valuedouble == floor(v->valuedouble)) {
        d = (long)v->valuedouble;
    } else {
        return wd_error_set(&r->err, -EINVAL, "argument \"%s\" must hold device numbers or UUIDs",
                            v->string ? v->string : "devices");
    }
    if (d >= s->backend->n_devices)
        return wd_error_set(&r->err, -ENODEV, "no device %ld: this daemon has %d (0 to %d)", d,
                            s->backend->n_devices, s->backend->n_devices - 1);
    *out = (int)d;
    return 0;
}

/* "device": D, or "devices": [D, ...] with "placement" (placement.h), each D
 * a number or a UUID. Each device once, each one this daemon has. */
static int load_devices(wd_server *s, wd_request *r, int *devices, size_t *n, wl_placement *placement)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(r->args, "devices"), *v;
    const cJSON *one = cJSON_GetObjectItemCaseSensitive(r->args, "device");
    const char *text;
    int rc;

    *n = 0;
    *placement = WL_REPLICATE;
    if (one && !cJSON_IsNull(one) && list && !cJSON_IsNull(list))
        return wd_error_set(&r->err, -EINVAL, "give \"device\" or \"devices\", not both");
    if (!list || cJSON_IsNull(list)) {
        devices[0] = 0;
        if (one && !cJSON_IsNull(one) && (rc = wd_device_arg(s, r, one, &devices[0])))
            return rc;
        *n = 1;
    } else {
        if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) < 1)
            return wd_error_set(&r->err, -EINVAL,
                                "argument \"devices\" must be a non-empty array of device numbers or UUIDs");
        cJSON_ArrayForEach(v, list) {
            int d;
            if ((rc = wd_device_arg(s, r, v, &d)))
                return rc;
            for (size_t i = 0; i < *n; i++)
                if (devices[i] == d)
                    return wd_error_set(&r->err, -EINVAL, "device %d is listed twice", d);
            /* Distinct devices of this daemon's: devices[] has room. */
            devices[(*n)++] = d;
        }
    }
    if ((rc = wp_arg_string(r->args, "placement", false, &text, &r->err)) == -EINVAL)
        return rc;
    if (rc == 0 && wl_placement_parse(text, placement))
        return wd_error_set(&r->err, -EINVAL, "placement \"%s\" is not replicate or expert-parallel", text);
    return 0;
}

/* {"path", "name"?, "device"? | "devices"?, "placement"?, "files"?}.
 * With "files" (the checkpoint's files as paths, an index first), the
 * descriptors sent with the request are what is read: the client opened
 * them, so the daemon reads only what its peer could. Without, the daemon
 * opens path itself, which only a peer that can read whatever the daemon
 * can (root, or its own user) may ask. */
static int op_load(wd_server *s, wd_request *r)
{
    const char *path, *name = NULL;
    char defname[WD_MODEL_NAME_MAX + 1];
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(r->args, "files"), *f;
    char **names = NULL;
    wl_placement placement;
    int *devices = NULL;
    size_t n_devices, n_files = 0;
    int rc;

    if ((rc = wp_arg_string(r->args, "path", true, &path, &r->err)))
        return rc;
    if (path[0] != '/')
        return wd_error_set(&r->err, -EINVAL, "path \"%s\" must be absolute (the daemon has its own working directory)",
                            path);
    if (strlen(path) >= 4096)
        return wd_error_set(&r->err, -ENAMETOOLONG, "path too long");
    if (!r->n_fds && !wd_conn_privileged(r->conn))
        return wd_error_set(&r->err, -EPERM, "uid %d must send the checkpoint's files with the request (\"files\" "
                            "and their descriptors; weightctl load does): the daemon opens a path itself only for "
                            "root and its own user", (int)r->conn->uid);
    if ((rc = wp_arg_string(r->args, "name", false, &name, &r->err)) && rc != -ENOENT)
        return rc;
    if (!name) {
        default_name(path, defname, sizeof defname);
        name = defname;
    }
    if (r->n_fds) {
        if (!(names = wd_calloc(r->n_fds, sizeof *names)))
            return wd_error_set(&r->err, -ENOMEM, "out of memory");
        cJSON_ArrayForEach(f, files) {
            if (!cJSON_IsString(f) || f->valuestring[0] != '/' || strlen(f->valuestring) >= 4096) {
                rc = wd_error_set(&r->err, -EINVAL, "argument \"files\" must hold absolute paths");
                goto out;
            }
            names[n_files++] = f->valuestring;
        }
    }
    if (!(devices = wd_malloc((size_t)s->backend->n_devices * sizeof *devices))) {
        rc = wd_error_set(&r->err, -ENOMEM, "out of memory");
        goto out;
    }
    if (!(rc = load_devices(s, r, devices, &n_devices, &placement)))
        rc = wd_load_start(s, r, path, name, devices, n_devices, placement, names, n_files, &r->err);
out:
    free(names);
    free(devices);
    return rc;
}

/* {"name", "force"?, "wait"?}: with force, holders are asked to detach and
 * waited for, up to wait seconds (default 10). */
static int op_unload(wd_server *s, wd_request *r)
{
    wd_model *m;
    bool force = false, keep_cached = false;
    int64_t wait = 10;
    int rc;

    if ((rc = find_model_in(s, r, true, &m)))
        return rc;
    if ((rc = wp_arg_bool(r->args, "keep_cached", &keep_cached, &r->err)) == -EINVAL ||
        (rc = wp_arg_bool(r->args, "force", &force, &r->err)) == -EINVAL ||
        (rc = wp_arg_int(r->args, "wait", false, 0, 3600, &wait, &r->err)) == -EINVAL)
        return rc;
    return wd_model_unload(s, m, r, force, (double)wait, keep_cached);
}

/* {"name", "quick"?}: the files against the devices byte for byte, or
 * (quick) every copy on the devices against the checksums of the load. */
static int op_verify(wd_server *s, wd_request *r)
{
    wd_model *m;
    bool quick = false;
    int rc;

    if ((rc = find_model(s, r, &m)))
        return rc;
    if ((rc = wp_arg_bool(r->args, "quick", &quick, &r->err)) == -EINVAL)
        return rc;
    return wd_verify_start(s, r, m, quick, &r->err);
}

/* ---- list / info ----------------------------------------------------------- */

#define SUMMARY_LEASES 32 /* holders a model's summary names; `leases` lists every one */
#define LIST_PAGE_DEFAULT 100

/* m as list and info show it to the client of viewer. */
static cJSON *model_summary(const wd_model *m, const wd_conn *viewer)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddStringToObject(o, "name", m->name);
    cJSON_AddStringToObject(o, "path", m->path);
    cJSON_AddStringToObject(o, "state", wd_model_state_name(m->state));
    if (wd_sleep_where(m)) /* "host": offloaded; "checkpoint": discarded, read again at wake */
        cJSON_AddStringToObject(o, "sleeps_in", wd_sleep_where(m));
    cJSON_AddItemToObject(o, "devices", wd_model_devices_json(m));
    cJSON_AddStringToObject(o, "placement", wl_placement_name(m->placement));
    cJSON_AddNumberToObject(o, "tensors", (double)m->ckpt.n_tensors);
    cJSON_AddNumberToObject(o, "shards", (double)m->ckpt.n_shards);
    cJSON_AddNumberToObject(o, "bytes", (double)m->ckpt.total_bytes);
    cJSON_AddNumberToObject(o, "device_bytes", (double)m->device_bytes);
    if (m->state != WD_MODEL_LOADING) {
        cJSON_AddNumberToObject(o, "load_seconds", m->load_seconds);
        cJSON_AddNumberToObject(o, "loaded_at", m->loaded_at);
        cJSON_AddNumberToObject(o, "slabs", (double)m->n_slabs);
        cJSON_AddNumberToObject(o, "shards_replaced", (double)m->shards_replaced);
    }
    cJSON_AddNumberToObject(o, "lease_count", (double)wd_model_lease_count(m));
    cJSON_AddItemToObject(o, "leases", wd_model_leases_json(m, viewer, SUMMARY_LEASES));
    return o;
}

/* {"offset"?, "limit"?}: the models, a page at a time ("next": the offset
 * of the following page, or null). */
static int op_list(wd_server *s, wd_request *r)
{
    int64_t offset = 0, limit = LIST_PAGE_DEFAULT, i = 0;
    size_t budget = 0;
    cJSON *res, *arr;
    wd_model *m;
    int rc;

    if ((rc = wp_arg_int(r->args, "offset", false, 0, INT32_MAX, &offset, &r->err)) == -EINVAL ||
        (rc = wp_arg_int(r->args, "limit", false, 1, 1000, &limit, &r->err)) == -EINVAL)
        return rc;
    res = cJSON_CreateObject();
    arr = cJSON_AddArrayToObject(res, "models");
    for (m = s->models; m && i < offset; m = m->next)
        i++;
    for (; m && i < offset + limit; m = m->next, i++) {
        /* a summary: its strings, its devices and up to SUMMARY_LEASES holders */
        size_t cost = strlen(m->name) + strlen(m->path) + 8 * m->n_devices + 400 + 200 * SUMMARY_LEASES;
        if (budget + cost > INFO_PAGE_BUDGET && i > offset)
            break;
        budget += cost;
        cJSON_AddItemToArray(arr, model_summary(m, r->conn));
    }
    if (m)
        cJSON_AddNumberToObject(res, "next", (double)i);
    else
        cJSON_AddNullToObject(res, "next");
    wd_reply_ok(r, res);
    return 0;
}

/* Where each run of a tensor's bytes lives: one entry per device holding it
 * (two for a replicated tensor on two devices, one per device's rows for a
 * split fused expert tensor). */
cJSON *wd_tensor_json(const wd_model *m, size_t i)
{
    const st_tensor *t = m->ckpt.tensors[i].st;
    cJSON *o = cJSON_CreateObject(), *shape;
    char sum[17];

    cJSON_AddStringToObject(o, "name", t->name);
    cJSON_AddStringToObject(o, "dtype", st_dtype_name(t->dtype));
    shape = cJSON_AddArrayToObject(o, "shape");
    for (size_t k = 0; k < t->ndim; k++)
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[k]));
    cJSON_AddNumberToObject(o, "bytes", (double)st_tensor_nbytes(t));
    if (m->sums && m->state != WD_MODEL_LOADING)
        cJSON_AddStringToObject(o, "checksum", wd_sum_format(m->sums[i], sum));
    return o;
}

static cJSON *tensor_placements(const wd_model *m, size_t first, size_t n)
{
    cJSON *arr = cJSON_CreateArray();

    for (size_t i = first; i < first + n; i++) {
        const wl_dest *d = &m->dest[i];
        const wd_part *p = &m->part[i];
        cJSON *o = cJSON_CreateObject();
        wa_region reg = {0};
        if (p->slab != WD_NO_SLAB)
            wa_block_region(m->slabs[p->slab].block, &reg);
        cJSON_AddNumberToObject(o, "device", d->device);
        cJSON_AddNumberToObject(o, "segment", reg.segment_id);
        cJSON_AddNumberToObject(o, "offset", (double)d->offset); /* in the segment; 0 for an empty part */
        if (p->slab != WD_NO_SLAB)
            cJSON_AddNumberToObject(o, "slab", p->slab);
        cJSON_AddNumberToObject(o, "tensor_offset", (double)d->tensor_off);
        cJSON_AddNumberToObject(o, "bytes", (double)d->len);
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

static int op_info(wd_server *s, wd_request *r)
{
    wd_model *m;
    int64_t offset = 0, limit = INFO_PAGE_DEFAULT;
    uint64_t by_dtype[ST_DTYPE_COUNT];
    size_t budget = 0, i, target = 0;
    cJSON *res, *arr, *dt, *slabs;
    int rc;

    if ((rc = find_model(s, r, &m)))
        return rc;
    if ((rc = wp_arg_int(r->args, "offset", false, 0, INT32_MAX, &offset, &r->err)) == -EINVAL ||
        (rc = wp_arg_int(r->args, "limit", false, 1, 100000, &limit, &r->err)) == -EINVAL)
        return rc;
    res = model_summary(m, r->conn);
    /* Where the model's memory is: each slab, one allocation (attach maps it
     * with one handle). */
    slabs = cJSON_AddArrayToObject(res, "slab_list");
    for (size_t k = 0; k < m->n_slabs; k++) {
        cJSON *o = cJSON_CreateObject();
        wa_region reg;
        wa_block_region(m->slabs[k].block, &reg);
        cJSON_AddNumberToObject(o, "slab", (double)k);
        cJSON_AddNumberToObject(o, "device", m->slabs[k].device);
        cJSON_AddNumberToObject(o, "bytes", (double)m->slabs[k].bytes);
        cJSON_AddNumberToObject(o, "segment", reg.segment_id);
        cJSON_AddNumberToObject(o, "offset", (double)reg.offset);
        cJSON_AddItemToArray(slabs, o);
    }
    dt = cJSON_AddObjectToObject(res, "dtypes");
    wl_checkpoint_dtype_totals(&m->ckpt, by_dtype, NULL);
    for (int d = 0; d < ST_DTYPE_COUNT; d++)
        if (by_dtype[d])
            cJSON_AddNumberToObject(dt, st_dtype_name((st_dtype)d), (double)by_dtype[d]);
    cJSON_AddNumberToObject(res, "offset", (double)offset);
    arr = cJSON_AddArrayToObject(res, "tensor_list");
    /* Dests are in tensor order: skip to the page's first tensor. */
    while (target < m->n_dest && m->dest[target].tensor < (uint64_t)offset)
        target++;
    for (i = (size_t)offset; i < m->ckpt.n_tensors && i < (size_t)(offset + limit); i++) {
        const st_tensor *t = m->ckpt.tensors[i].st;
        cJSON *o;
        size_t parts = 0, cost;
        while (target + parts < m->n_dest && m->dest[target + parts].tensor == i)
            parts++;
        cost = strlen(t->name) + 24 * t->ndim + 120 + 120 * parts;
        if (budget + cost > INFO_PAGE_BUDGET)
            break;
        budget += cost;
        o = wd_tensor_json(m, i);
        cJSON_AddItemToObject(o, "placements", tensor_placements(m, target, parts));
        target += parts;
        cJSON_AddItemToArray(arr, o);
    }
    if (i < m->ckpt.n_tensors)
        cJSON_AddNumberToObject(res, "next", (double)i);
    else
        cJSON_AddNullToObject(res, "next");
    wd_reply_ok(r, res);
    return 0;
}

/* ---- stats ----------------------------------------------------------------- */

static cJSON *policy_state(wd_server *s)
{
    cJSON *o = cJSON_CreateObject();
    char conf[512];

    cJSON_AddStringToObject(o, "current", wa_config_format(wa_get_config(s->alloc), conf, sizeof conf));
    cJSON_AddNumberToObject(o, "depth", (double)wa_policy_depth(s->alloc));
    cJSON_AddBoolToObject(o, "load_policy_active", wd_jobs_load_active(s));
    cJSON_AddStringToObject(o, "load", s->load_policy);
    return o;
}


/* {"jobs_offset"?}: the daemon's figures, with its jobs a page at a time. */
static int op_stats(wd_server *s, wd_request *r)
{
    cJSON *res, *devs;
    int64_t jobs_offset = 0;
    int rc;

    if ((rc = wp_arg_int(r->args, "jobs_offset", false, 0, INT32_MAX, &jobs_offset, &r->err)) == -EINVAL)
        return rc;
    res = cJSON_CreateObject();

    cJSON_AddStringToObject(res, "backend", s->backend->name);
    cJSON_AddNumberToObject(res, "uptime", wd_now() - s->started);
    cJSON_AddNumberToObject(res, "models", (double)wd_registry_count(s));
    cJSON_AddNumberToObject(res, "connections", (double)s->n_conns);
    cJSON_AddItemToObject(res, "policy", policy_state(s));
    cJSON_AddItemToObject(res, "fd_store", wd_fdstore_json(s));
    /* The values in force (a reload changes the live ones); who else is an
     * administrator is an administrator's business. */
    cJSON_AddItemToObject(res, "options", wd_config_json(s->conf, r->conn && r->conn->role == WD_ROLE_ADMIN));
    wd_jobs_describe(s, res, (size_t)jobs_offset);
    devs = cJSON_AddArrayToObject(res, "devices");
    for (int d = 0; d < wa_device_count(s->alloc); d++) {
        cJSON *o = cJSON_CreateObject();
        wa_device_info info;
        wa_stats st;
        wa_get_stats(s->alloc, d, &st);
        s->backend->describe(s->backend, d, &info);
        cJSON_AddNumberToObject(o, "device", d);
        cJSON_AddStringToObject(o, "name", info.name);
        cJSON_AddStringToObject(o, "uuid", info.uuid);
        cJSON_AddNumberToObject(o, "capacity", (double)st.capacity);
        cJSON_AddNumberToObject(o, "free_bytes", (double)s->backend->free_bytes(s->backend, d));
#define X(name, what)                                                            \
        {                                                                        \
            cJSON *v = cJSON_AddObjectToObject(o, #name);                        \
            cJSON_AddNumberToObject(v, "current", (double)st.name.current);      \
            cJSON_AddNumberToObject(v, "peak", (double)st.name.peak);            \
        }
        WA_STAT_LIST(X)
#undef X
#define X(name, what) cJSON_AddNumberToObject(o, #name, (double)st.name);
        WA_COUNTER_LIST(X)
#undef X
        cJSON_AddNumberToObject(o, "largest_free_block", (double)st.largest_free_block);
        cJSON_AddNumberToObject(o, "fragmentation", st.fragmentation);
        cJSON_AddItemToArray(devs, o);
    }
    wd_reply_ok(r, res);
    return 0;
}

/* ---- policy ---------------------------------------------------------------- */

/* Without "conf": the policy in force. With it: the keys it names change in
 * the configuration in force between loads ("default": every key back to
 * its default). Not while a load holds its policy: the pop at its end
 * restores what was there when it began. */
static int op_policy(wd_server *s, wd_request *r)
{
    const char *text;
    wa_config next;
    char conf[512];
    int rc;

    if ((rc = wp_arg_string(r->args, "conf", false, &text, &r->err)) == -EINVAL)
        return rc;
    if (rc == 0) {
        if ((rc = wd_auth_require(r, WD_ROLE_ADMIN, "setting the policy")))
            return rc;
        if (wa_policy_depth(s->alloc) || wd_jobs_load_active(s))
            return wd_error_set(&r->err, -EBUSY, "a load is running (it holds the load policy, or is about to); "
                                "change the policy after it");
        if ((rc = wa_config_parse(text, wa_get_config(s->alloc), WA_CONF_OVERLAY, &next, &r->err)))
            return rc;
        if ((rc = wa_set_config(s->alloc, &next)))
            return wd_error_set(&r->err, rc, "the %s backend cannot apply \"%s\"", s->backend->name, text);
        wd_log(WD_LOG_notice, "allocator policy now %s", wa_config_format(&next, conf, sizeof conf));
    }
    wd_reply_ok(r, policy_state(s));
    return 0;
}

/* ---- snapshot -------------------------------------------------------------- */

/* One device's segments and blocks, in address order, from (segment, block)
 * on, as much as fits a message; "next" says where the following page starts. */
static int op_snapshot(wd_server *s, wd_request *r)
{
    int64_t device = 0, seg0 = 0, blk0 = 0;
    wa_snap_segment *segs;
    size_t n, budget = 0, i, j = 0, next_block = 0;
    cJSON *res, *arr, *next;
    int rc;

    if ((rc = wp_arg_int(r->args, "device", false, 0, INT32_MAX, &device, &r->err)) == -EINVAL ||
        (rc = wp_arg_int(r->args, "segment", false, 0, INT32_MAX, &seg0, &r->err)) == -EINVAL ||
        (rc = wp_arg_int(r->args, "block", false, 0, INT32_MAX, &blk0, &r->err)) == -EINVAL)
        return rc;
    if (device >= wa_device_count(s->alloc))
        return wd_error_set(&r->err, -ENODEV, "no device %lld", (long long)device);
    if ((rc = wa_snapshot(s->alloc, (int)device, &segs, &n)))
        return wd_error_set(&r->err, rc, "snapshot: %s", wd_strerror(rc));
    res = cJSON_CreateObject();
    cJSON_AddNumberToObject(res, "device", (double)device);
    cJSON_AddNumberToObject(res, "segments_total", (double)n);
    arr = cJSON_AddArrayToObject(res, "segments");
    for (i = (size_t)seg0; i < n && budget < INFO_PAGE_BUDGET; i++, blk0 = 0) {
        const wa_snap_segment *sg = &segs[i];
        cJSON *o = cJSON_CreateObject(), *blocks;
        cJSON_AddNumberToObject(o, "id", sg->id);
        cJSON_AddNumberToObject(o, "address", (double)sg->addr);
        cJSON_AddNumberToObject(o, "size", (double)sg->size);
        cJSON_AddNumberToObject(o, "mapped", (double)sg->mapped);
        cJSON_AddStringToObject(o, "pool", sg->small_pool ? "small" : "large");
        cJSON_AddBoolToObject(o, "expandable", sg->expandable);
        cJSON_AddNumberToObject(o, "first_block", (double)blk0);
        blocks = cJSON_AddArrayToObject(o, "blocks");
        for (j = (size_t)blk0; j < sg->n_blocks && budget < INFO_PAGE_BUDGET; j++) {
            const wa_snap_block *b = &sg->blocks[j];
            cJSON *bo = cJSON_CreateObject();
            cJSON_AddNumberToObject(bo, "address", (double)b->addr);
            cJSON_AddNumberToObject(bo, "size", (double)b->size);
            cJSON_AddNumberToObject(bo, "requested", (double)b->requested);
            cJSON_AddStringToObject(bo, "state", b->allocated ? "allocated" : b->mapped ? "free" : "unmapped");
            cJSON_AddItemToArray(blocks, bo);
            budget += 160;
        }
        budget += 200;
        cJSON_AddItemToArray(arr, o);
        if (j < sg->n_blocks) {
            next_block = j; /* the rest of this segment comes on the next page */
            break;
        }
    }
    if (i < n) {
        next = cJSON_AddObjectToObject(res, "next");
        cJSON_AddNumberToObject(next, "segment", (double)i);
        cJSON_AddNumberToObject(next, "block", (double)next_block);
    } else {
        cJSON_AddNullToObject(res, "next");
    }
    wa_snapshot_free(segs, n);
    wd_reply_ok(r, res);
    return 0;
}

/* ---- shutdown -------------------------------------------------------------- */

static int op_shutdown(wd_server *s, wd_request *r)
{
    cJSON *res = cJSON_CreateObject();

    cJSON_AddBoolToObject(res, "stopping", 1);
    wd_reply_ok(r, res);
    wd_server_stop(s, "shutdown requested");
    return 0;
}

/* ---- the table ------------------------------------------------------------- */

/* Who may call what. Readers inspect and attach; administrators change
 * what the daemon holds, read files, see addresses, and stop it. policy
 * is a reader's to read and an administrator's to set (op_policy). */
#define READER WD_ROLE_READER
#define ADMIN WD_ROLE_ADMIN
static const wd_op op_table[] = {
    /* name       handler       role    fds    lasts */
    {"hello",    op_hello,     READER, false, false},
    {"load",     op_load,      ADMIN,  true,  true},
    {"unload",   op_unload,    ADMIN,  false, true},
    {"verify",   op_verify,    ADMIN,  false, true},
    {"list",     op_list,      READER, false, false},
    {"info",     op_info,      READER, false, false},
    {"attach",   wd_op_attach, READER, false, false},
    {"detach",   wd_op_detach, READER, false, false},
    {"reattach", wd_op_reattach, READER, false, false},
    {"leases",   wd_op_leases, READER, false, false},
    {"stats",    op_stats,     READER, false, false},
    {"policy",   op_policy,    READER, false, false},
    {"snapshot", op_snapshot,  ADMIN,  false, false},
    {"sleep",    wd_op_sleep,  ADMIN,  false, true},
    {"wake",     wd_op_wake,   ADMIN,  false, true},
    {"slept",    wd_op_slept,  READER, false, false},
    {"shutdown", op_shutdown,  ADMIN,  false, false},
};
#undef READER
#undef ADMIN

static size_t op_count(void)
{
    return sizeof op_table / sizeof op_table[0];
}

static const wd_op *op_at(size_t i)
{
    return &op_table[i];
}

const wd_op *wd_op_find(const char *name)
{
    for (size_t i = 0; i < sizeof op_table / sizeof op_table[0]; i++)
        if (strcmp(op_table[i].name, name) == 0)
            return &op_table[i];
    return NULL;
}
