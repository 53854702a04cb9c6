#include "common/size.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

static const struct {
    const char *suffix;
    double scale;
} size_suffixes[] = {
    {"", 1},         {"b", 1},
    {"k", 1e3},      {"kb", 1e3},      {"kib", 1024.0},
    {"m", 1e6},      {"mb", 1e6},      {"mib", 1048576.0},
    {"g", 1e9},      {"gb", 1e9},      {"gib", 1073741824.0},
    {"t", 1e12},     {"tb", 1e12},     {"tib", 1099511627776.0},
};

int wd_size_parse(const char *text, uint64_t *out)
{
    char *end;
    double value;
    size_t i, n;

    if (!text)
        return -EINVAL;
    while (isspace((unsigned char)*text))
        text++;
    /* Digits with at most one '.', nothing strtod would also take (signs,
     * hex, exponents, "inf"). */
    n = 0;
    for (int dots = 0; isdigit((unsigned char)text[n]) || (text[n] == '.' && !dots++); n++)
        ;
    if (n == 0 || (n == 1 && text[0] == '.'))
        return -EINVAL;
    errno = 0;
    value = strtod(text, &end);
    if (errno || end != text + n || !isfinite(value))
        return -EINVAL;
    while (isspace((unsigned char)*end))
        end++;
    n = 0;
    while (end[n] && !isspace((unsigned char)end[n]))
        n++;
    for (i = 0; i < sizeof size_suffixes / sizeof size_suffixes[0]; i++) {
        const char *s = size_suffixes[i].suffix;
        size_t sl = 0;
        while (s[sl])
            sl++;
        if (sl == n && strncasecmp(end, s, n) == 0)
            break;
    }
    if (i == sizeof size_suffixes / sizeof size_suffixes[0])
        return -EINVAL;
    for (end += n; *end; end++)
        if (!isspace((unsigned char)*end))
            return -EINVAL;
    value *= size_suffixes[i].scale;
    if (value >= 18446744073709551616.0)
        return -ERANGE;
    *out = (uint64_t)llround(value);
    return 0;
}

const char *wd_size_format(uint64_t bytes, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)bytes;
    int u = 0;

    while (v >= 1024.0 && u < 5) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%llu B", (unsigned long long)bytes);
    else
        snprintf(buf, len, "%.2f %s", v, units[u]);
    return buf;
}

const char *wd_rate_format(double bytes_per_second, char *buf, size_t len)
{
    static const char *units[] = {"B/s", "kB/s", "MB/s", "GB/s", "TB/s"};
    double v = bytes_per_second < 0 ? 0 : bytes_per_second;
    int u = 0;

    while (v >= 1000.0 && u < 4) {
        v /= 1000.0;
        u++;
    }
    snprintf(buf, len, "%.1f %s", v, units[u]);
    return buf;
}
