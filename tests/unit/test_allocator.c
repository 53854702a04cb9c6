/* The caching allocator's rules, one test each, against PyTorch's behaviour,
 * and a randomized replay that checks every invariant after every step. */
#include "tests/unit/suites.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/allocator.h"
#include "allocator/trace.h"

#define KiB (1024ULL)
#define MiB (1024ULL * 1024ULL)
#define GiB (1024ULL * MiB)

typedef struct fixture {
    wa_backend *backend;
    wa_allocator *a;
} fixture;

static void setup(fixture *f, uint64_t capacity, const char *conf)
{
    wd_error err = {0};

    ck_assert_int_eq(wa_backend_fake_create(1, capacity, &f->backend, &err), 0);
    ck_assert_msg(wa_create(f->backend, conf, &f->a, &err) == 0, "%s", err.msg);
}

static void teardown(fixture *f)
{
    wd_error err = {0};

    ck_assert_msg(wa_check(f->a, &err) == 0, "%s", err.msg);
    wa_destroy(f->a);
    wa_backend_destroy(f->backend);
}

static wa_block *alloc_ok(fixture *f, uint64_t size)
{
    wa_block *b = NULL;
    wd_error err = {0};

    ck_assert_msg(wa_malloc(f->a, 0, size, &b, &err) == 0, "malloc(%llu): %s", (unsigned long long)size, err.msg);
    ck_assert_ptr_nonnull(b);
    ck_assert_msg(wa_check(f->a, &err) == 0, "%s", err.msg);
    return b;
}

static wa_stats stats(fixture *f)
{
    wa_stats s;
    ck_assert_int_eq(wa_get_stats(f->a, 0, &s), 0);
    return s;
}


static wa_region region(const wa_block *b)
{
    wa_region r;
    wa_block_region(b, &r);
    return r;
}

static uint64_t block_size(const wa_block *b)
{
    return region(b).size;
}

START_TEST(sizes_round_to_512_bytes)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    ck_assert_uint_eq(block_size(alloc_ok(&f, 1)), 512);
    ck_assert_uint_eq(block_size(alloc_ok(&f, 512)), 512);
    ck_assert_uint_eq(block_size(alloc_ok(&f, 513)), 1024);
    ck_assert_uint_eq(block_size(alloc_ok(&f, 3 * MiB + 1)), 3 * MiB + 512);
    teardown(&f);
}
END_TEST

START_TEST(roundup_power2_divisions_round_to_the_next_division)
{
    fixture f;
    setup(&f, 4 * GiB, "roundup_power2_divisions:4");
    /* 1.2 MiB lies between 1 and 2 MiB; four divisions are 1, 1.25, 1.5, 1.75 MiB. */
    ck_assert_uint_eq(block_size(alloc_ok(&f, 1200 * KiB)), 1280 * KiB);
    /* Powers of two stay; small sizes (<= 512 x divisions) round to 512 bytes. */
    ck_assert_uint_eq(block_size(alloc_ok(&f, 4 * MiB)), 4 * MiB);
    ck_assert_uint_eq(block_size(alloc_ok(&f, 1500)), 1536);
    teardown(&f);
}
END_TEST

START_TEST(small_requests_share_2mib_segments)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    for (int i = 0; i < 4; i++)
        alloc_ok(&f, 100 * KiB);
    wa_stats s = stats(&f);
    ck_assert_int_eq(s.segment.current, 1);
    ck_assert_int_eq(s.reserved_bytes.current, (int64_t)(2 * MiB));
    ck_assert_int_eq(s.allocation.current, 4);
    teardown(&f);
}
END_TEST

START_TEST(medium_requests_get_a_20mib_segment_and_split_it)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    alloc_ok(&f, 5 * MiB);
    wa_stats s = stats(&f);
    ck_assert_int_eq(s.reserved_bytes.current, (int64_t)(20 * MiB));
    ck_assert_int_eq(s.inactive_split_bytes.current, (int64_t)(15 * MiB));
    ck_assert_int_eq(s.inactive_split.current, 1);
    /* A second medium request is cut from the remainder. */
    alloc_ok(&f, 5 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 1);
    teardown(&f);
}
END_TEST

START_TEST(large_requests_round_to_2mib_and_keep_small_remainders)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    wa_block *b = alloc_ok(&f, 15 * MiB);
    /* 16 MiB segment; the 1 MiB left is not over kSmallSize, so no split. */
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(16 * MiB));
    ck_assert_uint_eq(block_size(b), 16 * MiB);
    ck_assert_int_eq(stats(&f).inactive_split.current, 0);
    teardown(&f);
}
END_TEST

