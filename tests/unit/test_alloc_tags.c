/* Streams and tags: PyTorch's per-stream pools, a tag's own segments, and
 * sleep and wake of a tag with its addresses kept (host backend: the bytes
 * are real, and a sleeping block's pages are PROT_NONE). */
#include "tests/unit/suites.h"

#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/allocator.h"

#define MiB (1024ULL * 1024ULL)

typedef struct fixture {
    wa_backend *backend;
    wa_allocator *a;
} fixture;

static void setup(fixture *f, const char *backend, uint64_t capacity, const char *conf)
{
    wd_error err = {0};

    if (strcmp(backend, "host") == 0)
        ck_assert_int_eq(wa_backend_host_create(1, capacity, &f->backend, &err), 0);
    else
        ck_assert_int_eq(wa_backend_fake_create(1, capacity, &f->backend, &err), 0);
    ck_assert_msg(wa_create(f->backend, conf, &f->a, &err) == 0, "%s", err.msg);
}

static void checked(fixture *f)
{
    wd_error err = {0};
    ck_assert_msg(wa_check(f->a, &err) == 0, "%s", err.msg);
}

static void teardown(fixture *f)
{
    checked(f);
    wa_destroy(f->a);
    wa_backend_destroy(f->backend);
}

static wa_block *alloc_in(fixture *f, uint64_t stream, uint32_t tag, uint64_t size)
{
    wa_block *b = NULL;
    wd_error err = {0};

    ck_assert_msg(wa_malloc_in(f->a, 0, stream, tag, size, &b, &err) == 0, "malloc(%llu): %s",
                  (unsigned long long)size, err.msg);
    checked(f);
    return b;
}

static uint64_t addr(const wa_block *b)
{
    wa_region r;
    wa_block_region(b, &r);
    return r.addr;
}

static void *host_of(const wa_block *b)
{
    wa_region r;
    wa_block_region(b, &r);
    return (char *)r.mem->host + r.offset;
}

static int64_t reserved(fixture *f)
{
    wa_stats s;
    ck_assert_int_eq(wa_get_stats(f->a, 0, &s), 0);
    return s.reserved_bytes.current;
}

/* Two requests, one after the other, land in segments of their own. */
static void apart(const char *conf, uint64_t stream1, uint32_t tag1, uint64_t stream2, uint32_t tag2, uint64_t size)
{
    fixture f;
    wa_block *b, *c;
    wa_region rb, rc;

    setup(&f, "fake", 1024 * MiB, conf);
    b = alloc_in(&f, stream1, tag1, size);
    c = alloc_in(&f, stream2, tag2, size);
    wa_block_region(b, &rb);
    wa_block_region(c, &rc);
    ck_assert_uint_ne(rb.segment_id, rc.segment_id);
    wa_free(f.a, b);
    wa_free(f.a, c);
    teardown(&f);
}

/* Freed on stream 1, the block is not handed to stream 2, whose request
 * takes new memory; stream 1 gets it back. */
START_TEST(a_block_freed_on_one_stream_is_reused_on_that_stream_only)
{
    fixture f;
    wa_block *b, *c, *d;
    uint64_t at;

    setup(&f, "fake", 1024 * MiB, NULL);
    b = alloc_in(&f, 1, 0, 30 * MiB);
    at = addr(b);
    wa_free(f.a, b);
    c = alloc_in(&f, 2, 0, 30 * MiB);
    ck_assert_uint_ne(addr(c), at);
    ck_assert_int_eq(reserved(&f), 60 * MiB);
    d = alloc_in(&f, 1, 0, 30 * MiB);
    ck_assert_uint_eq(addr(d), at);
    wa_free(f.a, c);
    wa_free(f.a, d);
    teardown(&f);
}
END_TEST

/* Small blocks too: stream 2 does not take a piece of stream 1's 2 MiB segment. */
START_TEST(small_blocks_keep_to_their_stream)
{
    apart(NULL, 1, 0, 2, 0, 4096);
}
END_TEST

/* A cached block of another stream goes back to the device when a request
 * cannot be met otherwise, and its memory serves the request. */
START_TEST(out_of_memory_frees_other_streams_cached_blocks)
{
    fixture f;
    wa_block *b, *c;

    setup(&f, "fake", 64 * MiB, NULL);
    b = alloc_in(&f, 1, 0, 40 * MiB);
    wa_free(f.a, b);
    c = alloc_in(&f, 2, 0, 40 * MiB);
    ck_assert_int_eq(reserved(&f), 40 * MiB);
    wa_free(f.a, c);
    teardown(&f);
}
END_TEST

