/* libweightd-client: talk to weightd over its Unix socket.
 *
 *     wdc_client *c = wdc_new();
 *     if (wdc_connect(c, NULL, 5000) < 0) { puts(wdc_error_message(c)); ... }
 *     char *result;
 *     if (wdc_call(c, "list", NULL, 5000, NULL, NULL, &result) == 0) { ...; free(result); }
 *     wdc_close(c);
 *
 * Every call returns 0 or a negative errno. An error reply from the daemon is
 * returned as its code (-ENOENT for "ENOENT"), with the daemon's words in
 * wdc_error_message(). -ETIMEDOUT means nothing arrived for timeout_ms
 * (< 0: wait forever). Requests and results are JSON text; see DESIGN.md for
 * the operations. Not thread-safe: one thread per client handle. */
#ifndef WEIGHTD_CLIENT_H
#define WEIGHTD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct wdc_client wdc_client;

/* Called for each event of a request in flight ("progress" during a load),
 * with the whole event object as JSON text. */
typedef void (*wdc_event_fn)(const char *event_json, void *ctx);

wdc_client *wdc_new(void);
/* Closes the connection and frees the handle (NULL is fine). */
void wdc_close(wdc_client *c);

/* Connects and says hello. path NULL: $WEIGHTD_SOCKET, else
 * /run/weightd/weightd.sock as root, else $XDG_RUNTIME_DIR/weightd.sock. */
int wdc_connect(wdc_client *c, const char *path, int timeout_ms);

/* Sends {"op": op, "args": args_json} and waits for its reply. args_json may
 * be NULL. With on_event, asks for events and passes them on. On success,
 * *result_json (when not NULL) is the reply's result, to free(). */
int wdc_call(wdc_client *c, const char *op, const char *args_json, int timeout_ms, wdc_event_fn on_event,
             void *ctx, char **result_json);

/* Loads the checkpoint at path (absolute: a .safetensors file, a folder or
 * an index) as wdc_call("load") would, but this process opens the files
 * and sends their descriptors: the daemon reads exactly what the caller
 * can read, as it was when opened. args_json: the other arguments ("name",
 * "device" or "devices", "placement"), or NULL. */
int wdc_load(wdc_client *c, const char *path, const char *args_json, int timeout_ms, wdc_event_fn on_event,
             void *ctx, char **result_json);

/* The files of the checkpoint at path, as wdc_load would open them (its
 * index first, if any, then its shards): *files is the paths one after
 * another, each ending in a NUL byte, *len bytes in all, to wdc_free().
 * On failure, a negative errno and a line in err. For a client that sends
 * the descriptors itself (the Python client). */
int wdc_checkpoint_files(const char *path, char **files, size_t *len, char *err, size_t errlen);
void wdc_free(void *p);

/* Waits until the daemon closes the connection (after shutdown). */
int wdc_wait_closed(wdc_client *c, int timeout_ms);

const char *wdc_error_code(const wdc_client *c);    /* "ENOENT"; "" when the last call worked */
const char *wdc_error_message(const wdc_client *c); /* one line */
const char *wdc_server_info(const wdc_client *c);   /* hello's result as JSON text */
const char *wdc_socket_path(const wdc_client *c);
/* The socket's descriptor, for poll(); readable means a message is coming. */
int wdc_fd(const wdc_client *c);
/* Descriptors received with the last reply; the caller owns them. */
size_t wdc_take_fds(wdc_client *c, int *fds, size_t max);

/* Events that belong to no request ("revoke": the daemon asks a lease's
 * holder to detach) reach fn from wdc_poll only: read during another call,
 * they wait for the next wdc_poll. fn may call into the library on c
 * (wdc_detach, say), but not wdc_close. */
void wdc_set_notice_handler(wdc_client *c, wdc_event_fn fn, void *ctx);
/* Reads every message buffered, waits up to timeout_ms (< 0: forever) for
 * more if there were none, then hands the events among them (and those
 * waiting from other calls) to the notice handler: the number handed, 0 when
 * none came, or a negative errno (-ECONNRESET: the daemon closed the
 * connection). A call may leave messages buffered that wdc_fd will not show
 * as readable: call wdc_poll(c, 0) before waiting on wdc_fd. */
int wdc_poll(wdc_client *c, int timeout_ms);

/* ---- attach: a model's tensors, mapped into this process ---------------------
 *
 *     wdc_attachment *a;
 *     if (wdc_attach(c, "gpt-oss", NULL, 0, 5000, &a) == 0) {
 *         const wdc_tensor *t = wdc_attachment_find(a, "model.embed_tokens.weight");
 *         use(t->parts[0].ptr, t->parts[0].bytes);  // a CUDA pointer on the cuda backends
 *         wdc_detach(c, a, 5000);
 *     }
 *
 * An attachment is a lease: the daemon will not unload the model while it
 * lasts. It ends with wdc_detach (which unmaps everything first), the
 * connection's close, or this process's exit. A failed wdc_attach that
 * leaves the connection out of step (a timeout, a stream cut short) closes
 * it, which ends every other lease on it: hold one attachment a connection
 * where that matters (the Python client does). Mappings are read-only
 * unless WDC_ATTACH_WRITABLE is asked for and the daemon allows it: on host
 * the daemon's doing, on cuda this library's (it maps with PROT_READ), and
 * on cuda-ipc nobody's: legacy IPC mappings are always writable (README).
 * Not thread-safe, like the client: one thread per client and its
 * attachments. */

