/* fuzz_header: libFuzzer harness for the safetensors parser (safetensors.h).
 *
 * Each input is tried four ways:
 *   A. a whole-file image: st_parse_buffer(input);
 *   B. the same image through a file descriptor (a memfd): st_read_fd, which
 *      must agree with A, message included (behind its "img: " prefix);
 *   C. the header JSON alone, data length unknown: st_parse_header(input,
 *      ST_DATA_LEN_UNKNOWN);
 *   D. the first 8 bytes as a little-endian data length, the rest as the
 *      header JSON: st_parse_header(input + 8, le64(input)).
 * A success must satisfy every invariant of fz_check_file (sorted, tiling
 * [0, data_len) exactly, every name findable, nbytes == numel * bits / 8);
 * a failure must leave a zeroed result and a one-line message. A successful
 * header must also survive a round trip through st_build_header, parse the
 * same with the data length unknown, and be refused with one byte more (or
 * less) of data.
 *
 * Build: make fuzz; run: make fuzz-run (see tests/fuzz/README.md). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loader/safetensors.h"
#include "tests/fuzz/fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char err[1024];

/* Parses the header again with its data length off by delta: it must be
 * refused, cleanly. */
static void check_wrong_len(const char *json, size_t len, uint64_t data_len, int delta)
{
    st_file g;
    int rc;

    if ((delta < 0 && data_len == 0) || (delta > 0 && data_len >= ST_DATA_LEN_UNKNOWN - 1))
        return;
    rc = st_parse_header(json, len, delta < 0 ? data_len - 1 : data_len + 1, &g, err, sizeof err);
    FZ_CHECK(rc < 0, "data length %llu%+d accepted", (unsigned long long)data_len, delta);
    fz_check_failed(rc, &g, err, sizeof err);
}

/* The writer's header for the parsed tensors (in data order, so the offsets
 * come out the same) must parse back to the same thing. */
static void check_round_trip(const st_file *f, uint64_t data_len)
{
    st_tensor_spec *specs = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *specs);
    char *out = NULL;
    size_t out_len = 0;
    uint64_t built_len = 0;
    st_file g;
    int rc;

    FZ_CHECK(specs != NULL, "out of memory");
    for (size_t i = 0; i < f->n_tensors; i++)
        specs[i] = (st_tensor_spec){f->tensors[i].name, f->tensors[i].dtype, f->tensors[i].ndim,
                                    f->tensors[i].shape};
    rc = st_build_header(specs, f->n_tensors, f->meta, f->n_meta, &out, &out_len, &built_len, err,
                         sizeof err);
    free(specs);
    if (rc == -EFBIG || rc == -ENOMEM)
        return;
    FZ_CHECK(rc == 0, "the writer refuses a parsed header: %s", err);
    FZ_CHECK(out_len >= 8 && out_len % 8 == 0, "built header of %zu bytes", out_len);
    FZ_CHECK(fz_le64((const uint8_t *)out) == out_len - 8, "built prefix wrong");
    if (data_len != ST_DATA_LEN_UNKNOWN)
        FZ_CHECK(built_len == data_len, "built data length %llu, parsed %llu",
                 (unsigned long long)built_len, (unsigned long long)data_len);
    rc = st_parse_header(out + 8, out_len - 8, built_len, &g, err, sizeof err);
    FZ_CHECK(rc == 0, "the parser refuses the writer's header: %s", err);
    fz_check_file(&g, out_len - 8, built_len);
    fz_check_same(f, &g);
    st_free(&g);
    free(out);
}

