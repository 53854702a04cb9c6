/* weightd's caching allocator: PyTorch's CUDACachingAllocator semantics on top
 * of any backend, with a policy stack and PyTorch's statistics.
 *
 * Not thread-safe: one thread (the daemon's loop, or the replayer) owns an
 * allocator. Block memory may be read and written from other threads through
 * the backend while the owner keeps the block allocated. */
#ifndef WA_ALLOCATOR_H
#define WA_ALLOCATOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "allocator/backend.h"
#include "common/errors.h"

typedef struct wa_allocator wa_allocator;
typedef struct wa_block wa_block;

/* ---- configuration ---------------------------------------------------- */

#define WA_ROUNDUP_INTERVALS 16 /* power-of-two size classes from 1 MiB to 64 GiB */

typedef struct wa_config {
    uint64_t max_split_size;          /* blocks this large are never split; UINT64_MAX = no limit */
    uint64_t max_non_split_rounding;  /* an oversize block serves a request only if under request + this */
    double garbage_collection_threshold; /* 0 = off, else (0, 1) of capacity */
    uint32_t roundup_power2_divisions[WA_ROUNDUP_INTERVALS]; /* 0 = plain 512-byte rounding */
    bool expandable_segments;         /* pages mapped into address ranges; needs a backend that can */
    bool release_lock_on_cudamalloc;  /* accepted for compatibility; no effect here */
    /* weightd's own keys */
    uint64_t expandable_page;         /* expandable_page_mb: large-pool page (PyTorch: 20 MiB) */
    bool expandable_page_align;       /* blocks of a page or less never straddle a page boundary */
    bool expandable_coalesce;         /* the pages mapped for one request are one physical allocation */
} wa_config;

/* weightd's load policy: what `weightctl load` pushes unless told otherwise,
 * and what `weightd-replay --policy weightd` applies. Expandable segments
 * with 2 MiB pages return freed memory page by page, and sub-page blocks kept
 * inside one page make those pages free as soon as the block is; README.md
 * ("Beating PyTorch's allocator") says why. */
#define WA_WEIGHTD_POLICY                                                                           \
    "expandable_segments:True,expandable_page_mb:2,expandable_page_align:True,expandable_coalesce:True," \
    "max_split_size_mb:20"
/* The policy for backends without expandable segments: vLLM's. */
#define WA_FALLBACK_POLICY "max_split_size_mb:20"

typedef enum wa_conf_mode {
    /* Keys named in the text override the base; the rest stay as in base.
     * This is what weightd's own policy scopes use. */
    WA_CONF_OVERLAY,
    /* PyTorch's parseArgs(): max_split_size, roundup_power2_divisions and
     * garbage_collection_threshold go back to their defaults before the text is
     * applied; the other keys keep their values. Used to replay traces literally. */
    WA_CONF_PYTORCH,
} wa_conf_mode;

void wa_config_default(wa_config *conf);
/* Parses PyTorch's syntax ("max_split_size_mb:20,garbage_collection_threshold:0.6",
 * "roundup_power2_divisions:[256:1,>:4]"); "" and "default" give base (OVERLAY)
 * or the defaults (PYTORCH). Unknown keys and bad values are -EINVAL with the
 * offending text in err. */
int wa_config_parse(const char *text, const wa_config *base, wa_conf_mode mode,
                    wa_config *out, wd_error *err);
/* Canonical text of the keys that differ from the defaults; "default" if none. */
const char *wa_config_format(const wa_config *conf, char *buf, size_t len);
bool wa_config_equal(const wa_config *a, const wa_config *b);

/* ---- statistics ------------------------------------------------------- */

