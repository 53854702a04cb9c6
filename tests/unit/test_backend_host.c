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

Suite *backend_host_suite(void)
{
    Suite *s = suite_create("backend_host");
    TCase *tc = tcase_create("host");

    tcase_add_test(tc, segments_are_sealed_memfds_that_another_mapping_sees);
    tcase_add_test(tc, capacity_is_per_device_and_returns_on_free);
    tcase_add_test(tc, factory_knows_its_backends);
    tcase_add_test(tc, allocator_on_host_gives_writable_blocks_inside_their_segment);
    suite_add_tcase(s, tc);
    return s;
}