/* Everything a successful parse of a header must also do. */
static void check_success(const st_file *f, const char *json, size_t len, uint64_t data_len)
{
    uint64_t end = fz_check_file(f, len, data_len);
    st_file g;
    int rc;

    if (data_len != ST_DATA_LEN_UNKNOWN) {
        /* Without the length: the same result. */
        rc = st_parse_header(json, len, ST_DATA_LEN_UNKNOWN, &g, err, sizeof err);
        FZ_CHECK(rc == 0, "accepted with the data length, refused without: %s", err);
        fz_check_file(&g, len, ST_DATA_LEN_UNKNOWN);
        fz_check_same(f, &g);
        st_free(&g);
        check_wrong_len(json, len, data_len, +1);
        check_wrong_len(json, len, data_len, -1);
    } else {
        /* With the length the tensors imply: the same result. */
        rc = st_parse_header(json, len, end, &g, err, sizeof err);
        FZ_CHECK(rc == 0, "accepted without the data length, refused with %llu: %s",
                 (unsigned long long)end, err);
        fz_check_same(f, &g);
        st_free(&g);
    }
    check_round_trip(f, data_len);
}

/* A failure message cut short must stay inside its buffer, terminated. */
static void check_short_message(const char *json, size_t len, size_t errlen)
{
    char small[80];
    st_file g;
    int rc;

    memset(small, 0x5a, sizeof small);
    rc = st_parse_header(json, len, ST_DATA_LEN_UNKNOWN, &g, small, errlen);
    FZ_CHECK(rc < 0, "refused once, accepted the second time");
    if (errlen)
        FZ_CHECK(memchr(small, '\0', errlen) != NULL, "short message not terminated");
    for (size_t i = errlen; i < sizeof small; i++)
        FZ_CHECK(small[i] == 0x5a, "message written past errlen %zu (at %zu)", errlen, i);
}

static int memfd = -1;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    char err_fd[sizeof err], err_a[sizeof err];
    st_file f, g;
    int rc, rc_fd;

    /* A: a whole file in memory. */
    rc = st_parse_buffer(data, size, &f, err_a, sizeof err_a);
    if (rc == 0) {
        uint64_t n = fz_le64(data);
        check_success(&f, text + 8, (size_t)n, size - 8 - n);
    } else {
        fz_check_failed(rc, &f, err_a, sizeof err_a);
    }

    /* B: the same bytes as a file: the same verdict. */
    if (memfd < 0)
        memfd = memfd_create("fuzz_header", MFD_CLOEXEC);
    FZ_CHECK(memfd >= 0, "memfd_create failed");
    FZ_CHECK(ftruncate(memfd, 0) == 0, "ftruncate failed");
    FZ_CHECK(size == 0 || pwrite(memfd, data, size, 0) == (ssize_t)size, "pwrite failed");
    rc_fd = st_read_fd(memfd, "img", &g, err_fd, sizeof err_fd);
    FZ_CHECK(rc_fd == rc, "st_read_fd says %d (%s), st_parse_buffer %d (%s)", rc_fd,
             rc_fd ? err_fd : "ok", rc, rc ? err_a : "ok");
    if (rc == 0) {
        fz_check_file(&g, f.header_len, f.data_len);
        fz_check_same(&f, &g);
    } else {
        fz_check_failed(rc_fd, &g, err_fd, sizeof err_fd);
        if (strlen(err_a) < sizeof err - 64)
            FZ_CHECK(strncmp(err_fd, "img: ", 5) == 0 && strcmp(err_fd + 5, err_a) == 0,
                     "messages differ: \"%s\" vs \"%s\"", err_fd, err_a);
    }
    st_free(&g);
    st_free(&f);
    st_free(&f);   /* safe on a freed file */

    /* C: the header JSON alone. */
    rc = st_parse_header(text, size, ST_DATA_LEN_UNKNOWN, &f, err, sizeof err);
    if (rc == 0) {
        check_success(&f, text, size, ST_DATA_LEN_UNKNOWN);
    } else {
        fz_check_failed(rc, &f, err, sizeof err);
        check_short_message(text, size, size % 40);
    }
    st_free(&f);

    /* D: a data length, then the header JSON. */
    if (size >= 8) {
        uint64_t data_len = fz_le64(data);
        rc = st_parse_header(text + 8, size - 8, data_len, &f, err, sizeof err);
        if (rc == 0)
            check_success(&f, text + 8, size - 8, data_len);
        else
            fz_check_failed(rc, &f, err, sizeof err);
        st_free(&f);
    }
    return 0;
}