/* Under expandable segments each stream has its own address range. */
START_TEST(expandable_segments_are_per_stream)
{
    apart("expandable_segments:True", 1, 0, 2, 0, 30 * MiB);
}
END_TEST

/* A tag's blocks never share a segment with untagged ones. */
START_TEST(a_tag_has_segments_of_its_own)
{
    apart(NULL, 0, 0, 0, 7, 4096);
}
END_TEST

static void fill(void *p, size_t len, unsigned seed)
{
    unsigned char *c = p;
    for (size_t i = 0; i < len; i++)
        c[i] = (unsigned char)(seed + i * 131);
}

static int same(const void *p, size_t len, unsigned seed)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < len; i++)
        if (c[i] != (unsigned char)(seed + i * 131))
            return 0;
    return 1;
}

static sigjmp_buf fault_jump;

static void on_fault(int sig)
{
    (void)sig;
    siglongjmp(fault_jump, 1);
}

/* Whether reading p faults. */
static int faults(const void *p)
{
    struct sigaction sa = {0}, old;
    volatile int hit = 0;

    sa.sa_handler = on_fault;
    sigaction(SIGSEGV, &sa, &old);
    if (sigsetjmp(fault_jump, 1) == 0)
        (void)*(const volatile char *)p;
    else
        hit = 1;
    sigaction(SIGSEGV, &old, NULL);
    return hit;
}

/* The seed's scenario in one process: a tag's memory (classic and
 * expandable segments) sleeps, every byte of it goes back to the device,
 * other work uses it, and wake gives the same bytes at the same addresses. */
static void sleep_and_wake(const char *conf)
{
    fixture f;
    wa_block *small, *big, *other, *untagged;
    uint64_t at_small, at_big, free_before;
    int64_t before;
    wd_error err = {0};

    setup(&f, "host", 256 * MiB, conf);
    untagged = alloc_in(&f, 0, 0, 8 * MiB);
    before = reserved(&f);
    free_before = f.backend->free_bytes(f.backend, 0);
    small = alloc_in(&f, 0, 3, 100000);
    big = alloc_in(&f, 0, 3, 150 * MiB);
    at_small = addr(small);
    at_big = addr(big);
    fill(host_of(small), 100000, 1);
    fill(host_of(big), 150 * MiB, 2);
    fill(host_of(untagged), 8 * MiB, 3);

    ck_assert_msg(wa_tag_sleep(f.a, 3, true, &err) == 0, "%s", err.msg);
    checked(&f);
    ck_assert(wa_tag_asleep(f.a, 3));
    ck_assert_int_eq(reserved(&f), before);
    ck_assert_uint_eq(f.backend->free_bytes(f.backend, 0), free_before);
    ck_assert(faults(host_of(big)));
    ck_assert(!faults(host_of(untagged)));
    ck_assert_int_eq(wa_malloc_in(f.a, 0, 0, 3, 4096, &other, &err), -EAGAIN);
    ck_assert_int_eq(wa_tag_sleep(f.a, 3, true, &err), -EALREADY);

    /* The memory is the device's again: another tag fills it, and wake
     * cannot have it back until that goes. */
    other = alloc_in(&f, 0, 4, 200 * MiB);
    ck_assert_int_eq(wa_tag_wake(f.a, 3, &err), -ENOMEM);
    ck_assert(wa_tag_asleep(f.a, 3));
    checked(&f);
    wa_free(f.a, other);
    wa_empty_cache(f.a, 0);

    ck_assert_msg(wa_tag_wake(f.a, 3, &err) == 0, "%s", err.msg);
    checked(&f);
    ck_assert(!wa_tag_asleep(f.a, 3));
    ck_assert_uint_eq(addr(small), at_small);
    ck_assert_uint_eq(addr(big), at_big);
    ck_assert(same(host_of(small), 100000, 1));
    ck_assert(same(host_of(big), 150 * MiB, 2));
    ck_assert(same(host_of(untagged), 8 * MiB, 3));
    ck_assert_int_eq(wa_tag_wake(f.a, 3, &err), -EALREADY);
    wa_free(f.a, small);
    wa_free(f.a, big);
    wa_free(f.a, untagged);
    wa_empty_cache(f.a, 0);
    ck_assert_int_eq(reserved(&f), 0);
    teardown(&f);
}

