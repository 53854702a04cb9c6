/* Leases: a worker's hold on a model it attached.
 *
 * A lease belongs to the connection that attached; it ends with detach, the
 * connection's close, or the death of the peer process (a pidfd watched by
 * the loop, for a socket that outlives its process in a child). It is also
 * listed on its model, which asks its holders before it goes (unload
 * --force sends them a "revoke" event).
 *
 * Under systemd a lease also lives in the fd store, with the model: after a
 * daemon restart it waits --lease-grace seconds, with no connection, for
 * its worker's client to come back with the lease's token (the op
 * "reattach") and take it again; meanwhile unload refuses as for any
 * holder. */
#ifndef WD_LEASE_H
#define WD_LEASE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

#include "daemon/daemon.h"

struct wd_lease {
    uint64_t id;              /* unique for the daemon's life */
    wd_conn *conn;
    wd_model *model;
    int device;               /* the device attached, or -1 for every one */
    bool writable;
    pid_t pid;                /* the peer's, from SO_PEERCRED */
    uid_t uid;
    char process[32];         /* /proc/PID/comm when it attached */
    double since;             /* monotonic */
    char token[33];           /* a secret the attach reply gives its client: it takes the lease again after a restart */
    double orphan_until;      /* back from the fd store, its worker not yet: when it ends (monotonic); else 0 */
    bool stored;              /* in systemd's fd store (systemd.c) */
    bool unmapped;            /* its holder unmapped the model for a sleep ("slept") and waits for "wake" */
    wd_lease *conn_next;      /* the connection's leases */
    wd_lease *model_next;     /* the model's leases */
};

/* A new lease of m for the client of r, linked to both. */
int wd_lease_new(wd_server *s, wd_request *r, wd_model *m, int device, bool writable, wd_lease **out,
                 wd_error *err);
/* A lease of m back from the fd store, held by nobody until its worker's
 * client shows its token (wd_lease_reattach) or lease_grace passes. */
int wd_lease_restore(wd_server *s, wd_model *m, const char *token, uid_t uid, pid_t pid, const char *process,
                     int device, bool writable, wd_error *err);
/* The lease with this token for the client of r, which must be of its uid:
 * its connection holds it now. */
int wd_lease_reattach(wd_server *s, wd_request *r, const char *token, wd_lease **out, wd_error *err);
/* Restored leases whose worker did not come back in time end (the tick). */
void wd_leases_tick(wd_server *s);
/* Ends the leases of m that wait for their worker (a forced unload: they
 * cannot be asked to detach). */
void wd_leases_end_orphans(wd_server *s, wd_model *m, const char *why);
/* Ends l: unlinked from its connection and its model, freed; a forced
 * unload waiting on the model may go on. why goes to the log. */
void wd_lease_end(wd_server *s, wd_lease *l, const char *why);
/* Ends every lease of c (its connection is closing). */
void wd_leases_conn_gone(wd_server *s, wd_conn *c, const char *why);
/* c's lease number id, or NULL. */
wd_lease *wd_lease_find(const wd_conn *c, uint64_t id);
size_t wd_conn_lease_count(const wd_conn *c);

/* {"lease", "model", "pid", "uid", "process", "age", "device", "writable"} */
cJSON *wd_lease_json(const wd_lease *l);
/* Whether viewer may see l's holder: administrators see every lease,
 * readers their own uid's (NULL: the daemon itself). */
bool wd_lease_visible(const wd_lease *l, const wd_conn *viewer);
/* The first max leases of m that viewer may see, as wd_lease_json gives them. */
cJSON *wd_model_leases_json(const wd_model *m, const wd_conn *viewer, size_t max);
size_t wd_model_lease_count(const wd_model *m);
/* "2 workers: pid 41 (python3, uid 1000, lease 3), pid 57 (...)" for messages. */
void wd_leases_describe(const wd_model *m, char *buf, size_t len);
/* A "revoke" event to each holder of m: {"event": "revoke", "lease", "name",
 * "reason"}; the holder should detach. */
void wd_leases_revoke(wd_server *s, wd_model *m, const char *reason);

#endif
