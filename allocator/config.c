/* The allocator configuration in PyTorch's PYTORCH_CUDA_ALLOC_CONF syntax.
 * Lexing and key semantics follow c10/core/AllocatorConfig.cpp (lexArgs,
 * parseArgs and the parse* functions); values are checked strictly: where
 * PyTorch's stoi would take "20abc" as 20, this is an error. */
#include "allocator/internal.h"
#include "common/fault.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MiB (1024ULL * 1024ULL)

void wa_config_default(wa_config *conf)
{
    memset(conf, 0, sizeof *conf);
    conf->max_split_size = UINT64_MAX;           /* AllocatorConfig(): SIZE_MAX */
    conf->max_non_split_rounding = WA_LARGE_BUFFER;
    conf->expandable_page = WA_LARGE_BUFFER;
}

bool wa_config_equal(const wa_config *a, const wa_config *b)
{
    return a->max_split_size == b->max_split_size &&
           a->max_non_split_rounding == b->max_non_split_rounding &&
           a->garbage_collection_threshold == b->garbage_collection_threshold &&
           memcmp(a->roundup_power2_divisions, b->roundup_power2_divisions,
                  sizeof a->roundup_power2_divisions) == 0 &&
           a->expandable_segments == b->expandable_segments &&
           a->release_lock_on_cudamalloc == b->release_lock_on_cudamalloc &&
           a->expandable_page == b->expandable_page && a->expandable_page_align == b->expandable_page_align &&
           a->expandable_coalesce == b->expandable_coalesce;
}

/* ---- lexer: like lexArgs, tokens are runs of text or one of ",:[]" ------- */

#define MAX_TOKENS 256

typedef struct lexer {
    char tok[MAX_TOKENS][64];
    size_t n, i;
    const char *text;
    wd_error *err;
} lexer;

static int lex(lexer *lx, const char *text)
{
    size_t len = 0;

    lx->n = lx->i = 0;
    lx->text = text;
    for (const char *p = text;; p++) {
        bool sep = *p == ',' || *p == ':' || *p == '[' || *p == ']';
        if (*p == '\0' || sep) {
            if (len) {
                lx->tok[lx->n][len] = '\0';
                if (++lx->n == MAX_TOKENS)
                    return wd_error_set(lx->err, -EINVAL, "allocator configuration too long: \"%s\"", text);
                len = 0;
            }
            if (!*p)
                break;
            lx->tok[lx->n][0] = *p;
            lx->tok[lx->n][1] = '\0';
            if (++lx->n == MAX_TOKENS)
                return wd_error_set(lx->err, -EINVAL, "allocator configuration too long: \"%s\"", text);
        } else if (*p != ' ') {
            if (len + 1 >= sizeof lx->tok[0])
                return wd_error_set(lx->err, -EINVAL, "allocator configuration: token too long in \"%s\"", text);
            lx->tok[lx->n][len++] = *p;
        }
    }
    return 0;
}

static const char *peek(const lexer *lx)
{
    return lx->i < lx->n ? lx->tok[lx->i] : NULL;
}

static int expect(lexer *lx, const char *what, const char *key)
{
    const char *t = peek(lx);

    if (!t || strcmp(t, what) != 0)
        return wd_error_set(lx->err, -EINVAL, "allocator configuration \"%s\": expected '%s' after %s, got %s%s%s",
                            lx->text, what, key, t ? "\"" : "", t ? t : "the end", t ? "\"" : "");
    lx->i++;
    return 0;
}

static int value(lexer *lx, const char *key, const char **out)
{
    const char *t = peek(lx);

    if (!t || strchr(",:[]", t[0]))
        return wd_error_set(lx->err, -EINVAL, "allocator configuration \"%s\": %s needs a value", lx->text, key);
    lx->i++;
    *out = t;
    return 0;
}

static int parse_uint(lexer *lx, const char *key, const char *t, uint64_t *out)
{
    char *end;

    if (!isdigit((unsigned char)t[0]))
        goto bad;
    errno = 0;
    *out = strtoull(t, &end, 10);
    if (errno || *end)
        goto bad;
    return 0;
bad:
    return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s:%s is not a whole number", key, t);
}

static int parse_bool(lexer *lx, const char *key, const char *t, bool *out)
{
    /* PyTorch accepts exactly these two spellings. */
    if (strcmp(t, "True") == 0)
        *out = true;
    else if (strcmp(t, "False") == 0)
        *out = false;
    else
        return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s:%s must be True or False", key, t);
    return 0;
}

static bool is_pow2(uint64_t v)
{
    return v && !(v & (v - 1));
}

static unsigned log2_floor(uint64_t v)
{
    return 63u - (unsigned)__builtin_clzll(v);
}

/* max_split_size_mb and max_non_split_rounding_mb: whole MiB, at least
 * kLargeBuffer (20 MiB) — parseMaxSplitSize / parseMaxNonSplitRoundingSize. */