typedef struct wdc_attachment wdc_attachment;

/* One run of a tensor's bytes on one device, mapped here. */
typedef struct wdc_part {
    int device;               /* the daemon's device number */
    int cuda_device;          /* this process's CUDA device for it; -1 on the host backend */
    void *ptr;                /* where the bytes are (device memory on the cuda backends) */
    uint64_t bytes;
    uint64_t tensor_offset;   /* where they start within the tensor */
    size_t handle;            /* the mapping they lie in (wdc_attachment_handle) */
    uint64_t handle_offset;
} wdc_part;

typedef struct wdc_tensor {
    const char *name;
    const char *dtype;        /* safetensors' name: "BF16", "F8_E4M3", "U8", ... */
    size_t ndim;
    const uint64_t *shape;
    uint64_t bytes;           /* the whole tensor's */
    size_t n_parts;           /* 0 when empty; one per device holding it, or per device's rows */
    const wdc_part *parts;
    int has_checksum;         /* the daemon computed checksum while loading (XXH3; DESIGN.md) */
    uint64_t checksum;
} wdc_tensor;

/* A contiguous mapping: one slab of the daemon's. */
typedef struct wdc_handle {
    int device, cuda_device;
    void *ptr;
    uint64_t bytes;
} wdc_handle;

#define WDC_ATTACH_WRITABLE 1u

/* Attaches model `name`: receives its table and handles, imports and maps
 * them. device: NULL for every device, or one ("0", or a UUID as stats shows
 * it); then only the tensors' parts on it. timeout_ms bounds each wait. */
int wdc_attach(wdc_client *c, const char *name, const char *device, unsigned flags, int timeout_ms,
               wdc_attachment **out);
size_t wdc_attachment_tensor_count(const wdc_attachment *a);
const wdc_tensor *wdc_attachment_tensor(const wdc_attachment *a, size_t i);
/* The tensor of that name, or NULL. */
const wdc_tensor *wdc_attachment_find(const wdc_attachment *a, const char *name);
size_t wdc_attachment_handle_count(const wdc_attachment *a);
const wdc_handle *wdc_attachment_handle(const wdc_attachment *a, size_t i);
uint64_t wdc_attachment_lease(const wdc_attachment *a);
/* The daemon's summary (lease, handle_type, devices, descriptors, handles,
 * tensors, bytes, messages, daemon_seconds) with "client": where this side's
 * time went (seconds in all; receive_seconds, within which setup_seconds for
 * the CUDA driver and contexts and import_seconds; map_seconds). */
const char *wdc_attachment_info(const wdc_attachment *a);
/* After the daemon went away (wdc_poll says -ECONNRESET) and its fd store
 * kept the model (systemd: a crash, or `systemctl restart`): connects c
 * again to its socket, trying for up to timeout_ms while the daemon comes
 * back, and takes a's lease again with the token the attach gave. The
 * mappings never went away: the tensors stay valid, and usable meanwhile.
 * -ENOENT: the daemon has no such lease now (the model was not kept, or the
 * worker came back after --lease-grace); the mappings still last until
 * wdc_detach, but nothing holds the model. */
int wdc_reattach(wdc_client *c, wdc_attachment *a, int timeout_ms);
/* Sleep and wake (weightctl sleep): the daemon asks its holders to unmap a
 * model it puts to sleep, and sends the new memory when it wakes. This
 * library answers for the attachment by itself, whenever it reads the
 * events (wdc_poll, or any call on c): it unmaps every piece but keeps the
 * address ranges, says so, and at the wake maps the new memory at the same
 * addresses, so that every pointer (and a CUDA graph captured over them)
 * is valid again. A worker that must sleep promptly polls c (wdc_fd); one
 * that does not answer within the daemon's sleep_timeout keeps the model
 * awake (or loses its lease to sleep --force). The notice handler hears
 * both events after they are handled. While asleep, the tensors must not
 * be touched: on host a read faults (SIGSEGV), on cuda it is an illegal
 * address, which ends the process's CUDA context. cuda-ipc mappings cannot
 * keep their addresses: the daemon does not put a model they hold to
 * sleep. State: 0 mapped, WDC_ASLEEP, or a negative errno when a wake could
 * not map the new memory (the tensors stay unmapped; detach). */
#define WDC_ASLEEP 1
int wdc_attachment_state(const wdc_attachment *a);
/* Copies len bytes of part p, from offset, into host memory dst. */
int wdc_read(const wdc_attachment *a, const wdc_part *p, uint64_t offset, void *dst, size_t len);
/* The checksum of t as this process maps it (one copy, its parts in order),
 * to compare with t->checksum: 0, -ENODATA when the attachment holds only
 * part of t (the rest is on devices not attached), or wdc_read's errors. */
int wdc_tensor_checksum(const wdc_attachment *a, const wdc_tensor *t, uint64_t *out);
/* Unmaps and releases everything, then ends the lease; frees a whatever the
 * daemon answers (the connection may be gone). */
int wdc_detach(wdc_client *c, wdc_attachment *a, int timeout_ms);

#ifdef __cplusplus
}
#endif

#endif