/* PyTorch's names and meanings; each has a current and a peak value. */
#define WA_STAT_LIST(X)                                                          \
    X(allocated_bytes,      "bytes in blocks handed out (rounded sizes)")        \
    X(reserved_bytes,       "bytes in segments taken from the device")           \
    X(active_bytes,         "bytes in blocks handed out or not yet reusable")    \
    X(inactive_split_bytes, "bytes in free blocks inside split segments")        \
    X(requested_bytes,      "bytes asked for, before rounding")                  \
    X(allocation,           "blocks handed out")                                 \
    X(segment,              "segments taken from the device")                    \
    X(active,               "active blocks")                                     \
    X(inactive_split,       "free blocks inside split segments")                 \
    X(oversize_allocations, "blocks handed out of max_split_size or more")       \
    X(oversize_segments,    "segments of max_split_size or more")

/* Event counters since the allocator was made. */
#define WA_COUNTER_LIST(X)                                                       \
    X(num_alloc_retries, "allocations retried after freeing every cached block") \
    X(num_ooms,          "allocations that failed for lack of memory")           \
    X(num_device_alloc,  "segments taken from the device")                       \
    X(num_device_free,   "segments given back to the device")

typedef struct wa_stat {
    int64_t current, peak;
} wa_stat;

typedef struct wa_stats {
#define X(name, what) wa_stat name;
    WA_STAT_LIST(X)
#undef X
#define X(name, what) uint64_t name;
    WA_COUNTER_LIST(X)
#undef X
    uint64_t capacity;            /* bytes the device may reserve */
    uint64_t largest_free_block;  /* largest cached free block */
    /* Share of the cached free bytes (reserved - allocated) that lies outside
     * the largest free block: 0 when all of it is one block or there is none. */
    double fragmentation;
} wa_stats;

/* ---- the allocator ---------------------------------------------------- */

/* The allocator takes the backend's devices and capacities; it does not own
 * the backend. conf: the starting configuration (PyTorch syntax), or NULL. */
int wa_create(wa_backend *backend, const char *conf, wa_allocator **out, wd_error *err);
/* Frees every block still allocated and gives every segment back. */
void wa_destroy(wa_allocator *a);

int wa_device_count(const wa_allocator *a);
wa_backend *wa_get_backend(const wa_allocator *a);

/* Allocates `size` bytes on `device`. -ENOMEM (with PyTorch's kind of message:
 * how much is reserved but unallocated) when it does not fit even after every
 * cached block has been freed; -ENODEV for a bad device; other backend errors
 * pass through. */
int wa_malloc(wa_allocator *a, int device, uint64_t size, wa_block **out, wd_error *err);
void wa_free(wa_allocator *a, wa_block *block);
/* Gives every fully free cached segment back to the device (PyTorch's
 * emptyCache). device < 0: every device. */
void wa_empty_cache(wa_allocator *a, int device);

/* ---- streams and tags (the PyTorch front end) ---------------------------- */

/* wa_malloc on a stream, under a tag. A freed block is handed out again
 * only on its stream and tag (PyTorch's rule: the stream's own order puts
 * the work of the block's last user before the next user's; memory passes
 * to another stream only by going back to the device, after the device
 * synchronises, and coming again). A tag's blocks come from segments of its
 * own, as a MemPool's do, so that the tag can sleep. wa_malloc is stream 0,
 * tag 0. -EAGAIN under a sleeping tag. */
int wa_malloc_in(wa_allocator *a, int device, uint64_t stream, uint32_t tag, uint64_t size, wa_block **out,
                 wd_error *err);

/* Sleep gives the memory under every segment of tag, on every device, back
 * to the device and keeps their addresses: blocks stay handed out at the
 * same addresses with nothing behind them until wake (a GPU faults on them;
 * on host they are PROT_NONE). With offload the bytes of every block then
 * handed out are kept in host memory first and wake copies them back;
 * without, wake gives memory of undefined contents. reserved_bytes counts
 * only memory that is there. The caller makes sure nothing still uses the
 * memory (with the cuda backend's private_memory, the device is
 * synchronised). Whole or not at all: -ENOMEM on wake when the devices
 * lack the room (the tag sleeps on, its bytes kept); -EALREADY to sleep a
 * sleeping tag or wake an awake one; -EINVAL for tag 0. Blocks may be freed
 * while asleep; their segments go back to the device only once awake. */
