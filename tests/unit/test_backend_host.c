/* The host backend: memfd segments against a capacity. */
#include "tests/unit/suites.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "allocator/allocator.h"

#define MiB (1024ULL * 1024ULL)

START_TEST(segments_are_sealed_memfds_that_another_mapping_sees)
{
    wa_backend *b;
    wa_mem mem;
    wd_error err = {0};
    struct stat st;
    char buf[6] = {0};
    void *other;

    ck_assert_int_eq(wa_backend_host_create(1, 64 * MiB, &b, &err), 0);
    ck_assert_int_eq(b->seg_alloc(b, 0, 4 * MiB, &mem, &err), 0);
    ck_assert_int_ge(mem.fd, 0);
    ck_assert_ptr_nonnull(mem.host);
    ck_assert_int_eq(fstat(mem.fd, &st), 0);
    ck_assert_int_eq(st.st_size, (off_t)(4 * MiB));
    /* Sealed: nobody holding the fd can shrink it under the daemon. */
    ck_assert_int_ne(ftruncate(mem.fd, 4096), 0);
    ck_assert_int_eq(b->write(b, 0, &mem, 1000, "hello", 5, &err), 0);
    other = mmap(NULL, 4 * MiB, PROT_READ, MAP_SHARED, mem.fd, 0);
    ck_assert_ptr_ne(other, MAP_FAILED);
    ck_assert_int_eq(memcmp((char *)other + 1000, "hello", 5), 0);
    munmap(other, 4 * MiB);
    ck_assert_int_eq(b->read(b, 0, &mem, 1000, buf, 5, &err), 0);
    ck_assert_str_eq(buf, "hello");
    ck_assert_int_eq(b->write(b, 0, &mem, 4 * MiB - 2, "hello", 5, &err), -ERANGE);
    b->seg_free(b, 0, &mem);
    wa_backend_destroy(b);
}
END_TEST

START_TEST(capacity_is_per_device_and_returns_on_free)
{
    wa_backend *b;
    wa_mem m1, m2, m3;
    wd_error err = {0};

    ck_assert_int_eq(wa_backend_host_create(2, 10 * MiB, &b, &err), 0);
    ck_assert_int_eq(b->seg_alloc(b, 0, 8 * MiB, &m1, &err), 0);
    ck_assert_int_eq(b->seg_alloc(b, 0, 4 * MiB, &m2, &err), -ENOMEM);
    ck_assert_int_eq(b->seg_alloc(b, 1, 8 * MiB, &m3, &err), 0);
    b->seg_free(b, 0, &m1);
    ck_assert_int_eq(b->seg_alloc(b, 0, 4 * MiB, &m2, &err), 0);
    b->seg_free(b, 0, &m2);
    b->seg_free(b, 1, &m3);
    wa_backend_destroy(b);
}
END_TEST

START_TEST(factory_knows_its_backends)
{
    wa_backend *b = NULL;
    wd_error err = {0};
    wa_backend_opts o = {.name = "host", .n_devices = 2, .capacity = 64 * MiB};

    ck_assert_int_eq(wa_backend_create(&o, &b, &err), 0);
    ck_assert_str_eq(b->name, "host");
    ck_assert_int_eq(b->n_devices, 2);
    wa_backend_destroy(b);
    o.name = "quantum";
    ck_assert_int_eq(wa_backend_create(&o, &b, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "unknown backend \"quantum\""));
    o.name = "host";
    o.capacity = 0;
    ck_assert_int_eq(wa_backend_create(&o, &b, &err), -EINVAL);
    o.capacity = MiB;
    o.n_devices = 0;
    ck_assert_int_eq(wa_backend_create(&o, &b, &err), -EINVAL);
}
END_TEST

START_TEST(allocator_on_host_gives_writable_blocks_inside_their_segment)
{
    wa_backend *b;
    wa_allocator *a;
    wa_block *blk;
    wa_region r;
    wd_error err = {0};

    ck_assert_int_eq(wa_backend_host_create(1, 256 * MiB, &b, &err), 0);
    ck_assert_int_eq(wa_create(b, NULL, &a, &err), 0);
    ck_assert_int_eq(wa_malloc(a, 0, 3 * MiB, &blk, &err), 0);
    wa_block_region(blk, &r);
    ck_assert_uint_eq(r.segment_size, 20 * MiB);
    ck_assert_uint_le(r.offset + r.size, r.segment_size);
    memset((char *)r.mem->host + r.offset, 0xab, r.size);
    wa_free(a, blk);
    wa_destroy(a);
    wa_backend_destroy(b);
}
END_TEST

