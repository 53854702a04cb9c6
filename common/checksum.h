/* Tensor checksums: XXH3 (xxHash), in blocks, so that readers working on
 * different parts of a tensor at once, in any order, get the same figure
 * as one that reads it from start to end.
 *
 * A tensor's bytes are cut at multiples of WD_SUM_BLOCK of its own offsets;
 * block k is hashed with XXH3-64 seeded with k, and the tensor's checksum is
 * XXH3-64 of those 64-bit hashes, little-endian, in order (of nothing for an
 * empty tensor). Shown as 16 hex digits. */
#ifndef WD_CHECKSUM_H
#define WD_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

#define WD_SUM_BLOCK (256u << 10)

static inline uint64_t wd_sum_blocks(uint64_t bytes)
{
    return (bytes + WD_SUM_BLOCK - 1) / WD_SUM_BLOCK;
}

/* Block `index` of a tensor, whole (the last may be short). */
uint64_t wd_sum_block(const void *data, size_t len, uint64_t index);
/* The tensor's checksum from its n block hashes. */
uint64_t wd_sum_of_blocks(const uint64_t *hashes, size_t n);

/* One tensor's bytes in order, in pieces of any size. */
typedef struct wd_summer wd_summer;
wd_summer *wd_summer_new(void);
void wd_summer_free(wd_summer *s);
/* Starts a tensor of `bytes` bytes. */
void wd_summer_start(wd_summer *s, uint64_t bytes);
void wd_summer_feed(wd_summer *s, const void *data, size_t len);
/* The checksum, once every byte was fed; else the bytes fed were too few
 * (returns 0 with *complete false where complete is not NULL). */
uint64_t wd_summer_end(wd_summer *s, int *complete);

/* One block in pieces (for readers hashing blocks out of order). */
void wd_summer_block_start(wd_summer *s, uint64_t index);
void wd_summer_block_feed(wd_summer *s, const void *data, size_t len);
uint64_t wd_summer_block_end(wd_summer *s);

/* "0123456789abcdef" into buf (17 bytes at least); and back, 0 or -EINVAL. */
const char *wd_sum_format(uint64_t sum, char *buf);
int wd_sum_parse(const char *text, uint64_t *out);

#endif
