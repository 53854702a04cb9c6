/* fuzz_check.h: the invariants the fuzz harnesses hold a parsed result to.
 *
 * Included by each harness (one translation unit each), so everything here
 * is static. A broken invariant prints what broke and calls abort(), which
 * libFuzzer reports as a crash and saves the input. */
#ifndef WD_FUZZ_CHECK_H
#define WD_FUZZ_CHECK_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/safetensors.h"

static void fz_fail(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5), unused));

/* Prints where, the condition that broke (cond, or NULL), then the message. */
static void fz_fail(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "\n==FUZZ CHECK FAILED== %s:%d: %s%s", file, line, cond ? cond : "", cond ? ": " : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

/* Prints the condition, then the message. */
#define FZ_CHECK(cond, ...)                                                       \
    do {                                                                          \
        if (!(cond))                                                              \
            fz_fail(__FILE__, __LINE__, #cond, __VA_ARGS__);                      \
    } while (0)

static inline uint64_t fz_le64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int k = 7; k >= 0; k--)
        v = v << 8 | p[k];
    return v;
}

/* A message: NUL-terminated within cap, not empty, one line of printable
 * UTF-8 text (names from the input are escaped). A message that fills its
 * buffer was cut by vsnprintf and may end in part of a character. */
static inline void fz_check_msg(const char *msg, size_t cap)
{
    size_t n = strnlen(msg, cap), bad = 0;

    FZ_CHECK(n < cap, "message not terminated");
    FZ_CHECK(n > 0, "empty message");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)msg[i];
        FZ_CHECK(c >= 0x20 && c != 0x7f, "control byte 0x%02x at %zu in the message: %s", c, i,
                 msg);
    }
    if (st_utf8_check(msg, n, &bad) < 0) {
        int cut_tail = n == cap - 1 && n - bad < 4 && ((unsigned char)msg[bad] & 0xc0) == 0xc0;
        for (size_t i = bad + 1; cut_tail && i < n; i++)
            cut_tail = ((unsigned char)msg[i] & 0xc0) == 0x80;
        FZ_CHECK(cut_tail, "message not valid UTF-8 at byte %zu: %s", bad, msg);
    }
}

/* A failed call: a negative errno the API documents, a zeroed result and a
 * one-line, NUL-terminated message within errlen. */
static inline void fz_check_failed(int rc, const st_file *f, const char *err, size_t errlen)
{
    static const st_file zero;

    FZ_CHECK(rc == -EBADMSG || rc == -ENOMEM || rc == -EIO, "rc %d", rc);
    FZ_CHECK(memcmp(f, &zero, sizeof zero) == 0, "result not zeroed after rc %d", rc);
    fz_check_msg(err, errlen);
}

/* (begin, end, name): the order the header promises for tensors[]. */
static inline int fz_cmp_tensor(const st_tensor *a, const st_tensor *b)
{
    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return strcmp(a->name, b->name);
}

/* A successful parse: every promise of safetensors.h, checked from the
 * outside. header_len and data_len are what the caller gave (data_len may
 * be ST_DATA_LEN_UNKNOWN). Returns the end of the last tensor. */