static int parse_mb(lexer *lx, const char *key, uint64_t *out)
{
    const char *t;
    uint64_t mb;
    int rc;

    if ((rc = expect(lx, ":", key)) || (rc = value(lx, key, &t)) || (rc = parse_uint(lx, key, t, &mb)))
        return rc;
    if (mb < WA_LARGE_BUFFER / MiB)
        return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s:%s is too small, must be >= %llu",
                            key, t, (unsigned long long)(WA_LARGE_BUFFER / MiB));
    if (mb > UINT64_MAX / MiB)
        mb = UINT64_MAX / MiB;
    *out = mb * MiB;
    return 0;
}

/* parseRoundUpPower2Divisions: "4", or "[1:4,256:8,>:1]" where the left side
 * is a power-of-two size in MiB, and '>' sets every interval from the last one
 * named onwards (including it, as PyTorch does). Divisions: 0 or powers of 2. */
static int parse_divisions(lexer *lx, uint32_t div[WA_ROUNDUP_INTERVALS])
{
    const char *key = "roundup_power2_divisions", *t, *v;
    uint64_t n, d;
    size_t last = 0;
    bool first = true;
    int rc;

    if ((rc = expect(lx, ":", key)))
        return rc;
    t = peek(lx);
    if (t && strcmp(t, "[") == 0) {
        lx->i++;
        for (;;) {
            if (!(t = peek(lx)))
                return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s: missing ']'", key);
            if (strcmp(t, "]") == 0) {
                lx->i++;
                break;
            }
            lx->i++;
            if ((rc = expect(lx, ":", key)) || (rc = value(lx, key, &v)) || (rc = parse_uint(lx, key, v, &d)))
                return rc;
            if (d != 0 && !is_pow2(d))
                return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s: divisions %s must be a power of 2 or 0", key, v);
            if (d > 1u << 30)
                return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s: divisions %s too large", key, v);
            if (strcmp(t, ">") == 0) {
                for (size_t i = last; i < WA_ROUNDUP_INTERVALS; i++)
                    div[i] = (uint32_t)d;
            } else {
                size_t index;
                if ((rc = parse_uint(lx, key, t, &n)))
                    return rc;
                if (!is_pow2(n))
                    return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s: interval %s must be a power of 2", key, t);
                index = log2_floor(n);
                if (index > WA_ROUNDUP_INTERVALS - 1)
                    index = WA_ROUNDUP_INTERVALS - 1;
                if (first) {
                    for (size_t i = 0; i < index; i++)
                        div[i] = (uint32_t)d;
                    first = false;
                }
                div[index] = (uint32_t)d;
                last = index;
            }
            if ((t = peek(lx)) && strcmp(t, ",") == 0)
                lx->i++;
            else if (!t || strcmp(t, "]") != 0)
                return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s: expected ',' or ']'", key);
        }
        return 0;
    }
    if ((rc = value(lx, key, &v)) || (rc = parse_uint(lx, key, v, &d)))
        return rc;
    if (!is_pow2(d) || d > 1u << 30)
        return wd_error_set(lx->err, -EINVAL, "allocator configuration: %s:%s must be a power of 2", key, v);
    for (size_t i = 0; i < WA_ROUNDUP_INTERVALS; i++)
        div[i] = (uint32_t)d;
    return 0;
}