/* What a worker maps to see a block (wa_block_backing): the segment's memfd
 * for a classic segment; for an expandable one, the memfd of each physical
 * allocation under it (one per request when coalesced, one per page when
 * not), each exactly its allocation's size, so that a worker can map nothing
 * else; each only its owner may open again. */
START_TEST(a_blocks_backing_is_what_a_worker_maps)
{
    static const char *const confs[] = {NULL, "expandable_segments:True,expandable_page_mb:2,expandable_coalesce:True",
                                        "expandable_segments:True,expandable_page_mb:2"};
    for (size_t c = 0; c < sizeof confs / sizeof confs[0]; c++) {
        wa_backend *b;
        wa_allocator *a;
        wa_block *first, *blk;
        wa_region r;
        const wa_mem *back[8];
        wd_error err = {0};
        size_t n;

        ck_assert_int_eq(wa_backend_host_create(1, 256 * MiB, &b, &err), 0);
        ck_assert_int_eq(b->share, WA_SHARE_MEMFD);
        ck_assert_int_eq(wa_create(b, confs[c], &a, &err), 0);
        ck_assert_int_eq(wa_malloc(a, 0, 3 * MiB, &first, &err), 0);
        ck_assert_int_eq(wa_malloc(a, 0, 6 * MiB, &blk, &err), 0);
        wa_block_region(blk, &r);
        n = wa_block_backing(blk, back, 8);
        {
            /* Expandable: a page each (PyTorch's way), or fewer when coalesced. */
            uint64_t page = 2 * MiB, first_page = (r.addr - r.segment_addr) / page;
            size_t pages = (size_t)((r.addr + r.size - 1 - r.segment_addr) / page - first_page + 1);
            if (c == 0)
                ck_assert_uint_eq(n, 1);
            else if (c == 1)
                ck_assert(n >= 1 && n < pages);
            else
                ck_assert_uint_eq(n, pages);
        }
        ck_assert_uint_eq(wa_block_backing(blk, back, 0), n); /* the count, without room */
        /* The pieces tile the block, in address order, each one whole memfd. */
        ck_assert_uint_le(back[0]->addr, r.addr);
        ck_assert_uint_ge(back[n - 1]->addr + back[n - 1]->size, r.addr + r.size);
        for (size_t i = 0; i < n; i++) {
            char probe[4];
            struct stat st;
            ck_assert_int_ge(back[i]->fd, 0);
            ck_assert_int_eq(fstat(back[i]->fd, &st), 0);
            ck_assert_int_eq(st.st_mode & 0777, 0400);
            ck_assert_uint_eq((uint64_t)st.st_size, c == 0 ? r.segment_size : back[i]->size);
            if (i)
                ck_assert_int_ne(back[i]->fd, back[i - 1]->fd);
            if (i)
                ck_assert_uint_eq(back[i]->addr, back[i - 1]->addr + back[i - 1]->size);
            /* The memfd's start is the memory at addr. */
            memcpy((char *)(uintptr_t)back[i]->addr, "wd!", 4);
            ck_assert_int_eq(pread(back[i]->fd, probe, 4, 0), 4);
            ck_assert_str_eq(probe, "wd!");
        }
        wa_free(a, blk);
        wa_free(a, first);
        wa_destroy(a);
        wa_backend_destroy(b);
    }
}
END_TEST

/* A block's memory outlives its allocator and backend (systemd's fd store
 * holds the descriptors across a restart): a new allocator adopts it, with
 * the bytes as they were, as one allocated block it frees like any other.
 * conf: classic segments (one piece) or expandable ones page by page. */