static inline uint64_t fz_check_file(const st_file *f, uint64_t header_len, uint64_t data_len)
{
    uint64_t pos = 0;

    FZ_CHECK(f->header_len == header_len, "header_len %llu, want %llu",
             (unsigned long long)f->header_len, (unsigned long long)header_len);
    FZ_CHECK(f->data_offset == 8 + header_len, "data_offset %llu",
             (unsigned long long)f->data_offset);
    FZ_CHECK(f->data_len == data_len, "data_len %llu, want %llu",
             (unsigned long long)f->data_len, (unsigned long long)data_len);
    FZ_CHECK(f->n_tensors == 0 || f->tensors != NULL, "%zu tensors, no array", f->n_tensors);
    FZ_CHECK(f->n_meta == 0 || f->meta != NULL, "%zu metadata entries, no array", f->n_meta);

    for (size_t i = 0; i < f->n_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        unsigned bits_per = st_dtype_bits(t->dtype);
        uint64_t numel = 1, bits;

        FZ_CHECK(t->name != NULL, "tensor %zu has no name", i);
        FZ_CHECK(strcmp(t->name, "__metadata__") != 0, "a tensor named __metadata__");
        FZ_CHECK(st_utf8_check(t->name, strlen(t->name), NULL) == 0, "name not UTF-8");
        FZ_CHECK(st_dtype_name(t->dtype) != NULL && bits_per > 0, "dtype %d", (int)t->dtype);
        FZ_CHECK((t->ndim == 0) == (t->shape == NULL), "ndim %zu with shape %p", t->ndim,
                 (void *)t->shape);
        /* Sorted, and tiling [0, pos) with no gap or overlap. */
        if (i)
            FZ_CHECK(fz_cmp_tensor(&f->tensors[i - 1], t) < 0, "tensors %zu and %zu out of order",
                     i - 1, i);
        FZ_CHECK(t->begin == pos, "tensor %zu begins at %llu, previous ended at %llu", i,
                 (unsigned long long)t->begin, (unsigned long long)pos);
        FZ_CHECK(t->end >= t->begin, "tensor %zu ends before it begins", i);
        pos = t->end;
        /* nbytes == numel * bits / 8, with nothing overflowing. */
        for (size_t d = 0; d < t->ndim; d++)
            FZ_CHECK(!__builtin_mul_overflow(numel, t->shape[d], &numel),
                     "tensor %zu: numel overflows", i);
        FZ_CHECK(st_tensor_numel(t) == numel, "st_tensor_numel %llu, want %llu",
                 (unsigned long long)st_tensor_numel(t), (unsigned long long)numel);
        FZ_CHECK(!__builtin_mul_overflow(numel, (uint64_t)bits_per, &bits),
                 "tensor %zu: bits overflow", i);
        FZ_CHECK(bits % 8 == 0, "tensor %zu: %llu bits", i, (unsigned long long)bits);
        FZ_CHECK(st_tensor_nbytes(t) == bits / 8, "tensor %zu: %llu bytes, want %llu", i,
                 (unsigned long long)st_tensor_nbytes(t), (unsigned long long)(bits / 8));
        /* Findable by name, and it is this very tensor (names are unique). */
        FZ_CHECK(st_find(f, t->name) == t, "st_find(\"%.100s\") misses tensor %zu", t->name, i);
    }
    if (data_len != ST_DATA_LEN_UNKNOWN)
        FZ_CHECK(pos == data_len, "tensors end at %llu, data is %llu bytes",
                 (unsigned long long)pos, (unsigned long long)data_len);
    FZ_CHECK(st_find(f, "__metadata__") == NULL, "st_find finds __metadata__");

    for (size_t i = 0; i < f->n_meta; i++) {
        const st_meta *m = &f->meta[i];

        FZ_CHECK(m->key && m->value, "metadata %zu incomplete", i);
        FZ_CHECK(st_utf8_check(m->key, strlen(m->key), NULL) == 0, "metadata key not UTF-8");
        FZ_CHECK(st_utf8_check(m->value, strlen(m->value), NULL) == 0, "metadata value not UTF-8");
        for (size_t k = 0; k < i; k++)
            FZ_CHECK(strcmp(f->meta[k].key, m->key) != 0, "metadata key twice");
    }
    return pos;
}

/* Two parses of the same header: the same tensors and metadata. */
static inline void fz_check_same(const st_file *a, const st_file *b)
{
    FZ_CHECK(a->n_tensors == b->n_tensors, "%zu vs %zu tensors", a->n_tensors, b->n_tensors);
    FZ_CHECK(a->n_meta == b->n_meta, "%zu vs %zu metadata", a->n_meta, b->n_meta);
    for (size_t i = 0; i < a->n_tensors; i++) {
        const st_tensor *x = &a->tensors[i], *y = &b->tensors[i];

        FZ_CHECK(strcmp(x->name, y->name) == 0, "tensor %zu: names differ", i);
        FZ_CHECK(x->dtype == y->dtype && x->ndim == y->ndim && x->begin == y->begin &&
                 x->end == y->end, "tensor %zu differs", i);
        for (size_t d = 0; d < x->ndim; d++)
            FZ_CHECK(x->shape[d] == y->shape[d], "tensor %zu: dim %zu differs", i, d);
    }
    for (size_t i = 0; i < a->n_meta; i++)
        FZ_CHECK(strcmp(a->meta[i].key, b->meta[i].key) == 0 &&
                 strcmp(a->meta[i].value, b->meta[i].value) == 0, "metadata %zu differs", i);
}

#endif