START_TEST(freeing_merges_neighbours)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    wa_block *x = alloc_ok(&f, 4 * MiB), *y = alloc_ok(&f, 4 * MiB), *z = alloc_ok(&f, 4 * MiB);
    wa_free(f.a, y);
    ck_assert_int_eq(stats(&f).inactive_split.current, 2); /* the hole and the tail */
    wa_free(f.a, x);
    wa_free(f.a, z);
    wa_stats s = stats(&f);
    ck_assert_int_eq(s.inactive_split.current, 0);
    ck_assert_int_eq(s.inactive_split_bytes.current, 0);
    ck_assert_uint_eq(s.largest_free_block, 20 * MiB);
    ck_assert_int_eq(s.allocated_bytes.current, 0);
    ck_assert_int_eq(s.reserved_bytes.current, (int64_t)(20 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(best_fit_takes_the_smallest_block_that_fits)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    wa_block *big = alloc_ok(&f, 64 * MiB), *small = alloc_ok(&f, 32 * MiB);
    wa_region rs;
    wa_block_region(small, &rs);
    wa_free(f.a, big);
    wa_free(f.a, small);
    wa_block *b = alloc_ok(&f, 30 * MiB);
    wa_region rb;
    wa_block_region(b, &rb);
    ck_assert_uint_eq(rb.segment_id, rs.segment_id);
    teardown(&f);
}
END_TEST

START_TEST(max_split_size_keeps_oversize_blocks_whole)
{
    fixture f;
    setup(&f, 4 * GiB, "max_split_size_mb:20");
    wa_free(f.a, alloc_ok(&f, 50 * MiB));
    /* A 5 MiB request may not take the cached 50 MiB block: a new segment.
     * That 20 MiB segment is itself at max_split_size, so it is oversize too:
     * once free and whole again it serves no small request (the dead slabs). */
    wa_block *b = alloc_ok(&f, 5 * MiB);
    wa_stats s = stats(&f);
    ck_assert_int_eq(s.segment.current, 2);
    ck_assert_int_eq(s.oversize_segments.current, 2);
    wa_free(f.a, b);
    alloc_ok(&f, 5 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 3);
    teardown(&f);
}
END_TEST

START_TEST(oversize_block_reused_only_within_max_non_split_rounding)
{
    fixture f;
    setup(&f, 4 * GiB, "max_split_size_mb:20");
    wa_free(f.a, alloc_ok(&f, 64 * MiB));
    /* 50 MiB + 20 MiB rounding > 64 MiB: the cached block serves it, whole. */
    wa_block *b = alloc_ok(&f, 50 * MiB);
    ck_assert_uint_eq(block_size(b), 64 * MiB);
    ck_assert_int_eq(stats(&f).oversize_allocations.current, 1);
    wa_free(f.a, b);
    /* 40 MiB + 20 MiB is under 64 MiB: too wasteful, a new segment. */
    alloc_ok(&f, 40 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 2);
    teardown(&f);
}
END_TEST

START_TEST(out_of_memory_reports_reserved_but_unallocated)
{
    fixture f;
    wa_block *b = NULL;
    wd_error err = {0};

    setup(&f, 64 * MiB, NULL);
    alloc_ok(&f, 40 * MiB);
    ck_assert_int_eq(wa_malloc(f.a, 0, 40 * MiB, &b, &err), -ENOMEM);
    ck_assert_ptr_null(b);
    ck_assert_ptr_nonnull(strstr(err.msg, "reserved but unallocated"));
    ck_assert_ptr_nonnull(strstr(err.msg, "out of memory on device 0"));
    wa_stats s = stats(&f);
    ck_assert_uint_eq(s.num_ooms, 1);
    ck_assert_uint_eq(s.num_alloc_retries, 1);
    ck_assert_int_eq(s.reserved_bytes.current, (int64_t)(40 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(cached_blocks_are_freed_and_the_allocation_retried)
{
    fixture f;
    setup(&f, 100 * MiB, NULL);
    /* Two 40 MiB segments cached, then a 90 MiB request that needs them gone. */
    wa_block *x = alloc_ok(&f, 40 * MiB), *y = alloc_ok(&f, 40 * MiB);
    wa_free(f.a, x);
    wa_free(f.a, y);
    alloc_ok(&f, 90 * MiB);
    wa_stats s = stats(&f);
    ck_assert_uint_eq(s.num_alloc_retries, 1);
    ck_assert_uint_eq(s.num_device_free, 2);
    ck_assert_int_eq(s.segment.current, 1);
    teardown(&f);
}
END_TEST

START_TEST(release_available_frees_just_enough_oversize_blocks)
{
    fixture f;
    setup(&f, 200 * MiB, "max_split_size_mb:20");
    wa_block *b[4];
    for (int i = 0; i < 4; i++)
        b[i] = alloc_ok(&f, 40 * MiB);
    for (int i = 0; i < 4; i++)
        wa_free(f.a, b[i]);
    /* 160 MiB cached in four oversize blocks; 70 MiB more needs two of them
     * freed (largest first) but not all four, and no full retry. */
    alloc_ok(&f, 70 * MiB);
    wa_stats s = stats(&f);
    ck_assert_uint_eq(s.num_alloc_retries, 0);
    ck_assert_uint_eq(s.num_device_free, 2);
    teardown(&f);
}
END_TEST

START_TEST(split_segments_are_not_released)
{
    fixture f;
    wa_block *b = NULL;
    wd_error err = {0};

    setup(&f, 40 * MiB, NULL);
    alloc_ok(&f, 2 * MiB); /* a 20 MiB segment, split */
    ck_assert_int_eq(wa_malloc(f.a, 0, 30 * MiB, &b, &err), -ENOMEM);
    wa_empty_cache(f.a, 0);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(20 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(empty_cache_gives_every_free_segment_back)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    wa_free(f.a, alloc_ok(&f, 100 * MiB));
    wa_free(f.a, alloc_ok(&f, 200 * KiB));
    ck_assert_int_eq(stats(&f).segment.current, 2);
    wa_empty_cache(f.a, -1);
    wa_stats s = stats(&f);
    ck_assert_int_eq(s.segment.current, 0);
    ck_assert_int_eq(s.reserved_bytes.current, 0);
    ck_assert_int_eq(s.reserved_bytes.peak, (int64_t)(100 * MiB + 2 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(garbage_collection_frees_old_cached_blocks_past_the_threshold)
{
    fixture f;
    setup(&f, 100 * MiB, "garbage_collection_threshold:0.5");
    wa_block *x = alloc_ok(&f, 30 * MiB), *y = alloc_ok(&f, 30 * MiB);
    wa_free(f.a, x);
    wa_free(f.a, y);
    /* reserved 60 MiB > 50 MiB threshold: a new segment triggers GC first. */
    alloc_ok(&f, 40 * MiB);
    wa_stats s = stats(&f);
    ck_assert_uint_ge(s.num_device_free, 1);
    ck_assert_uint_eq(s.num_alloc_retries, 0);
    teardown(&f);
}
END_TEST

START_TEST(policy_pop_restores_every_key)
{
    fixture f;
    wa_config before;
    wd_error err = {0};
    char text[256];

    setup(&f, 4 * GiB, "garbage_collection_threshold:0.7,max_non_split_rounding_mb:64,roundup_power2_divisions:[1:2,2:8,>:8]");
    before = *wa_get_config(f.a);
    ck_assert_int_eq(wa_policy_push(f.a, "max_split_size_mb:20", &err), 0);
    ck_assert_uint_eq(wa_get_config(f.a)->max_split_size, 20 * MiB);
    /* The overlay kept the other keys. */
    ck_assert(wa_get_config(f.a)->garbage_collection_threshold == 0.7);
    ck_assert_uint_eq(wa_get_config(f.a)->max_non_split_rounding, 64 * MiB);
    ck_assert_int_eq(wa_policy_push(f.a, "max_split_size_mb:40,garbage_collection_threshold:0.2", &err), 0);
    ck_assert_uint_eq(wa_policy_depth(f.a), 2);
    ck_assert_int_eq(wa_policy_pop(f.a), 0);
    ck_assert_uint_eq(wa_get_config(f.a)->max_split_size, 20 * MiB);
    ck_assert(wa_get_config(f.a)->garbage_collection_threshold == 0.7);
    ck_assert_int_eq(wa_policy_pop(f.a), 0);
    ck_assert(wa_config_equal(wa_get_config(f.a), &before));
    ck_assert_str_eq(wa_config_format(wa_get_config(f.a), text, sizeof text),
                     "max_non_split_rounding_mb:64,garbage_collection_threshold:0.7,"
                     "roundup_power2_divisions:[1:2,2:8,4:8,8:8,16:8,32:8,64:8,128:8,256:8,512:8,1024:8,2048:8,"
                     "4096:8,8192:8,16384:8,>:8]");
    ck_assert_int_eq(wa_policy_pop(f.a), -ENOENT);
    teardown(&f);
}
END_TEST

START_TEST(policy_push_with_a_bad_conf_changes_nothing)
{
    fixture f;
    wd_error err = {0};

    setup(&f, 4 * GiB, NULL);
    ck_assert_int_eq(wa_policy_push(f.a, "max_split_size_mb:5", &err), -EINVAL);
    ck_assert_uint_eq(wa_policy_depth(f.a), 0);
    ck_assert_uint_eq(wa_get_config(f.a)->max_split_size, UINT64_MAX);
    ck_assert_int_eq(wa_policy_push(f.a, "expandable_page_mb:3", &err), -EINVAL);
    ck_assert_uint_eq(wa_policy_depth(f.a), 0);
    /* A backend that cannot map pages refuses expandable segments. */
    f.backend->va_reserve = NULL;
    ck_assert_int_eq(wa_policy_push(f.a, "expandable_segments:True", &err), -ENOTSUP);
    ck_assert_uint_eq(wa_policy_depth(f.a), 0);
    teardown(&f);
}
END_TEST

START_TEST(shrinking_max_split_size_makes_cached_blocks_oversize)
{
    fixture f;
    wd_error err = {0};

    setup(&f, 4 * GiB, NULL);
    wa_free(f.a, alloc_ok(&f, 60 * MiB));
    /* Under the default, a cached 60 MiB block is split for a 5 MiB request. */
    wa_free(f.a, alloc_ok(&f, 5 * MiB));
    ck_assert_int_eq(stats(&f).segment.current, 1);
    /* Under max_split_size_mb:20 the same cached block is oversize: whole or nothing. */
    ck_assert_int_eq(wa_policy_push(f.a, "max_split_size_mb:20", &err), 0);
    alloc_ok(&f, 5 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 2);
    /* Oversize figures count what was oversize when it was made: the new
     * 20 MiB segment is, the 60 MiB one made under the default is not. */
    ck_assert_int_eq(stats(&f).oversize_segments.current, 1);
    wa_policy_pop(f.a);
    teardown(&f);
}
END_TEST

START_TEST(growing_max_split_size_lets_cached_blocks_split_again)
{
    fixture f;
    wd_error err = {0};

    setup(&f, 4 * GiB, "max_split_size_mb:20");
    wa_free(f.a, alloc_ok(&f, 60 * MiB));
    /* Oversize under 20 MiB: a 5 MiB request gets a segment of its own. */
    wa_free(f.a, alloc_ok(&f, 5 * MiB));
    ck_assert_int_eq(stats(&f).segment.current, 2);
    /* Grown to 128 MiB: the same cached 60 MiB block is split for it. */
    ck_assert_int_eq(wa_policy_push(f.a, "max_split_size_mb:128", &err), 0);
    wa_block *b = alloc_ok(&f, 30 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 2);
    ck_assert_uint_eq(region(b).segment_size, 60 * MiB);
    ck_assert_int_eq(stats(&f).inactive_split.current, 1);
    wa_policy_pop(f.a);
    teardown(&f);
}
END_TEST

START_TEST(destroy_frees_blocks_still_handed_out)
{
    fixture f;
    setup(&f, 4 * GiB, NULL);
    for (int i = 0; i < 50; i++)
        alloc_ok(&f, (uint64_t)(i + 1) * 300 * KiB);
    /* teardown's wa_destroy must free them all; ASan reports any leak. */
    teardown(&f);
}
END_TEST

START_TEST(snapshot_lists_segments_in_address_order_with_tiling_blocks)
{
    fixture f;
    wa_snap_segment *segs;
    size_t n;

    setup(&f, 4 * GiB, NULL);
    alloc_ok(&f, 3 * MiB);
    alloc_ok(&f, 100 * KiB);
    alloc_ok(&f, 50 * MiB);
    ck_assert_int_eq(wa_snapshot(f.a, 0, &segs, &n), 0);
    ck_assert_uint_eq(n, 3);
    for (size_t i = 0; i < n; i++) {
        uint64_t at = segs[i].addr;
        if (i)
            ck_assert_uint_gt(segs[i].addr, segs[i - 1].addr);
        for (size_t j = 0; j < segs[i].n_blocks; j++) {
            ck_assert_uint_eq(segs[i].blocks[j].addr, at);
            at += segs[i].blocks[j].size;
        }
        ck_assert_uint_eq(at, segs[i].addr + segs[i].size);
    }
    wa_snapshot_free(segs, n);
    teardown(&f);
}
END_TEST

START_TEST(bad_device_is_enodev)
{
    fixture f;
    wa_block *b;
    wd_error err = {0};
    wa_stats s;

    setup(&f, 4 * GiB, NULL);
    ck_assert_int_eq(wa_malloc(f.a, 1, 100, &b, &err), -ENODEV);
    ck_assert_int_eq(wa_malloc(f.a, -1, 100, &b, &err), -ENODEV);
    ck_assert_int_eq(wa_get_stats(f.a, 3, &s), -ENODEV);
    teardown(&f);
}
END_TEST

/* Long random traces under random policies and capacities: after every
 * operation the blocks tile their segments, free neighbours are merged, the
 * pools are ordered and every statistic equals a recount (wa_check). */
START_TEST(random_traces_keep_every_invariant)
{
    static const char *const confs[] = {
        NULL, "max_split_size_mb:20", "max_split_size_mb:64,max_non_split_rounding_mb:40",
        "garbage_collection_threshold:0.6", "roundup_power2_divisions:[1:4,64:8,>:2]",
        "max_split_size_mb:24,garbage_collection_threshold:0.9,roundup_power2_divisions:2",
        "expandable_segments:True", WA_WEIGHTD_POLICY,
        "expandable_segments:True,expandable_page_mb:4,max_split_size_mb:64,roundup_power2_divisions:4",
    };
#define N_CONFS (sizeof confs / sizeof confs[0])
    unsigned seed = 12345u + (unsigned)_i;
    fixture f;
    wa_block *live[512] = {0};
    wd_error err = {0};

    setup(&f, (uint64_t)(256 + rand_r(&seed) % 2048) * MiB, confs[_i % N_CONFS]);
    for (int step = 0; step < 6000; step++) {
        unsigned k = (unsigned)rand_r(&seed) % 512, r = (unsigned)rand_r(&seed);
        if (live[k]) {
            wa_free(f.a, live[k]);
            live[k] = NULL;
        } else {
            /* Sizes across the small pool, the 20 MiB class and large blocks. */
            uint64_t size = r % 4 == 0 ? r % (1 * MiB) : r % 4 == 1 ? r % (10 * MiB) : r % (200 * MiB);
            int rc = wa_malloc(f.a, 0, size + 1, &live[k], &err);
            ck_assert_msg(rc == 0 || rc == -ENOMEM, "malloc: %s", err.msg);
            if (rc)
                live[k] = NULL;
        }
        if (step % 997 == 0 && (r & 1)) {
            /* Policies come and go, expandable segments on and off among them. */
            wa_policy_push(f.a, confs[r % N_CONFS] ? confs[r % N_CONFS] : "expandable_segments:False", &err);
        } else if (step % 1499 == 0) {
            wa_policy_pop(f.a);
            wa_empty_cache(f.a, 0);
        }
        ck_assert_msg(wa_check(f.a, &err) == 0, "step %d: %s", step, err.msg);
    }
    for (int k = 0; k < 512; k++)
        wa_free(f.a, live[k]);
    wa_empty_cache(f.a, 0);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, 0);
    teardown(&f);
}
END_TEST

/* ---- expandable segments and weightd's keys ------------------------------------ */

START_TEST(expandable_segments_map_pages_as_needed)
{
    fixture f;
    setup(&f, 4 * GiB, "expandable_segments:True");
    wa_block *a = alloc_ok(&f, 5 * MiB), *b = alloc_ok(&f, 5 * MiB);
    wa_stats s = stats(&f);
    /* PyTorch's large-pool page is 20 MiB: both fit the first page. */
    ck_assert_int_eq(s.reserved_bytes.current, (int64_t)(20 * MiB));
    ck_assert_int_eq(s.segment.current, 0); /* PyTorch counts no expandable segments */
    ck_assert_uint_eq(s.num_device_alloc, 1);
    /* One address range: the second block follows the first. */
    ck_assert_uint_eq(region(b).addr, region(a).addr + region(a).size);
    /* 30 MiB more: the 10 MiB left in the first page, and one more page. */
    alloc_ok(&f, 30 * MiB);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(40 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(expandable_page_mb_sets_the_large_page)
{
    fixture f;
    setup(&f, 4 * GiB, "expandable_segments:True,expandable_page_mb:2");
    alloc_ok(&f, 5 * MiB);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(6 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(freed_pages_go_back_and_the_range_with_them)
{
    fixture f;
    wa_snap_segment *segs;
    size_t n;

    setup(&f, 4 * GiB, "expandable_segments:True,expandable_page_mb:2");
    wa_block *a = alloc_ok(&f, 7 * MiB), *b = alloc_ok(&f, 7 * MiB);
    wa_free(f.a, a);
    wa_empty_cache(f.a, 0);
    /* a's pages that b does not touch are unmapped: 14 MiB of blocks on
     * 7 pages, 3 of them a's alone. */
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(8 * MiB));
    wa_free(f.a, b);
    wa_empty_cache(f.a, 0);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, 0);
    ck_assert_int_eq(wa_snapshot(f.a, 0, &segs, &n), 0);
    ck_assert_uint_eq(n, 0);
    wa_snapshot_free(segs, n);
    teardown(&f);
}
END_TEST

START_TEST(page_align_keeps_sub_page_blocks_inside_one_page)
{
    static const char *const confs[] = {"expandable_segments:True,expandable_page_mb:2",
                                        "expandable_segments:True,expandable_page_mb:2,expandable_page_align:True"};
    for (int aligned = 0; aligned < 2; aligned++) {
        fixture f;
        setup(&f, 4 * GiB, confs[aligned]);
        wa_block *a = alloc_ok(&f, 1536 * KiB), *b = alloc_ok(&f, 1536 * KiB), *c = alloc_ok(&f, 1536 * KiB);
        uint64_t off = region(b).addr - region(b).segment_addr;
        wa_free(f.a, b);
        wa_empty_cache(f.a, 0);
        if (aligned) {
            /* b started on a page of its own; freeing it gives the page back. */
            ck_assert_uint_eq(off % (2 * MiB), 0);
            ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(4 * MiB));
        } else {
            /* b straddled two pages shared with a and c: nothing goes back. */
            ck_assert_uint_ne(off % (2 * MiB), 0);
            ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(6 * MiB));
        }
        wa_free(f.a, a);
        wa_free(f.a, c);
        teardown(&f);
    }
}
END_TEST

START_TEST(expandable_out_of_memory_unmaps_and_retries)
{
    fixture f;
    wa_block *b = NULL;
    wd_error err = {0};

    setup(&f, 64 * MiB, "expandable_segments:True,expandable_page_mb:2,max_split_size_mb:20");
    wa_block *x = alloc_ok(&f, 30 * MiB);
    alloc_ok(&f, 30 * MiB);
    wa_free(f.a, x);
    /* 30 MiB free but mapped: the retry path unmaps it and maps it again. */
    alloc_ok(&f, 32 * MiB);
    ck_assert_uint_eq(stats(&f).num_alloc_retries, 1);
    ck_assert_int_eq(wa_malloc(f.a, 0, 40 * MiB, &b, &err), -ENOMEM);
    ck_assert_ptr_nonnull(strstr(err.msg, "reserved but unallocated"));
    teardown(&f);
}
END_TEST

START_TEST(coalesced_mappings_are_one_allocation_and_go_back_when_free)
{
    fixture f;
    setup(&f, 4 * GiB, WA_WEIGHTD_POLICY);
    /* 31 MiB: 15 full pages as one allocation, the part-filled 16th alone. */
    wa_block *a = alloc_ok(&f, 31 * MiB), *b = alloc_ok(&f, 10 * MiB);
    ck_assert_uint_eq(stats(&f).num_device_alloc, 2); /* mappings, as PyTorch counts them */
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(42 * MiB));
    /* Freeing a gives its own allocation back at once; the page it shares
     * with b stays. */
    wa_free(f.a, a);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(12 * MiB));
    wa_free(f.a, b);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, 0);
    teardown(&f);
}
END_TEST

START_TEST(expandable_blocks_wait_while_expandable_segments_are_off)
{
    fixture f;
    wd_error err = {0};

    setup(&f, 4 * GiB, "expandable_segments:True,expandable_page_mb:2");
    wa_free(f.a, alloc_ok(&f, 40 * MiB));
    ck_assert_int_eq(wa_policy_push(f.a, "expandable_segments:False", &err), 0);
    /* The free expandable block is not handed out: a classic segment is made. */
    wa_block *b = alloc_ok(&f, 10 * MiB);
    ck_assert_int_eq(stats(&f).segment.current, 1);
    wa_free(f.a, b);
    wa_policy_pop(f.a);
    alloc_ok(&f, 10 * MiB);
    ck_assert_int_eq(stats(&f).reserved_bytes.current, (int64_t)(40 * MiB + 10 * MiB));
    teardown(&f);
}
END_TEST

START_TEST(weightd_keys_parse_and_print)
{
    wa_config c;
    wd_error err = {0};
    char text[256];

    ck_assert_int_eq(wa_config_parse(WA_WEIGHTD_POLICY, NULL, WA_CONF_OVERLAY, &c, &err), 0);
    ck_assert(c.expandable_segments && c.expandable_page_align);
    ck_assert_uint_eq(c.expandable_page, 2 * MiB);
    ck_assert_uint_eq(c.max_split_size, 20 * MiB);
    ck_assert_str_eq(wa_config_format(&c, text, sizeof text),
                     "max_split_size_mb:20,expandable_segments:True,expandable_page_mb:2,expandable_page_align:True,"
                     "expandable_coalesce:True");
    ck_assert_int_eq(wa_config_parse("expandable_page_mb:3", NULL, WA_CONF_OVERLAY, &c, &err), -EINVAL);
    ck_assert_int_eq(wa_config_parse("expandable_page_mb:0", NULL, WA_CONF_OVERLAY, &c, &err), -EINVAL);
    ck_assert_int_eq(wa_config_parse("expandable_page_align:yes", NULL, WA_CONF_OVERLAY, &c, &err), -EINVAL);
}
END_TEST

/* ---- traces ------------------------------------------------------------------ */

static wa_trace *parse(const char *text)
{
    wa_trace *t = NULL;
    wd_error err = {0};
    ck_assert_msg(wa_trace_parse(text, strlen(text), "t", &t, &err) == 0, "%s", err.msg);
    return t;
}

START_TEST(trace_replay_reports_peaks_marks_and_oom_line)
{
    wa_trace *t = parse("# comment\nalloc a 1048577\nalloc b 30000000\nmark two\nfree a\npolicy max_split_size_mb:20\n"
                        "alloc c 90000000\n");
    wa_replay_opts o = {.capacity = 100 * MiB};
    wa_replay_result r;
    wd_error err = {0};

    ck_assert_uint_eq(wa_trace_peak_live(t), 1048577 + 30000000 + 90000000 - 1048577);
    ck_assert_int_eq(wa_trace_replay(t, &o, &r, &err), 0);
    ck_assert(!r.ok);
    ck_assert_uint_eq(r.oom_line, 7);
    ck_assert_uint_eq(r.n_marks, 1);
    ck_assert_str_eq(r.marks[0].label, "two");
    ck_assert_uint_eq(r.marks[0].reserved, 20 * MiB + 30 * MiB);
    wa_replay_result_free(&r);
    o.capacity = 0;
    ck_assert_int_eq(wa_trace_replay(t, &o, &r, &err), 0);
    ck_assert(r.ok);
    ck_assert_uint_eq(r.peak_live, 120000000);
    wa_replay_result_free(&r);
    wa_trace_free(t);
}
END_TEST

START_TEST(trace_parse_errors_name_the_line)
{
    static const char *const bad[] = {"alloc a\n", "alloc a 1\nalloc a 2\n", "free x\n", "launch 3\n",
                                      "alloc a 12q\n", "policy\n", "alloc a 1 99\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        wa_trace *t = NULL;
        wd_error err = {0};
        ck_assert_int_eq(wa_trace_parse(bad[i], strlen(bad[i]), "t", &t, &err), -EBADMSG);
        ck_assert_ptr_nonnull(strstr(err.msg, "t:"));
        ck_assert_ptr_null(t);
    }
}
END_TEST

START_TEST(min_capacity_is_the_smallest_step_that_completes)
{
    wa_trace *t = parse("alloc a 100000000\nfree a\nalloc b 150000000\n");
    wa_replay_opts o = {0};
    uint64_t cap = 0;
    wd_error err = {0};

    ck_assert_int_eq(wa_trace_min_capacity(t, &o, 64 * MiB, &cap, &err), 0);
    /* b needs a 144 MiB segment (rounded to 2 MiB); a's cached block is
     * freed on the retry path, so 192 MiB (3 steps) is enough. */
    ck_assert_uint_eq(cap, 192 * MiB);
    wa_trace_free(t);
}
END_TEST

/* The committed traces (bench/traces; run from the repository's root, as
 * make does): PyTorch's own figures, and weightd's policy against them. */
static void replay_file(const char *name, const char *load_policy, uint64_t *peak_reserved, uint64_t *min_cap,
                        uint64_t *peak_live)
{
    char path[256];
    wa_trace *t = NULL;
    wa_replay_opts o = {.load_policy = load_policy};
    wa_replay_result r;
    wd_error err = {0};

    snprintf(path, sizeof path, "bench/traces/%s.trace", name);
    ck_assert_msg(wa_trace_load(path, &t, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(wa_trace_replay(t, &o, &r, &err), 0);
    ck_assert(r.ok);
    *peak_reserved = r.peak_reserved;
    *peak_live = r.peak_live;
    wa_replay_result_free(&r);
    ck_assert_int_eq(wa_trace_min_capacity(t, &o, 64 * MiB, min_cap, &err), 0);
    wa_trace_free(t);
}

START_TEST(shared_traces_give_pytorchs_figures)
{
    /* shared/traces/README.md: PyTorch 2.11 on an H200. */
    static const struct {
        const char *name;
        uint64_t peak_reserved, min_capacity;
    } ref[] = {
        {"gptoss-tp2-default", 37467717632ULL, 37379637248ULL},
        {"gptoss-tp2-tight", 36983275520ULL, 35836133376ULL},
        {"dead-slabs-default", 1530920960ULL, 1543503872ULL},
        {"dead-slabs-tight", 2386558976ULL, 1342177280ULL},
    };
    for (size_t i = 0; i < sizeof ref / sizeof ref[0]; i++) {
        uint64_t peak, cap, live;
        replay_file(ref[i].name, NULL, &peak, &cap, &live);
        ck_assert_uint_eq(peak, ref[i].peak_reserved);
        ck_assert_uint_eq(cap, ref[i].min_capacity);
    }
}
END_TEST

START_TEST(weightd_policy_meets_its_targets)
{
    uint64_t peak, cap, live;

    replay_file("gptoss-tp2-tight", WA_WEIGHTD_POLICY, &peak, &cap, &live);
    ck_assert_msg((double)cap / (double)live <= 1.005, "gpt-oss: %.4f", (double)cap / (double)live);
    replay_file("dead-slabs-tight", WA_WEIGHTD_POLICY, &peak, &cap, &live);
    ck_assert_msg((double)cap / (double)live <= 1.05, "dead slabs: %.4f", (double)cap / (double)live);
}
END_TEST

Suite *allocator_suite(void)
{
    Suite *s = suite_create("allocator");
    TCase *tc = tcase_create("rules");

    tcase_add_test(tc, sizes_round_to_512_bytes);
    tcase_add_test(tc, roundup_power2_divisions_round_to_the_next_division);
    tcase_add_test(tc, small_requests_share_2mib_segments);
    tcase_add_test(tc, medium_requests_get_a_20mib_segment_and_split_it);
    tcase_add_test(tc, large_requests_round_to_2mib_and_keep_small_remainders);
    tcase_add_test(tc, freeing_merges_neighbours);
    tcase_add_test(tc, best_fit_takes_the_smallest_block_that_fits);
    tcase_add_test(tc, max_split_size_keeps_oversize_blocks_whole);
    tcase_add_test(tc, oversize_block_reused_only_within_max_non_split_rounding);
    tcase_add_test(tc, out_of_memory_reports_reserved_but_unallocated);
    tcase_add_test(tc, cached_blocks_are_freed_and_the_allocation_retried);
    tcase_add_test(tc, release_available_frees_just_enough_oversize_blocks);
    tcase_add_test(tc, split_segments_are_not_released);
    tcase_add_test(tc, empty_cache_gives_every_free_segment_back);
    tcase_add_test(tc, garbage_collection_frees_old_cached_blocks_past_the_threshold);
    tcase_add_test(tc, policy_pop_restores_every_key);
    tcase_add_test(tc, policy_push_with_a_bad_conf_changes_nothing);
    tcase_add_test(tc, shrinking_max_split_size_makes_cached_blocks_oversize);
    tcase_add_test(tc, growing_max_split_size_lets_cached_blocks_split_again);
    tcase_add_test(tc, destroy_frees_blocks_still_handed_out);
    tcase_add_test(tc, snapshot_lists_segments_in_address_order_with_tiling_blocks);
    tcase_add_test(tc, bad_device_is_enodev);
    suite_add_tcase(s, tc);

    tc = tcase_create("expandable");
    tcase_add_test(tc, expandable_segments_map_pages_as_needed);
    tcase_add_test(tc, expandable_page_mb_sets_the_large_page);
    tcase_add_test(tc, freed_pages_go_back_and_the_range_with_them);
    tcase_add_test(tc, page_align_keeps_sub_page_blocks_inside_one_page);
    tcase_add_test(tc, expandable_out_of_memory_unmaps_and_retries);
    tcase_add_test(tc, coalesced_mappings_are_one_allocation_and_go_back_when_free);
    tcase_add_test(tc, expandable_blocks_wait_while_expandable_segments_are_off);
    tcase_add_test(tc, weightd_keys_parse_and_print);
    suite_add_tcase(s, tc);

    tc = tcase_create("random");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, random_traces_keep_every_invariant, 0, 9);
    suite_add_tcase(s, tc);

    tc = tcase_create("traces");
    tcase_add_test(tc, trace_replay_reports_peaks_marks_and_oom_line);
    tcase_add_test(tc, trace_parse_errors_name_the_line);
    tcase_add_test(tc, min_capacity_is_the_smallest_step_that_completes);
    tcase_add_test(tc, shared_traces_give_pytorchs_figures);
    tcase_add_test(tc, weightd_policy_meets_its_targets);
    suite_add_tcase(s, tc);
    return s;
}