START_TEST(a_sleeping_tag_gives_every_byte_back_and_wakes_at_the_same_addresses)
{
    sleep_and_wake(NULL);
}
END_TEST

START_TEST(a_sleeping_tag_under_the_load_policy_wakes_the_same)
{
    sleep_and_wake(WA_WEIGHTD_POLICY);
}
END_TEST

/* A block freed while its tag sleeps is free after wake, and its segment
 * can go back then; discard gives memory without the old bytes. */
START_TEST(blocks_freed_asleep_and_discarded_sleep)
{
    fixture f;
    wa_block *b, *c;
    wd_error err = {0};

    setup(&f, "host", 256 * MiB, NULL);
    b = alloc_in(&f, 0, 5, 30 * MiB);
    c = alloc_in(&f, 0, 5, 30 * MiB);
    fill(host_of(c), 4096, 9);
    ck_assert_msg(wa_tag_sleep(f.a, 5, false, &err) == 0, "%s", err.msg);
    wa_free(f.a, b);
    wa_empty_cache(f.a, 0); /* leaves the sleeping tag alone */
    checked(&f);
    ck_assert_int_eq(reserved(&f), 0);
    ck_assert_msg(wa_tag_wake(f.a, 5, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(reserved(&f), 60 * MiB);
    ck_assert(!faults(host_of(c)));
    ck_assert(!same(host_of(c), 4096, 9)); /* discarded: new memory */
    wa_empty_cache(f.a, 0);
    ck_assert_int_eq(reserved(&f), 30 * MiB);
    wa_free(f.a, c);
    teardown(&f);
}
END_TEST

/* A tag asleep when the allocator goes: everything goes back. */
START_TEST(destroy_takes_a_sleeping_tag)
{
    fixture f;
    wd_error err = {0};

    setup(&f, "host", 256 * MiB, "expandable_segments:True");
    alloc_in(&f, 0, 2, 50 * MiB);
    alloc_in(&f, 0, 2, 1000);
    ck_assert_msg(wa_tag_sleep(f.a, 2, true, &err) == 0, "%s", err.msg);
    wa_destroy(f.a);
    ck_assert_uint_eq(f.backend->free_bytes(f.backend, 0), 256 * MiB);
    wa_backend_destroy(f.backend);
}
END_TEST

START_TEST(tag_zero_and_fake_offload_are_refused)
{
    fixture f;
    wd_error err = {0};
    wa_block *b;

    setup(&f, "fake", 256 * MiB, NULL);
    b = alloc_in(&f, 0, 1, 1000);
    ck_assert_int_eq(wa_tag_sleep(f.a, 0, false, &err), -EINVAL);
    /* The fake backend has no bytes to keep: offload fails, nothing changes. */
    ck_assert_int_eq(wa_tag_sleep(f.a, 1, true, &err), -ENOTSUP);
    ck_assert(!wa_tag_asleep(f.a, 1));
    ck_assert_int_eq(wa_tag_sleep(f.a, 1, false, &err), 0);
    ck_assert_int_eq(wa_tag_wake(f.a, 1, &err), 0);
    wa_free(f.a, b);
    teardown(&f);
}
END_TEST

Suite *alloc_tags_suite(void)
{
    Suite *s = suite_create("alloc_tags");
    TCase *tc = tcase_create("streams");

    tcase_add_test(tc, a_block_freed_on_one_stream_is_reused_on_that_stream_only);
    tcase_add_test(tc, small_blocks_keep_to_their_stream);
    tcase_add_test(tc, out_of_memory_frees_other_streams_cached_blocks);
    tcase_add_test(tc, expandable_segments_are_per_stream);
    suite_add_tcase(s, tc);
    tc = tcase_create("tags");
    tcase_add_test(tc, a_tag_has_segments_of_its_own);
    tcase_add_test(tc, a_sleeping_tag_gives_every_byte_back_and_wakes_at_the_same_addresses);
    tcase_add_test(tc, a_sleeping_tag_under_the_load_policy_wakes_the_same);
    tcase_add_test(tc, blocks_freed_asleep_and_discarded_sleep);
    tcase_add_test(tc, destroy_takes_a_sleeping_tag);
    tcase_add_test(tc, tag_zero_and_fake_offload_are_refused);
    suite_add_tcase(s, tc);
    return s;
}