int wa_config_parse(const char *text, const wa_config *base, wa_conf_mode mode,
                    wa_config *out, wd_error *err)
{
    lexer *lx;
    wa_config c;
    const char *key, *v;
    int rc = 0;

    if (base)
        c = *base;
    else
        wa_config_default(&c);
    if (mode == WA_CONF_PYTORCH) {
        /* parseArgs() resets these three and leaves the other keys alone. */
        wa_config d;
        wa_config_default(&d);
        c.max_split_size = d.max_split_size;
        c.garbage_collection_threshold = 0;
        memset(c.roundup_power2_divisions, 0, sizeof c.roundup_power2_divisions);
    }
    if (text && strcmp(text, "default") == 0)
        wa_config_default(&c);
    if (!text || strcmp(text, "default") == 0 || text[strspn(text, " ")] == '\0') {
        *out = c;
        return 0;
    }
    if (!(lx = wd_calloc(1, sizeof *lx)))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    lx->err = err;
    if ((rc = lex(lx, text)))
        goto out;
    while ((key = peek(lx))) {
        lx->i++;
        if (strcmp(key, "max_split_size_mb") == 0) {
            rc = parse_mb(lx, key, &c.max_split_size);
        } else if (strcmp(key, "max_non_split_rounding_mb") == 0) {
            rc = parse_mb(lx, key, &c.max_non_split_rounding);
        } else if (strcmp(key, "garbage_collection_threshold") == 0) {
            char *end;
            double g;
            if ((rc = expect(lx, ":", key)) || (rc = value(lx, key, &v)))
                goto out;
            g = strtod(v, &end);
            if (*end || !(g > 0.0 && g < 1.0)) {
                rc = wd_error_set(err, -EINVAL, "allocator configuration: %s:%s must be in (0.0, 1.0)", key, v);
                goto out;
            }
            c.garbage_collection_threshold = g;
        } else if (strcmp(key, "roundup_power2_divisions") == 0) {
            rc = parse_divisions(lx, c.roundup_power2_divisions);
        } else if (strcmp(key, "expandable_segments") == 0) {
            if (!(rc = expect(lx, ":", key)) && !(rc = value(lx, key, &v)))
                rc = parse_bool(lx, key, v, &c.expandable_segments);
        } else if (strcmp(key, "release_lock_on_cudamalloc") == 0) {
            if (!(rc = expect(lx, ":", key)) && !(rc = value(lx, key, &v)))
                rc = parse_bool(lx, key, v, &c.release_lock_on_cudamalloc);
        } else if (strcmp(key, "expandable_page_mb") == 0) {
            uint64_t mb;
            if ((rc = expect(lx, ":", key)) || (rc = value(lx, key, &v)) || (rc = parse_uint(lx, key, v, &mb)))
                goto out;
            /* Whole 2 MiB pages: CUDA's granularity for cuMemCreate. */
            if (mb < 2 || mb % 2 || mb > 1024) {
                rc = wd_error_set(err, -EINVAL, "allocator configuration: %s:%s must be an even number of MiB "
                                  "from 2 to 1024", key, v);
                goto out;
            }
            c.expandable_page = mb * MiB;
        } else if (strcmp(key, "expandable_page_align") == 0) {
            if (!(rc = expect(lx, ":", key)) && !(rc = value(lx, key, &v)))
                rc = parse_bool(lx, key, v, &c.expandable_page_align);
        } else if (strcmp(key, "expandable_coalesce") == 0) {
            if (!(rc = expect(lx, ":", key)) && !(rc = value(lx, key, &v)))
                rc = parse_bool(lx, key, v, &c.expandable_coalesce);
        } else if (strcmp(key, "backend") == 0) {
            if (!(rc = expect(lx, ":", key)) && !(rc = value(lx, key, &v)) && strcmp(v, "native") != 0)
                rc = wd_error_set(err, -EINVAL, "allocator configuration: backend:%s is not supported; weightd is the native caching allocator", v);
        } else {
            rc = wd_error_set(err, -EINVAL, "allocator configuration \"%s\": unknown option \"%s\"", text, key);
        }
        if (rc)
            goto out;
        if ((key = peek(lx))) {
            if (strcmp(key, ",") != 0) {
                rc = wd_error_set(err, -EINVAL, "allocator configuration \"%s\": expected ',' before \"%s\"", text, key);
                goto out;
            }
            lx->i++;
        }
    }
    *out = c;
out:
    free(lx);
    return rc;
}

static void append(char *buf, size_t len, size_t *used, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void append(char *buf, size_t len, size_t *used, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*used >= len)
        return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *used, len - *used, fmt, ap);
    va_end(ap);
    if (n > 0)
        *used += (size_t)n;
}

const char *wa_config_format(const wa_config *conf, char *buf, size_t len)
{
    wa_config d;
    size_t used = 0;
    bool uniform = true;

    wa_config_default(&d);
    buf[0] = '\0';
#define SEP (used ? "," : "")
    if (conf->max_split_size != d.max_split_size)
        append(buf, len, &used, "%smax_split_size_mb:%llu", SEP, (unsigned long long)(conf->max_split_size / MiB));
    if (conf->max_non_split_rounding != d.max_non_split_rounding)
        append(buf, len, &used, "%smax_non_split_rounding_mb:%llu", SEP,
               (unsigned long long)(conf->max_non_split_rounding / MiB));
    if (conf->garbage_collection_threshold != 0)
        append(buf, len, &used, "%sgarbage_collection_threshold:%g", SEP, conf->garbage_collection_threshold);
    for (size_t i = 1; i < WA_ROUNDUP_INTERVALS; i++)
        uniform &= conf->roundup_power2_divisions[i] == conf->roundup_power2_divisions[0];
    if (uniform && conf->roundup_power2_divisions[0]) {
        append(buf, len, &used, "%sroundup_power2_divisions:%u", SEP, conf->roundup_power2_divisions[0]);
    } else if (!uniform) {
        append(buf, len, &used, "%sroundup_power2_divisions:[", SEP);
        for (size_t i = 0; i + 1 < WA_ROUNDUP_INTERVALS; i++)
            append(buf, len, &used, "%llu:%u,", 1ULL << i, conf->roundup_power2_divisions[i]);
        append(buf, len, &used, ">:%u]", conf->roundup_power2_divisions[WA_ROUNDUP_INTERVALS - 1]);
    }
    if (conf->expandable_segments)
        append(buf, len, &used, "%sexpandable_segments:True", SEP);
    if (conf->release_lock_on_cudamalloc)
        append(buf, len, &used, "%srelease_lock_on_cudamalloc:True", SEP);
    if (conf->expandable_page != d.expandable_page)
        append(buf, len, &used, "%sexpandable_page_mb:%llu", SEP, (unsigned long long)(conf->expandable_page / MiB));
    if (conf->expandable_page_align)
        append(buf, len, &used, "%sexpandable_page_align:True", SEP);
    if (conf->expandable_coalesce)
        append(buf, len, &used, "%sexpandable_coalesce:True", SEP);
#undef SEP
    if (!used)
        snprintf(buf, len, "default");
    return buf;
}
