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
typedef struct wd_lease wd_lease;
typedef struct wd_sleep wd_sleep;
typedef struct wd_attach_table wd_attach_table;

/* ---- log.c --------------------------------------------------------------- */

#define WD_LOG_LEVELS(X) X(error) X(warning) X(notice) X(info) X(debug)
typedef enum wd_log_level {
#define X(name) WD_LOG_##name,
    WD_LOG_LEVELS(X)
#undef X
} wd_log_level;

int wd_log_level_parse(const char *text, wd_log_level *out);
const char *wd_log_level_name(wd_log_level level);
void wd_log_set_level(wd_log_level level);
void wd_log(wd_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* For what a peer can trigger at will (bad requests, refusals, drops): at
 * most the configured lines a second (0: no limit), the rest counted. */
void wd_log_peer(wd_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void wd_log_set_peer_rate(unsigned per_second);

/* ---- config.c: the one option table -------------------------------------- */

/* X(name, type, default, metavar, when, help). The command-line flag is
 * --name with '_' as '-', the environment variable WEIGHTD_NAME, the
 * config-file key name.
 *
 * when: LIVE options take a new value from the config file on SIGHUP
 * (reload.c); RESTART ones keep the value they started with until the next
 * start. LIVE are those read afresh at each use, on the loop's thread, that
 * no state made earlier depends on: the log's level and rate; the bounds,
 * checked at each accept and request (what is connected or in flight
 * already stays) and at each tick (a shorter timeout applies to every
 * connection); the administrator lists (every connection's role is computed
 * again); and what a load or an attach reads when it starts (slab_size and
 * checksums: each model keeps what it was loaded with; attach_writable:
 * mappings already given stay as they are). RESTART are
 * what was made once at start: the socket and its mode, the devices, the
 * readers and their staging, the allocator's configuration (weightctl
 * policy changes it while running) and the load policy, which is checked
 * against the backend by a push and a pop that cannot happen while a load
 * holds it. */
#define WD_OPTION_TABLE(X)                                                                        \
    X(socket, STRING, "", "PATH", RESTART,                                                        \
      "listen on PATH (default: $WEIGHTD_SOCKET, /run/weightd/weightd.sock as root, "             \
      "else $XDG_RUNTIME_DIR/weightd.sock)")                                                      \
    X(backend, STRING, "host", "NAME", RESTART,                                                   \
      "where segments come from: host or fake (cuda, cuda-ipc where built)")                      \
    X(devices, STRING, "", "LIST", RESTART, "GPUs to use, by index or UUID, comma-separated (cuda backends)") \
    X(host_devices, INT, "1", "N", RESTART, "number of emulated devices (host backend)")          \
    X(host_capacity, SIZE, "8GiB", "SIZE", RESTART, "capacity of each emulated device (host backend)") \
    X(device_capacity, SIZE, "0", "SIZE", RESTART,                                                \
      "memory each GPU may hold (cuda backends; 0: what is free at start)")                       \
    X(read_threads, INT, "0", "N", RESTART, "threads reading checkpoints (0: 3 for every 4 CPUs, 2 to 12)") \
    X(staging_memory, SIZE, "0", "SIZE", RESTART,                                                 \
      "pinned host memory for staging GPU loads, two buffers a reader (0: 4MiB buffers)")          \
    X(direct_io, BOOL, "off", "on|off", RESTART, "O_DIRECT reads for GPU loads (off: the page cache)") \
    X(alloc_conf, STRING, "", "CONF", RESTART,                                                    \
      "allocator configuration in PYTORCH_CUDA_ALLOC_CONF syntax (weightctl policy changes it while running)") \
    X(load_alloc_conf, STRING, WA_WEIGHTD_POLICY, "CONF", RESTART,                                \
      "allocator policy pushed for the length of each load (weightd's; vLLM's max_split_size_mb:20 " \
      "on backends without expandable segments)")                                                 \
    X(config, STRING, "", "FILE", RESTART, "read options from FILE (key = value lines)")          \
    X(log_level, LEVEL, "info", "LEVEL", LIVE, "error, warning, notice, info or debug")           \
    X(max_clients, INT, "1024", "N", LIVE,                                                        \
      "most connections served at once (administrators get 16 more)")                            \
    X(max_clients_per_uid, INT, "128", "N", LIVE, "most connections of one user who is not an administrator") \
    X(max_requests_per_client, INT, "64", "N", LIVE, "most requests of one connection in flight at once") \
    X(max_requests_per_uid, INT, "256", "N", LIVE, "most requests of one user in flight at once")  \
    X(max_leases_per_client, INT, "64", "N", LIVE, "most leases (attached models) one connection holds") \
    X(max_leases_per_uid, INT, "1024", "N", LIVE,                                                 \
      "most leases the connections of one user who is not an administrator hold together")        \
    X(hello_timeout, INT, "10", "SECONDS", LIVE, "close a connection that has not said hello by then") \
    X(idle_timeout, INT, "900", "SECONDS", LIVE,                                                  \
      "close a connection idle this long that holds no lease and waits for nothing (0: never)")   \
    X(listen_backlog, INT, "4096", "N", RESTART,                                                  \
      "connections waiting to be accepted (capped by net.core.somaxconn)")                        \
    X(log_rate, INT, "10", "N", LIVE, "lines a second at most about clients' bad requests and refusals (0: all)") \
    X(admin_uids, STRING, "", "LIST", LIVE,                                                       \
      "users (names or uids, comma-separated) who may load, unload, verify, sleep, wake, set the " \
      "policy, snapshot and shut down, besides root and the daemon's own user")                   \
    X(admin_groups, STRING, "", "LIST", LIVE, "groups (names or gids) whose members are administrators too") \
    X(socket_mode, STRING, "0660", "MODE", RESTART, "permissions of the socket the daemon binds itself") \
    X(socket_group, STRING, "", "GROUP", RESTART,                                                 \
      "group of the socket the daemon binds itself (members may connect)")                        \
    X(slab_size, SIZE, "0", "SIZE", LIVE,                                                         \
      "a model's memory on a device comes in slabs of about SIZE, each one allocation that a "    \
      "worker maps with one handle (0: a 32nd of the model's bytes there, at least 256MiB)")     \
    X(checksums, BOOL, "on", "on|off", LIVE,                                                      \
      "an XXH3 checksum of each tensor, computed while it loads (info shows them, verify --quick " \
      "checks the devices' copies against them)")                                                 \
    X(attach_writable, BOOL, "off", "on|off", LIVE,                                               \
      "let the daemon's own user and root attach writable (workers get read-only mappings)")        \
    X(lease_grace, INT, "120", "SECONDS", RESTART,                                                \
      "after a restart, how long a lease kept in the fd store waits for its worker to take it again") \
    X(sleep_timeout, INT, "10", "SECONDS", LIVE,                                                  \
      "how long sleep waits for attached workers to unmap a model before it gives up, naming them") \
    X(sleep_pin, BOOL, "off", "on|off", LIVE,                                                     \
      "pin a sleeping model's host copy (cuda): its wake copies from it directly, its sleep takes longer")

typedef enum wd_option_id {
#define X(name, type, def, meta, when, help) WD_OPT_##name,
    WD_OPTION_TABLE(X)
#undef X
    WD_OPTION_COUNT
} wd_option_id;

/* Where an option's value came from, in rising precedence. */
typedef enum wd_option_origin {
    WD_ORIGIN_DEFAULT,
    WD_ORIGIN_FILE,
    WD_ORIGIN_ENVIRONMENT,
    WD_ORIGIN_COMMAND_LINE,
} wd_option_origin;

typedef struct wd_config {
#define OPT_FIELD_STRING char *
#define OPT_FIELD_INT int64_t
#define OPT_FIELD_SIZE uint64_t
#define OPT_FIELD_LEVEL wd_log_level
#define OPT_FIELD_BOOL bool
#define X(name, type, def, meta, when, help) OPT_FIELD_##type name;
    WD_OPTION_TABLE(X)
#undef X
    wd_option_origin origin[WD_OPTION_COUNT];
    unsigned line[WD_OPTION_COUNT]; /* the config file's line, for WD_ORIGIN_FILE */
    /* The command line it was loaded from (a copy), which a reload reads again. */
    int argc;
    char **argv;
} wd_config;

/* Fills c from the defaults, the config file, the environment and argv, in
 * rising precedence. Returns 0, 1 when --help, --version or --print-config
 * was printed, or a negative errno with err set; only after 0 does c need
 * wd_config_free. */
int wd_config_load(wd_config *c, int argc, char **argv, FILE *out, wd_error *err);
/* Loads next as running was loaded, from the config file as it is now: the
 * same command line and environment still win over it. Validates every
 * value; 0 or a negative errno with err naming the file, line and problem. */
int wd_config_reload(const wd_config *running, wd_config *next, wd_error *err);
void wd_config_free(wd_config *c);
void wd_config_usage(FILE *f);
/* A config file with every option of the table at its default, commented
 * out, each with its help (--print-config; make install puts it in
 * /etc/weightd/weightd.conf). 0, or -EIO when f could not be written. */
int wd_config_template(FILE *f);

const char *wd_option_name(wd_option_id id);
/* A reload applies the option's new value (its table's `when` is LIVE). */
bool wd_option_live(wd_option_id id);
/* Where c's value of id came from, for messages: "FILE:LINE", "WEIGHTD_NAME",
 * "--name" or "the default". */
const char *wd_config_origin(const wd_config *c, wd_option_id id, char *buf, size_t len);
/* Prefixes err's message with where c's value of id came from (unless it is
 * the default); returns err's code. */
int wd_config_error_origin(const wd_config *c, wd_option_id id, wd_error *err);

/* One option whose value differs between two configurations. */
typedef struct wd_option_change {
    wd_option_id id;
    bool live;
    char from[192], to[192];  /* the values as the log shows them: 512, 4GiB, on, "text" */
} wd_option_change;
/* The options whose values differ from running to next, in table order,
 * into changes (room for WD_OPTION_COUNT); returns how many. */
size_t wd_config_diff(const wd_config *running, const wd_config *next, wd_option_change *changes);
/* Moves next's values of the LIVE options into running (their old values
 * go to next, freed with it), with their origins; the RESTART options of
 * running stay as they are. Cannot fail: a reload checks everything first. */
void wd_config_take_live(wd_config *running, wd_config *next);
/* {name: value} for every option, as stats shows them (numbers, booleans,
 * strings); the administrator lists only when with_admins. */
cJSON *wd_config_json(const wd_config *c, bool with_admins);

/* ---- auth.c: who may do what --------------------------------------------- */

/* Readers: whoever can reach the socket. Administrators: root, the daemon's
 * own user, --admin-uids and members of --admin-groups. */
#define WD_ROLES(X) X(READER, "reader") X(ADMIN, "administrator")
typedef enum wd_role {
#define X(id, name) WD_ROLE_##id,
    WD_ROLES(X)
#undef X
} wd_role;
const char *wd_role_name(wd_role role);

typedef struct wd_auth {
    uid_t *uids;
    size_t n_uids;
    gid_t *gids;
    size_t n_gids;
} wd_auth;

/* Resolves --admin-uids and --admin-groups (names or numbers); an error
 * names where the word that did not resolve came from. */
int wd_auth_init(wd_auth *a, const wd_config *c, wd_error *err);
void wd_auth_free(wd_auth *a);
/* Reads c's peer credentials (SO_PEERCRED, SO_PEERGROUPS) and its role. */
void wd_auth_peer(const wd_auth *a, wd_conn *c);
/* c's role under a, from the credentials it connected with. */
wd_role wd_auth_role(const wd_auth *a, const wd_conn *c);
/* 0 when r's peer has the role; else -EPERM with r->err saying the role
 * needed for `what`, and a log line. */
int wd_auth_require(wd_request *r, wd_role role, const char *what);
/* --socket-mode and --socket-group on a socket bound at path. */
int wd_auth_socket(const wd_config *c, const char *path, wd_error *err);
/* Only whether they are valid (a mode, a group that exists). */
int wd_auth_check_socket(const wd_config *c, wd_error *err);

/* ---- server.c: the loop, the socket, connections ------------------------- */

/* One uid's connections, requests in flight and leases, for the per-uid
 * bounds: made at its first connection, freed with its last (server.c). */
typedef struct wd_peer wd_peer;
struct wd_peer {
    uid_t uid;
    size_t conns, requests, leases;
    wd_peer *next;
};

/* Descriptors systemd passed besides the socket (LISTEN_FDNAMES), until
 * the restore takes them. */
typedef struct wd_passed {
    int *fds;
    char **names;
    size_t n;
} wd_passed;

/* What the daemon keeps in systemd's fd store (systemd.c). */
typedef struct wd_fdstore {
    bool on;                  /* under systemd, with memory that can outlive the daemon */
    const char *off_why;      /* why not, for stats and the log */
    uint64_t generation;      /* of the newest record */
    char *record;             /* its FDNAME, or NULL */
    char **names;             /* every FDNAME the store holds for us */
    size_t n_names, cap;
} wd_fdstore;

struct wd_conn {
    wd_server *srv;
    uint64_t serial;          /* for log lines */
    int fd;
    uv_poll_t poll;
    wp_reader rd;
    wp_writer wr;
    pid_t pid;
    uid_t uid;
    gid_t gid;
    gid_t *groups;            /* supplementary groups (SO_PEERGROUPS); NULL when unknown */
    size_t n_groups;
    wd_role role;
    wd_peer *peer;            /* its uid's accounting, for the per-uid bounds */
    size_t n_pending;         /* requests in flight */
    double connected_at, last_active; /* monotonic: for the hello and idle timeouts */
    bool hello;               /* hello exchanged */
    bool closing;             /* closed once the writer drains */
    bool broken;              /* cannot be sent to: the reaper closes it (server.c) */
    const char *broken_why;
    bool dead;                /* handles closed; memory freed in the last close callback */
    int handles;              /* libuv handles still open (poll, peer_poll) */
    wd_request *pending;      /* requests still to be answered */
    wd_lease *leases;         /* what it attached (lease.h) */
    int peer_fd;              /* pidfd of the peer process, watched once it holds a lease; -1 */
    uv_poll_t peer_poll;
    wd_conn *prev, *next;
};

struct wd_request {
    wd_conn *conn;            /* NULL once the client is gone */
    cJSON *id;
    cJSON *args;              /* {} when the request had none */
    char op[32];
    bool want_events;
    int *fds;                 /* descriptors that came with it (load's files); -1 once taken */
    size_t n_fds;
    wd_job *job;              /* the job it started, while it runs */
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
    int signal_fd;            /* SIGINT, SIGTERM and SIGHUP, blocked in every thread, read here */
    uv_poll_t signal_poll;
    uv_timer_t tick;          /* progress events and the systemd watchdog */
    wd_passed passed;
    wd_fdstore fdstore;
    uint64_t watchdog_usec;   /* systemd's watchdog interval (0: none) */
    double watchdog_last;     /* when it was last told we are alive */
    uint64_t next_serial;
    size_t n_conns;
    wd_conn *conns;
    wd_peer *peers;
    wd_auth auth;             /* from conf's administrator lists; a reload replaces it */
    const char *load_policy;  /* conf->load_alloc_conf, or WA_FALLBACK_POLICY in its place */
    uv_timer_t accept_retry;  /* accept(2) out of descriptors: listening again later */
    unsigned accept_delay_ms; /* 0 while accepting */
    unsigned long accept_refused;
    wd_model *models;
    wd_job *jobs, *jobs_tail; /* loads and verifies, in arrival order; one load and one verify run at a time */
    uv_idle_t alloc_idle;     /* allocates the running load's slabs beside its reads (jobs.c) */
    uv_idle_t reaper;         /* closes broken connections, outside whatever sent to them */
    wd_job *allocating;       /* that load, while it has tensors left to allocate */
    size_t jobs_running;      /* uv work items in flight */
    bool stopping;
    double stop_started, stop_progress; /* a stop waits for clients to take what is queued for them */
    size_t stop_queued;
    double started;
    int exit_code;
};

/* Blocks SIGINT, SIGTERM (stop) and SIGHUP (reload) in the calling thread,
 * and so in every thread made after it: call first thing in main. */
void wd_block_signals(void);
int wd_server_start(wd_server *s, uv_loop_t *loop, wd_config *conf, wd_error *err);
/* Begins an orderly stop: no new connections, jobs cancelled, then every
 * model freed and every handle closed; the loop then runs out. */
void wd_server_stop(wd_server *s, const char *why);
/* Called when a job ends, to finish a stop that waits for it. */
void wd_server_maybe_finish(wd_server *s);

/* ---- reload.c: the configuration at run time (SIGHUP) --------------------- */

/* Reads the configuration again (the command line and environment still
 * over the file) and, only if all of it is valid, applies the LIVE options
 * and computes every connection's role again; logs each change, and those
 * that wait for a restart. Tells systemd RELOADING=1, then READY=1 whatever
 * happened. */
void wd_server_reload(wd_server *s);

/* The peer is the daemon's own user or root (SO_PEERCRED): it can read
 * whatever the daemon can, and may have writable mappings. */
bool wd_conn_privileged(const wd_conn *c);

/* Replies: each sends to the client (if it is still there) and frees r. */
void wd_reply_ok(wd_request *r, cJSON *result);
void wd_reply_error(wd_request *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void wd_reply_err(wd_request *r, const wd_error *e);
/* Sends an event for r without ending it (consumes ev). */
void wd_request_event(wd_request *r, cJSON *ev);
/* For an answer of several messages (attach): sends one encoded line (its
 * newline included, malloc'd; consumed), an event of r's, with n descriptors
 * (duplicated; the caller keeps its own), whether or not r asked for
 * events. False once r's client is gone: stop there (its connection closes
 * from the loop, which ends its leases). */
bool wd_request_send(wd_request *r, char *line, size_t len, const int *fds, size_t n);
/* Sends an event that belongs to no request (revoke) to c, unless c is
 * closing. Like every send it never closes c under the caller. Consumes ev. */
void wd_conn_event(wd_conn *c, cJSON *ev);
/* An event line (consumed) with descriptors (duplicated) that belongs to
 * no request; false when c is going. */
bool wd_conn_send(wd_conn *c, char *line, size_t len, const int *fds, size_t n);
/* Watches c's peer process: when it exits, c closes (and its leases end),
 * even if a child still holds the socket. */
void wd_conn_watch_peer(wd_conn *c);

/* ---- systemd.c: every exchange with systemd -------------------------------- */

/* The listening socket systemd passed, as s->listen_fd and s->socket_path;
 * s->listen_fd is -1 when it passed none (the daemon binds its own). */
int wd_systemd_listen(wd_server *s, wd_error *err);
/* After a model is loaded or unloaded: the fd store gets the descriptors
 * of each model not yet there and a new record, and loses what no model
 * needs any more. Outside systemd, nothing. */
void wd_fdstore_sync(wd_server *s);
/* At start, before serving: the models of the newest record that systemd
 * passed back, each served as it was or dropped (logged); the descriptors
 * nobody takes are closed. */
void wd_fdstore_restore(wd_server *s);
/* m's memory is going (sleep): the store lets go of its descriptors and
 * leases, and the record no longer has it (the next sync after it wakes
 * stores it again). */
void wd_fdstore_drop(wd_server *s, wd_model *m);
/* A lease of a stored model into the store (add), or out of it. */
void wd_fdstore_lease(wd_server *s, wd_lease *l, bool add);
/* The fd store's state for stats. */
cJSON *wd_fdstore_json(const wd_server *s);
void wd_fdstore_free(wd_server *s);
/* READY=1 with the status, once serving; the watchdog's interval. */
void wd_systemd_ready(wd_server *s);
/* STATUS=: the models loaded and what runs (after each change). */
void wd_systemd_status(wd_server *s);
/* WATCHDOG=1 when half the interval has passed (from the tick timer). */
void wd_systemd_watchdog(wd_server *s);
/* RELOADING=1 before re-reading the configuration, then READY=1 after. */
void wd_systemd_reloading(wd_server *s);
void wd_systemd_reloaded(wd_server *s);
void wd_systemd_stopping(wd_server *s);

/* ---- record.c: the registry's record, the one place of its format ------- */

#define WD_RECORD_VERSION 1
/* m's part of the record (m->record), naming its descriptors: names[] are
 * the FDNAMEs of its slabs' pieces (wa_block_backing, slab by slab), then
 * of its shards. Reads the shards' headers again. */
int wd_record_model(wd_model *m, char *const *names, wd_error *err);
/* A sealed memfd of the record of every model with m->record. */
int wd_record_write(wd_server *s, uint64_t generation, int *fd, wd_error *err);
/* The models of record fd, from descriptors p (those used are taken):
 * how many came back, or a negative errno when the record itself is bad
 * (another version, truncated, corrupted, another backend or devices). */
int wd_record_restore(wd_server *s, int fd, wd_passed *p, uint64_t *generation, wd_error *err);

/* A sealed memfd of lease l's part of the record. */
int wd_record_lease(const wd_lease *l, int *fd, wd_error *err);
/* The leases stored beside the record (FDNAME prefix), of models restored:
 * each waits for its worker (lease.h). Takes what it reads. */
void wd_record_restore_leases(wd_server *s, wd_passed *p, const char *prefix);

/* ---- ops.c: the operation table ------------------------------------------ */

/* A handler returns 0 when it replied or kept r to reply later, or a negative
 * errno with r->err set for the caller to send as the error reply. */
typedef int (*wd_op_fn)(wd_server *s, wd_request *r);
typedef struct wd_op {
    const char *name;
    wd_op_fn fn;
    wd_role role;             /* who may call it (auth.c) */
    bool takes_fds;           /* its args' "files" name descriptors sent with it */
    bool lasts;               /* may be answered later: bounded by max_requests_per_client and _uid */
} wd_op;
const wd_op *wd_op_find(const char *name);
/* A device named by its number (a JSON number, or a string of digits) or by
 * its UUID (or a prefix only it has), as --devices and weightctl take them. */
int wd_device_arg(wd_server *s, wd_request *r, const cJSON *v, int *out);
/* {"name", "dtype", "shape", "bytes", "checksum"}: m's tensor i as info and
 * attach list it (checksum: common/checksum.h, 16 hex digits, once loaded). */
cJSON *wd_tensor_json(const wd_model *m, size_t i);

/* ---- attach.c: serving a model's memory to workers ------------------------ */

int wd_op_attach(wd_server *s, wd_request *r);
int wd_op_detach(wd_server *s, wd_request *r);
int wd_op_leases(wd_server *s, wd_request *r);
int wd_op_reattach(wd_server *s, wd_request *r);
/* Encodes what attach sends for every device of m, now (the load's end)
 * rather than at the first attach. */
void wd_attach_prepare(wd_server *s, wd_model *m);
/* The "wake" events of lease l: its model's descriptors now, for the
 * holder's client to map where it kept the addresses (sleep.c). */
int wd_attach_send_wake(wd_server *s, wd_lease *l, wd_error *err);
/* Drops m's encoded attach tables (the model goes, or its memory moves). */
void wd_attach_forget(wd_model *m);

/* ---- sleep.c: a model's device memory given back and taken again --------- */

int wd_op_sleep(wd_server *s, wd_request *r);
int wd_op_wake(wd_server *s, wd_request *r);
/* A holder's client unmapped the model for its sleep. */
int wd_op_slept(wd_server *s, wd_request *r);
/* Where m sleeps ("host" or "checkpoint"), or NULL when it does not. */
const char *wd_sleep_where(const wd_model *m);
/* A holder of m answered, detached or went: a sleep may go on. */
void wd_sleep_released(wd_server *s, wd_model *m);
/* Sleeps whose holders did not answer in time give up (from the tick). */
void wd_sleep_tick(wd_server *s);
/* The client of r went away: a sleep or wake goes on unanswered. */
void wd_sleep_request_gone(wd_server *s, wd_request *r);
/* m's sleep state and host copy (unload, or m goes; the host memory is
 * given back on a thread of the pool). */
void wd_sleep_free(wd_server *s, wd_model *m);

/* ---- registry.c: the models, each one owner of its state and memory ----- */

/* loading -> ready -> (unloading: a forced unload waits for its holders) ->
 * gone; a failed load or an unload that ends its wait goes the same ways.
 * ready -> sleeping (holders unmap, the copy goes to host memory) -> asleep
 * (nothing on the devices) -> waking -> ready (sleep.c); a sleep or a wake
 * that fails goes back to where it came from. */
#define WD_MODEL_STATES(X)                                                                        \
    X(LOADING, "loading") X(READY, "ready") X(SLEEPING, "sleeping") X(ASLEEP, "asleep")            \
    X(WAKING, "waking") X(UNLOADING, "unloading")
typedef enum wd_model_state {
#define X(id, name) WD_MODEL_##id,
    WD_MODEL_STATES(X)
#undef X
} wd_model_state;
const char *wd_model_state_name(wd_model_state st);

/* A model's memory on a device comes in slabs: one allocation each, holding
 * a run of its tensor parts back to back. A worker maps a slab with one
 * handle, so attaching costs a few dozen imports, not one per tensor. */
typedef struct wd_slab {
    int device;
    uint64_t bytes;           /* what it asks the allocator for */
    size_t first_dest, end_dest; /* the dests it holds lie in [first_dest, end_dest) */
    wa_block *block;          /* NULL until allocated */
} wd_slab;

#define WD_NO_SLAB UINT32_MAX /* an empty dest's */
typedef struct wd_part {
    uint32_t slab;            /* which slab holds the dest, or WD_NO_SLAB */
    uint64_t offset;          /* where in it */
} wd_part;

struct wd_model {
    char *name;
    char *path;               /* as given, made absolute */
    wd_model_state state;
    int *devices;             /* where it lives, in the order asked for */
    size_t n_devices;
    wl_placement placement;
    wl_checkpoint ckpt;       /* headers, kept for info and verify */
    wl_dest *dest;            /* the tensors' runs on devices (placement.h), in tensor order */
    wd_part *part;            /* one per dest: where it lives in the slabs */
    size_t n_dest;
    wd_slab *slabs;           /* in the order of their first dest, the order they are allocated in */
    size_t n_slabs, slabs_allocated;
    size_t dests_ready;       /* dests, from the first, with their memory */
    uint64_t device_bytes;    /* what the dests hold, on all devices together */
    uint64_t slab_size;       /* --slab-size when it was placed (a restart plans it again alike) */
    char **stored;            /* FDNAMEs of its descriptors in systemd's fd store (systemd.c) */
    size_t n_stored;
    char *record;             /* its part of the registry's record (record.c), once stored */
    bool unstorable;          /* its memory cannot go to the fd store (said once in the log) */
    bool restored;            /* taken back from the fd store at start, not loaded */
    size_t shards_replaced;   /* shards renamed over during the load (it holds what it opened) */
    uint64_t *sums;           /* each tensor's checksum, computed while it loaded (common/checksum.h) */
    double load_seconds;
    double loaded_at;         /* wall clock */
    unsigned busy;            /* verify jobs reading it */
    wd_lease *leases;         /* the workers attached (lease.h) */
    wd_attach_table *attach_tables; /* what attach sends, encoded once per device asked for (attach.c) */
    wd_request *unload;       /* UNLOADING: the forced unload waiting for its holders */
    double unload_deadline;   /* monotonic: when that wait gives up */
    bool unload_keep_cached;  /* that unload leaves the segments in the allocator's cache */
    wd_model_state unload_from; /* the state it goes back to when that wait gives up */
    wd_sleep *sleep;          /* SLEEPING, ASLEEP, WAKING: where it sleeps, and who waits (sleep.c) */
    wd_model *next;
};

#define WD_MODEL_NAME_MAX 128
/* 0 or -EINVAL with err: 1..128 of [A-Za-z0-9._-], not starting with '.' or '-'. */
int wd_model_name_check(const char *name, wd_error *err);
wd_model *wd_registry_find(wd_server *s, const char *name);
/* A new model in the LOADING state, linked in. */
int wd_registry_add(wd_server *s, const char *name, const char *path, const int *devices, size_t n_devices,
                    wl_placement placement, wd_model **out, wd_error *err);
/* Unlinks m, frees its slabs and itself; with give_back, the cached
 * segments of its devices go back to them too. m has no leases. */
void wd_registry_remove(wd_server *s, wd_model *m, bool give_back);
/* Frees every slab of m (it stays registered) and gives the segments under
 * them back to the devices, not to the allocator's cache. */
void wd_model_free_memory(wd_server *s, wd_model *m);
size_t wd_registry_count(const wd_server *s);
/* "0" or "0,1": the model's devices, for people. */
const char *wd_model_devices_text(const wd_model *m, char *buf, size_t len);
cJSON *wd_model_devices_json(const wd_model *m);

/* Packs m's dests (set, with device_bytes) into slabs of about slab_size
 * bytes per device (0: a 32nd of what m holds there, at least 256 MiB),
 * each part at a 512-byte boundary; replaces an earlier plan. */
int wd_model_plan_slabs(wd_model *m, uint64_t slab_size, wd_error *err);
/* m's dests (placement.h: every tensor's runs on its devices) and their
 * slabs (wd_model_plan_slabs), for a model with its checkpoint open; with
 * checksums, room for them. The same checkpoint, placement and slab_size
 * always give the same plan (a restart relies on it). */
int wd_model_place(wd_model *m, uint64_t slab_size, bool checksums, wd_error *err);
/* Allocates the next slab and gives its dests their memory; -ENOMEM & co
 * from the allocator, with err naming the slab's first tensor. */
int wd_model_allocate_slab(wd_server *s, wd_model *m, wd_error *err);
/* The next slab's memory is block (allocated, or adopted after a restart):
 * its dests get their addresses. */
void wd_model_slab_placed(wd_model *m, wa_block *block);

/* Unload: at once when nobody holds m; else -EBUSY naming the holders, or
 * with force, a revoke event to each holder and a wait of up to `wait`
 * seconds for them to detach (r is answered when it ends). 0 when r was
 * answered or kept, else a negative errno with r->err set. */
int wd_model_unload(wd_server *s, wd_model *m, wd_request *r, bool force, double wait, bool keep_cached);
/* A lease or a verify of m ended: an unload waiting for it may go on. */
void wd_model_released(wd_server *s, wd_model *m);
/* The client of r went away: a forced unload it waits for stops waiting. */
void wd_models_request_gone(wd_server *s, wd_request *r);
/* Forced unloads whose wait is over give up (from the tick timer). */
void wd_models_tick(wd_server *s);

/* ---- jobs.c: loads and verifies on worker threads ------------------------ */

/* files: the checkpoint's files as the client opened them (r->fds, taken
 * by the job), or none for the daemon to open path itself. */
int wd_load_start(wd_server *s, wd_request *r, const char *path, const char *name, const int *devices,
                  size_t n_devices, wl_placement placement, char *const *files, size_t n_files, wd_error *err);
/* quick: the devices' copies against the checksums, without the files. */
int wd_verify_start(wd_server *s, wd_request *r, wd_model *m, bool quick, wd_error *err);
/* The client of r went away: cancel what it started (r is the caller's to free). */
void wd_jobs_request_gone(wd_server *s, wd_request *r);
/* Cancel every job (the daemon is stopping). */
void wd_jobs_cancel_all(wd_server *s);
/* Cancel m's verifies (it is being unloaded): queued ones end now. */
void wd_jobs_cancel_verifies(wd_server *s, wd_model *m, const char *why);
/* Progress events for the running load (from the tick timer). */
void wd_jobs_progress(wd_server *s);
/* Sleep and wake move a model's bytes with the daemon's pipeline, in turn
 * with loads; done is called on the loop with how it went (ECANCELED when
 * the daemon stops first). An offload copies m's devices into image's
 * files (memfds of the shards' sizes, mapped: wl_shard.host), then pins
 * them where the backend stages its copies; a refill allocates m's
 * slabs again under the load policy and reads src into them (the image, or
 * m's checkpoint), its checksums compared with the load's; a refill that
 * fails frees every slab it took. */
typedef void (*wd_move_done)(wd_server *s, wd_model *m, int rc, const wd_error *err);
int wd_offload_start(wd_server *s, wd_model *m, wl_checkpoint *image, wd_move_done done, wd_error *err);
int wd_refill_start(wd_server *s, wd_model *m, const wl_checkpoint *src, wd_move_done done, wd_error *err);
/* The load policy's state for stats: whether a load holds it now. */
bool wd_jobs_load_active(const wd_server *s);
/* Adds the jobs' state to a stats reply: a page from offset ("jobs",
 * "jobs_total", "jobs_next"). */
void wd_jobs_describe(const wd_server *s, cJSON *out, size_t offset);

double wd_now(void);       /* monotonic seconds */
double wd_wall(void);      /* Unix time */

#endif
