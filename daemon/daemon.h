/* weightd's internals, shared by the files of daemon/. */
#ifndef WD_DAEMON_H
#define WD_DAEMON_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <cjson/cJSON.h>
#include <uv.h>

#include "allocator/allocator.h"
#include "common/errors.h"
#include "loader/checkpoint.h"
#include "loader/loader.h"
#include "loader/placement.h"
#include "proto/proto.h"

typedef struct wd_server wd_server;
typedef struct wd_conn wd_conn;
typedef struct wd_request wd_request;
typedef struct wd_model wd_model;
typedef struct wd_job wd_job;

/* ---- log.c --------------------------------------------------------------- */

#define WD_LOG_LEVELS(X) X(error) X(warning) X(notice) X(info) X(debug)
typedef enum wd_log_level {
#define X(name) WD_LOG_##name,
    WD_LOG_LEVELS(X)
#undef X
} wd_log_level;

int wd_log_level_parse(const char *text, wd_log_level *out);
void wd_log_set_level(wd_log_level level);
void wd_log(wd_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- config.c: the one option table -------------------------------------- */

/* X(name, type, default, metavar, help). The command-line flag is --name with
 * '_' as '-', the environment variable WEIGHTD_NAME, the config-file key name. */
#define WD_OPTION_TABLE(X)                                                                        \
    X(socket, STRING, "", "PATH",                                                                 \
      "listen on PATH (default: $WEIGHTD_SOCKET, /run/weightd/weightd.sock as root, "             \
      "else $XDG_RUNTIME_DIR/weightd.sock)")                                                      \
    X(backend, STRING, "host", "NAME", "where segments come from: host or fake (cuda, cuda-ipc where built)") \
    X(devices, STRING, "", "LIST", "GPUs to use, by index or UUID, comma-separated (cuda backends)") \
    X(host_devices, INT, "1", "N", "number of emulated devices (host backend)")                   \
    X(host_capacity, SIZE, "8GiB", "SIZE", "capacity of each emulated device (host backend)")      \
    X(device_capacity, SIZE, "0", "SIZE", "memory each GPU may hold (cuda backends; 0: what is free at start)") \
    X(read_threads, INT, "0", "N", "threads reading checkpoints (0: 3 for every 4 CPUs, 2 to 12)")   \
    X(staging_memory, SIZE, "0", "SIZE",                                                          \
      "pinned host memory for staging GPU loads, two buffers a reader (0: 4MiB buffers)")          \
    X(direct_io, STRING, "off", "MODE", "O_DIRECT reads for GPU loads: on or off (the page cache)")   \
    X(alloc_conf, STRING, "", "CONF", "allocator configuration in PYTORCH_CUDA_ALLOC_CONF syntax") \
    X(load_alloc_conf, STRING, WA_WEIGHTD_POLICY, "CONF",                                          \
      "allocator policy pushed for the length of each load (weightd's; vLLM's max_split_size_mb:20 " \
      "on backends without expandable segments)")                                                 \
    X(config, STRING, "", "FILE", "read options from FILE (key = value lines)")                   \
    X(log_level, LEVEL, "info", "LEVEL", "error, warning, notice, info or debug")                 \
    X(max_clients, INT, "256", "N", "most connections served at once")

typedef struct wd_config {
#define OPT_FIELD_STRING char *
#define OPT_FIELD_INT int64_t
#define OPT_FIELD_SIZE uint64_t
#define OPT_FIELD_LEVEL wd_log_level
#define X(name, type, def, meta, help) OPT_FIELD_##type name;
    WD_OPTION_TABLE(X)
#undef X
} wd_config;

/* Fills c from the defaults, the config file, the environment and argv, in
 * rising precedence. Returns 0, 1 when --help or --version was printed, or a
 * negative errno with err set; only after 0 does c need wd_config_free. */
int wd_config_load(wd_config *c, int argc, char **argv, FILE *out, wd_error *err);
void wd_config_free(wd_config *c);
void wd_config_usage(FILE *f);

/* ---- server.c: the loop, the socket, connections ------------------------- */

struct wd_conn {
    wd_server *srv;
    uint64_t serial;          /* for log lines */
    int fd;
    uv_poll_t poll;
    wp_reader rd;
    wp_writer wr;
    pid_t pid;
    uid_t uid;
    bool hello;               /* hello exchanged */
    bool closing;             /* closed once the writer drains */
    bool dead;                /* poll handle closed; memory freed in its close callback */
    wd_request *pending;      /* requests still to be answered */
    wd_conn *prev, *next;
};

struct wd_request {
    wd_conn *conn;            /* NULL once the client is gone */
    cJSON *id;
    cJSON *args;              /* {} when the request had none */
    char op[32];
    bool want_events;
    wd_error err;
    wd_request *prev, *next;  /* conn->pending */
};

struct wd_server {
    uv_loop_t *loop;
    wd_config *conf;
    wa_backend *backend;
    wa_allocator *alloc;
    wl_pipeline *pipeline;    /* the loads' readers and staging */
    char socket_path[108];
    int listen_fd;
    bool own_socket;          /* bound here (not passed by systemd): unlink on exit */
    uv_poll_t listen_poll;
    int signal_fd;            /* SIGINT and SIGTERM, blocked in every thread, read here */
    uv_poll_t signal_poll;
    uv_timer_t tick;          /* progress events and the systemd watchdog */
    uint64_t watchdog_usec;
    uint64_t next_serial;
    size_t n_conns;
    wd_conn *conns;
    wd_model *models;
    wd_job *jobs;             /* loads and verifies, in arrival order; one load runs at a time */
    uv_idle_t alloc_idle;     /* allocates the running load's tensors beside its reads (jobs.c) */
    wd_job *allocating;       /* that load, while it has tensors left to allocate */
    size_t jobs_running;      /* uv work items in flight */
    bool stopping;
    double started;
    int exit_code;
};

/* Blocks SIGINT and SIGTERM in the calling thread, and so in every thread
 * made after it: call first thing in main. */
void wd_block_stop_signals(void);
int wd_server_start(wd_server *s, uv_loop_t *loop, wd_config *conf, wd_error *err);
/* Begins an orderly stop: no new connections, jobs cancelled, then every
 * model freed and every handle closed; the loop then runs out. */
void wd_server_stop(wd_server *s, const char *why);
/* Called when a job ends, to finish a stop that waits for it. */
void wd_server_maybe_finish(wd_server *s);

/* The peer is the daemon's own user or root (SO_PEERCRED). */
bool wd_conn_privileged(const wd_conn *c);

/* Replies: each sends to the client (if it is still there) and frees r. */
void wd_reply_ok(wd_request *r, cJSON *result);
void wd_reply_error(wd_request *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void wd_reply_err(wd_request *r, const wd_error *e);
/* Sends an event for r without ending it (consumes ev). */
void wd_request_event(wd_request *r, cJSON *ev);

/* ---- ops.c: the operation table ------------------------------------------ */

/* A handler returns 0 when it replied or kept r to reply later, or a negative
 * errno with r->err set for the caller to send as the error reply. */
typedef int (*wd_op_fn)(wd_server *s, wd_request *r);
typedef struct wd_op {
    const char *name;
    wd_op_fn fn;
    bool privileged;          /* only the daemon's own user or root */
} wd_op;
const wd_op *wd_op_find(const char *name);

/* ---- registry.c: loaded models ------------------------------------------- */

typedef enum wd_model_state { WD_MODEL_LOADING, WD_MODEL_READY } wd_model_state;

struct wd_model {
    char *name;
    char *path;               /* as given, made absolute */
    wd_model_state state;
    int *devices;             /* where it lives, in the order asked for */
    size_t n_devices;
    wl_placement placement;
    wl_checkpoint ckpt;       /* headers, kept for info and verify */
    wl_dest *dest;            /* the tensors' runs on devices (placement.h), in tensor order */
    size_t n_dest;
    wa_block **blocks;        /* one per dest; NULL for an empty one */
    uint64_t device_bytes;    /* what the dests hold, on all devices together */
    double load_seconds;
    double loaded_at;         /* wall clock */
    unsigned busy;            /* verify jobs reading it */
    wd_model *next;
};

#define WD_MODEL_NAME_MAX 128
/* 0 or -EINVAL with err: 1..128 of [A-Za-z0-9._-], not starting with '.' or '-'. */
int wd_model_name_check(const char *name, wd_error *err);
wd_model *wd_registry_find(wd_server *s, const char *name);
/* A new model in the LOADING state, linked in. */
int wd_registry_add(wd_server *s, const char *name, const char *path, const int *devices, size_t n_devices,
                    wl_placement placement, wd_model **out, wd_error *err);
/* Unlinks m, frees its blocks and itself; with give_back, the cached
 * segments of its devices go back to them too. */
void wd_registry_remove(wd_server *s, wd_model *m, bool give_back);
size_t wd_registry_count(const wd_server *s);
/* "0" or "0,1": the model's devices, for people. */
const char *wd_model_devices_text(const wd_model *m, char *buf, size_t len);
cJSON *wd_model_devices_json(const wd_model *m);

/* ---- jobs.c: loads and verifies on worker threads ------------------------ */

int wd_load_start(wd_server *s, wd_request *r, const char *path, const char *name, const int *devices,
                  size_t n_devices, wl_placement placement, wd_error *err);
int wd_verify_start(wd_server *s, wd_request *r, wd_model *m, wd_error *err);
/* The client of r went away: cancel what it started (r is the caller's to free). */
void wd_jobs_request_gone(wd_server *s, wd_request *r);
/* Cancel every job (the daemon is stopping). */
void wd_jobs_cancel_all(wd_server *s);
/* Progress events for the running load (from the tick timer). */
void wd_jobs_progress(wd_server *s);
/* The load policy's state for stats: whether a load holds it now. */
bool wd_jobs_load_active(const wd_server *s);
/* Adds the jobs' state to a stats reply. */
void wd_jobs_describe(const wd_server *s, cJSON *out);

double wd_now(void);       /* monotonic seconds */
double wd_wall(void);      /* Unix time */

#endif
