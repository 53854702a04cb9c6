/* Sizes and rates as people write them: "20GiB", "5GB", "512M", "1.5T". */
#ifndef WD_SIZE_H
#define WD_SIZE_H

#include <stddef.h>
#include <stdint.h>

/* K/M/G/T (and KB/MB/GB/TB) are powers of 1000; KiB/MiB/GiB/TiB powers of
 * 1024; a bare number or "B" is bytes. Case-insensitive, fractions allowed
 * ("1.5GiB"), surrounding spaces allowed. Returns 0 or -EINVAL / -ERANGE. */
int wd_size_parse(const char *text, uint64_t *out);

/* "1.50 GiB", "512 B": binary units, for sizes. */
const char *wd_size_format(uint64_t bytes, char *buf, size_t len);
/* "41.6 GB/s": decimal units, as bandwidth is usually quoted. */
const char *wd_rate_format(double bytes_per_second, char *buf, size_t len);

#endif