int wa_tag_sleep(wa_allocator *a, uint32_t tag, bool offload, wd_error *err);
int wa_tag_wake(wa_allocator *a, uint32_t tag, wd_error *err);
bool wa_tag_asleep(const wa_allocator *a, uint32_t tag);

/* Where a block lives. */
typedef struct wa_region {
    int device;
    uint64_t addr;          /* device address of the block */
    uint64_t size;          /* block size after rounding */
    uint64_t requested;     /* bytes asked for */
    uint32_t segment_id;    /* unique for the allocator's life */
    uint64_t segment_addr, segment_size;
    uint64_t offset;        /* of the block within its segment */
    const wa_mem *mem;      /* the segment's memory (host mapping, fd) */
} wa_region;
void wa_block_region(const wa_block *block, wa_region *out);
/* The physical allocations under a block, in address order: what a worker
 * maps, each whole, to see the block (one for a classic segment; the pages
 * or coalesced runs of an expandable one). Fills up to max and returns how
 * many there are; call again with more room when that is more than max. The
 * pointers are valid until the allocator next runs. */
size_t wa_block_backing(const wa_block *block, const wa_mem **out, size_t max);

/* Memory that outlived the allocator that made it (a daemon restart), back
 * as one allocated block: pieces are physical allocations, each a shareable
 * handle (wa_mem.fd) and its size, that tiled a block in address order.
 * One piece becomes a classic segment; several, an expandable segment of
 * exactly their bytes with pages of `page` bytes (each piece whole pages).
 * The block then lives as any other: freed, it is cached or given back by
 * the rules in force. Takes every fd on success; on failure none. -ENOTSUP
 * where the backend's memory cannot outlive its maker. */
typedef struct wa_piece {
    int fd;
    uint64_t size;
} wa_piece;
int wa_adopt(wa_allocator *a, int device, const wa_piece *pieces, size_t n, uint64_t page, uint64_t requested,
             wa_block **out, wd_error *err);

/* The configuration in force, and the policy stack over it. push applies conf
 * on top of the configuration in force (OVERLAY); pop restores exactly the
 * configuration that was in force before the matching push, every key. */
const wa_config *wa_get_config(const wa_allocator *a);
int wa_set_config(wa_allocator *a, const wa_config *conf);
int wa_policy_push(wa_allocator *a, const char *conf, wd_error *err);
int wa_policy_pop(wa_allocator *a);
size_t wa_policy_depth(const wa_allocator *a);

int wa_get_stats(const wa_allocator *a, int device, wa_stats *out);
void wa_reset_peaks(wa_allocator *a, int device);

/* Snapshot: every segment of a device in address order, and its blocks. */
typedef struct wa_snap_block {
    uint64_t addr, size, requested;
    bool allocated;
    bool mapped;              /* false: an unmapped range of an expandable segment */
} wa_snap_block;
typedef struct wa_snap_segment {
    uint32_t id;
    uint64_t addr, size;
    uint64_t mapped;          /* bytes with memory behind them */
    bool small_pool;
    bool expandable;
    size_t n_blocks;
    wa_snap_block *blocks;
} wa_snap_segment;
/* Fills *segs (malloc'd; free with wa_snapshot_free). */
int wa_snapshot(const wa_allocator *a, int device, wa_snap_segment **segs, size_t *n);
void wa_snapshot_free(wa_snap_segment *segs, size_t n);

/* Checks the structure (blocks tile their segments, no overlap, free
 * neighbours merged, free-tree order, statistics equal a recount). 0 or
 * -EFAULT with the broken invariant in err. For tests and --check. */
int wa_check(const wa_allocator *a, wd_error *err);

#endif
