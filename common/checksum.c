#include "common/checksum.h"
#include "common/fault.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
/* libxxhash's run-time choice of SSE2, AVX2 or AVX-512 (a distribution's
 * build is otherwise for the baseline, SSE2). */
#include <xxh_x86dispatch.h>
#define SUM_SEEDED XXH3_64bits_withSeed_dispatch
#define SUM_UPDATE XXH3_64bits_update_dispatch
#else
#define SUM_SEEDED XXH3_64bits_withSeed
#define SUM_UPDATE XXH3_64bits_update
#endif

uint64_t wd_sum_block(const void *data, size_t len, uint64_t index)
{
    return SUM_SEEDED(data, len, index);
}

/* The hashes as bytes, little-endian (the machines weightd runs on are). */
uint64_t wd_sum_of_blocks(const uint64_t *hashes, size_t n)
{
    _Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "block hashes are summed as little-endian bytes");
    return XXH3_64bits(hashes, n * sizeof *hashes);
}

struct wd_summer {
    XXH3_state_t *block, *top;
    uint64_t bytes, pos;
};

wd_summer *wd_summer_new(void)
{
    wd_summer *s = wd_calloc(1, sizeof *s);

    if (!s || !(s->block = XXH3_createState()) || !(s->top = XXH3_createState())) {
        wd_summer_free(s);
        return NULL;
    }
    return s;
}

void wd_summer_free(wd_summer *s)
{
    if (!s)
        return;
    XXH3_freeState(s->block);
    XXH3_freeState(s->top);
    free(s);
}

void wd_summer_start(wd_summer *s, uint64_t bytes)
{
    s->bytes = bytes;
    s->pos = 0;
    XXH3_64bits_reset(s->top);
}

void wd_summer_feed(wd_summer *s, const void *data, size_t len)
{
    const char *p = data;

    while (len && s->pos < s->bytes) {
        uint64_t index = s->pos / WD_SUM_BLOCK, end = (index + 1) * WD_SUM_BLOCK, n;
        if (end > s->bytes)
            end = s->bytes;
        n = end - s->pos < len ? end - s->pos : len;
        if (s->pos % WD_SUM_BLOCK == 0)
            XXH3_64bits_reset_withSeed(s->block, index);
        SUM_UPDATE(s->block, p, (size_t)n);
        s->pos += n;
        p += n;
        len -= (size_t)n;
        if (s->pos == end) {
            uint64_t h = XXH3_64bits_digest(s->block);
            XXH3_64bits_update(s->top, &h, sizeof h);
        }
    }
}

uint64_t wd_summer_end(wd_summer *s, int *complete)
{
    if (complete)
        *complete = s->pos == s->bytes;
    return s->pos == s->bytes ? XXH3_64bits_digest(s->top) : 0;
}

void wd_summer_block_start(wd_summer *s, uint64_t index)
{
    XXH3_64bits_reset_withSeed(s->block, index);
}

void wd_summer_block_feed(wd_summer *s, const void *data, size_t len)
{
    SUM_UPDATE(s->block, data, len);
}

uint64_t wd_summer_block_end(wd_summer *s)
{
    return XXH3_64bits_digest(s->block);
}

const char *wd_sum_format(uint64_t sum, char *buf)
{
    snprintf(buf, 17, "%016llx", (unsigned long long)sum);
    return buf;
}

int wd_sum_parse(const char *text, uint64_t *out)
{
    char *end;

    if (!text || strlen(text) != 16)
        return -EINVAL;
    errno = 0;
    *out = strtoull(text, &end, 16);
    return errno || *end ? -EINVAL : 0;
}