static void adopt_after_restart(const char *conf, uint64_t size, size_t want_pieces)
{
    wa_backend *b1, *b2;
    wa_allocator *a1, *a2;
    wa_block *blk;
    wa_region reg;
    wa_piece pieces[16];
    const wa_mem *mem[16];
    wa_stats st;
    wd_error err = {0};
    size_t n;
    char buf[6] = {0};
    uint64_t page = 2 * MiB;

    ck_assert_int_eq(wa_backend_host_create(1, 64 * MiB, &b1, &err), 0);
    ck_assert_int_eq(wa_create(b1, conf, &a1, &err), 0);
    ck_assert_int_eq(wa_malloc(a1, 0, size, &blk, &err), 0);
    wa_block_region(blk, &reg);
    ck_assert_int_eq(b1->write(b1, 0, reg.mem, reg.offset + size - 5, "bytes", 5, &err), 0);
    n = wa_block_backing(blk, mem, 16);
    ck_assert_uint_eq(n, want_pieces);
    for (size_t i = 0; i < n; i++)
        pieces[i] = (wa_piece){.fd = dup(mem[i]->fd), .size = mem[i]->size};
    wa_destroy(a1); /* the daemon dies; the descriptors live on */
    wa_backend_destroy(b1);

    ck_assert_int_eq(wa_backend_host_create(1, 64 * MiB, &b2, &err), 0);
    ck_assert_int_eq(wa_create(b2, conf, &a2, &err), 0);
    ck_assert_int_eq(wa_adopt(a2, 0, pieces, n, page, size - 100, &blk, &err), 0);
    ck_assert_int_eq(wa_check(a2, &err), 0);
    wa_block_region(blk, &reg);
    ck_assert_uint_eq(reg.size, size);
    ck_assert_uint_eq(reg.requested, size - 100);
    ck_assert_int_eq(b2->read(b2, 0, reg.mem, reg.offset + size - 5, buf, 5, &err), 0);
    ck_assert_str_eq(buf, "bytes");
    ck_assert_uint_eq(wa_block_backing(blk, mem, 16), n);
    ck_assert_int_eq(wa_get_stats(a2, 0, &st), 0);
    ck_assert_int_eq(st.reserved_bytes.current, (int64_t)size);
    ck_assert_int_eq(st.allocated_bytes.current, (int64_t)size);
    wa_free(a2, blk);
    wa_empty_cache(a2, -1);
    ck_assert_int_eq(wa_check(a2, &err), 0);
    ck_assert_int_eq(wa_get_stats(a2, 0, &st), 0);
    ck_assert_int_eq(st.reserved_bytes.current, 0);
    wa_destroy(a2);
    wa_backend_destroy(b2);
}

START_TEST(a_classic_segment_is_adopted_after_a_restart)
{
    adopt_after_restart("max_split_size_mb:20", 24 * MiB, 1);
}
END_TEST

START_TEST(an_expandable_segments_pages_are_adopted_after_a_restart)
{
    adopt_after_restart("expandable_segments:True,expandable_page_mb:2", 8 * MiB, 4);
}
END_TEST

/* What is not a segment's memfd, or not of the size the record says, is
 * refused, and the caller keeps its descriptors. */
START_TEST(adopt_refuses_what_is_not_a_segment)
{
    wa_backend *b;
    wa_allocator *a;
    wa_block *blk;
    wd_error err = {0};
    int plain = memfd_create("plain", MFD_CLOEXEC);
    wa_mem mem;

    ck_assert_int_eq(ftruncate(plain, 4 * MiB), 0);
    ck_assert_int_eq(wa_backend_host_create(1, 64 * MiB, &b, &err), 0);
    ck_assert_int_eq(wa_create(b, NULL, &a, &err), 0);
    ck_assert_int_eq(wa_adopt(a, 0, &(wa_piece){plain, 4 * MiB}, 1, 0, 4 * MiB, &blk, &err), -EBADF);
    ck_assert_int_eq(b->seg_alloc(b, 0, 4 * MiB, &mem, &err), 0);
    ck_assert_int_eq(wa_adopt(a, 0, &(wa_piece){mem.fd, 2 * MiB}, 1, 0, 2 * MiB, &blk, &err), -EBADF);
    ck_assert_int_eq(wa_adopt(a, 0, (wa_piece[]){{mem.fd, 4 * MiB}, {plain, 4 * MiB}}, 2, 2 * MiB, 8 * MiB, &blk,
                              &err), -EBADF);
    ck_assert_int_eq(fcntl(plain, F_GETFD), FD_CLOEXEC); /* still the caller's */
    ck_assert_int_eq(fcntl(mem.fd, F_GETFD) >= 0, 1);
    ck_assert_int_eq(wa_check(a, &err), 0);
    b->seg_free(b, 0, &mem);
    close(plain);
    wa_destroy(a);
    wa_backend_destroy(b);
}
END_TEST

Suite *backend_host_suite(void)
{
    Suite *s = suite_create("backend_host");
    TCase *tc = tcase_create("host");

    tcase_add_test(tc, segments_are_sealed_memfds_that_another_mapping_sees);
    tcase_add_test(tc, capacity_is_per_device_and_returns_on_free);
    tcase_add_test(tc, factory_knows_its_backends);
    tcase_add_test(tc, allocator_on_host_gives_writable_blocks_inside_their_segment);
    tcase_add_test(tc, a_blocks_backing_is_what_a_worker_maps);
    tcase_add_test(tc, a_classic_segment_is_adopted_after_a_restart);
    tcase_add_test(tc, an_expandable_segments_pages_are_adopted_after_a_restart);
    tcase_add_test(tc, adopt_refuses_what_is_not_a_segment);
    suite_add_tcase(s, tc);
    return s;
}
