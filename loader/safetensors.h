/* safetensors.h: a header-only safetensors header parser and writer.
 *
 * Depends on cJSON only. In exactly one .c file:
 *
 *     #define ST_IMPLEMENTATION
 *     #include "loader/safetensors.h"
 *
 * The format: an 8-byte little-endian length N, N bytes of UTF-8 JSON (an
 * object of tensor name -> {"dtype", "shape", "data_offsets"} plus an
 * optional "__metadata__" object of strings), then the data section, which
 * the tensors tile exactly. Validation is at least as strict as the
 * reference implementation (huggingface/safetensors): every check there is
 * here, and some more (duplicate keys, floats, NULs in strings, unknown
 * fields, trailing bytes).
 *
 * The implementation needs POSIX.1-2008 (pread, fstat): build with gnu11 or
 * define _POSIX_C_SOURCE 200809L before any include.
 *
 * Functions that can fail return 0 or a negative errno: -EBADMSG for any
 * format violation, -ENOMEM, -EIO or -errno for I/O, -EINVAL for bad
 * arguments to the writer. When err is not NULL it receives one line naming
 * the file (st_read*), the tensor (when one is involved) and the rule. */
#ifndef ST_SAFETENSORS_H
#define ST_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_HEADER_LEN 100000000ULL
#define ST_DATA_LEN_UNKNOWN UINT64_MAX

typedef enum st_dtype {
    ST_BOOL, ST_F4, ST_F6_E2M3, ST_F6_E3M2, ST_U8, ST_I8, ST_F8_E5M2,
    ST_F8_E4M3, ST_F8_E8M0, ST_F8_E4M3FNUZ, ST_F8_E5M2FNUZ, ST_I16, ST_U16,
    ST_F16, ST_BF16, ST_I32, ST_U32, ST_F32, ST_C64, ST_F64, ST_I64, ST_U64,
    ST_DTYPE_COUNT
} st_dtype;

/* "BF16"; NULL for a value outside the enum. */
const char *st_dtype_name(st_dtype d);
/* Exact, case-sensitive name as in the format. 0 or -EINVAL. */
int st_dtype_parse(const char *name, st_dtype *out);
/* Bits per element; 0 for a value outside the enum. */
unsigned st_dtype_bits(st_dtype d);

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    size_t ndim;
    uint64_t *shape;          /* NULL when ndim == 0 */
    uint64_t begin, end;      /* relative to the data section */
} st_tensor;

typedef struct st_meta {
    char *key;
    char *value;
} st_meta;

typedef struct st_file {
    uint64_t header_len;      /* N from the 8-byte prefix */
    uint64_t data_offset;     /* 8 + N */
    uint64_t data_len;        /* ST_DATA_LEN_UNKNOWN when parsed without it */
    size_t n_tensors;
    st_tensor *tensors;       /* sorted by begin (ties: end, then name) */
    size_t n_meta;
    st_meta *meta;            /* "__metadata__" in document order */
    /* Internal: the tensors in name order, for st_find. It lives in the
     * same allocation as tensors, names and shapes (one free for all). */
    const st_tensor **by_name;
} st_file;

/* Parses a header JSON of len bytes (the N bytes after the prefix).
 * data_len: bytes of the file after the header, or ST_DATA_LEN_UNKNOWN to
 * skip the checks that need the file size. out is zeroed on failure. */
int st_parse_header(const char *json, size_t len, uint64_t data_len, st_file *out,
                    char *err, size_t errlen);
/* The whole file in memory: prefix, header and data. */
int st_parse_buffer(const void *file_image, size_t len, st_file *out, char *err, size_t errlen);
/* Reads only the prefix and the header (pread); the size comes from fstat.
 * Messages start with display_name. */
int st_read_fd(int fd, const char *display_name, st_file *out, char *err, size_t errlen);
int st_read(const char *path, st_file *out, char *err, size_t errlen);
/* Safe on a zeroed or already-freed st_file. */
void st_free(st_file *f);

/* NULL if absent. O(log n). */
const st_tensor *st_find(const st_file *f, const char *name);
/* Product of the shape, 1 for 0-dim. Saturates at UINT64_MAX (a parsed file
 * never gets there). */
uint64_t st_tensor_numel(const st_tensor *t);
static inline uint64_t st_tensor_nbytes(const st_tensor *t) { return t->end - t->begin; }

/* Writer: lays the tensors out contiguously in the given order and builds
 * the 8-byte little-endian prefix plus the JSON header, padded with spaces to
 * a multiple of 8 bytes like the reference writer; "__metadata__" comes first
 * when n_meta > 0. *out is malloc'd (caller frees), *out_len its length,
 * *data_len the data bytes that must follow. Errors: -EINVAL for a shape x
 * dtype that is not a whole number of bytes, a duplicate or reserved name,
 * a string that is not UTF-8; -EOVERFLOW for sizes past 2^64-1; -EFBIG for a
 * header over ST_MAX_HEADER_LEN; -ENOMEM. */
typedef struct st_tensor_spec {
    const char *name;
    st_dtype dtype;
    size_t ndim;
    const uint64_t *shape;
} st_tensor_spec;

int st_build_header(const st_tensor_spec *tensors, size_t n, const st_meta *meta, size_t n_meta,
                    char **out, size_t *out_len, uint64_t *data_len, char *err, size_t errlen);

/* Helpers, shared with other JSON readers and writers of the loader. */

/* 0 when s[0..len) is valid UTF-8 (no overlong forms, surrogates or code
 * points past U+10FFFF), else -EBADMSG with *bad_at (if not NULL) the offset
 * of the first bad byte. */
int st_utf8_check(const char *s, size_t len, size_t *bad_at);
/* Checks a JSON text before cJSON sees it: UTF-8; an object after optional
 * JSON whitespace; every token well formed by RFC 8259 (cJSON accepts "01",
 * "+1", "1.", raw control characters in strings and more); no \u0000 escape
 * (cJSON's C strings would silently cut there). Structure (matching
 * brackets, commas, colons) is left to cJSON. *end gets the offset just past
 * the object's closing brace; what follows is the caller's to judge.
 * 0 or -EBADMSG. */
int st_json_check(const char *json, size_t len, size_t *end, char *err, size_t errlen);
/* The offset of the first byte in s[from..len) that is not JSON whitespace
 * (space, tab, CR, LF), or len: where data after a JSON object begins. */
size_t st_json_skip_ws(const char *s, size_t from, size_t len);
/* A malloc'd JSON string literal for s, quotes included; NULL on ENOMEM. */
char *st_json_quote(const char *s);
/* s as a message shows it, on one printable line: control bytes and DEL
 * become \xNN; quoted puts it in double quotes and escapes " and \ (names),
 * unquoted leaves every other byte as is (paths). More than max bytes are
 * cut at a UTF-8 boundary and end in "...". buf must hold ST_MSG_BUF(max)
 * bytes. Returns buf. */
#define ST_MSG_BUF(max) ((size_t)(max) * 4 + 8)
const char *st_msg_str(const char *s, size_t max, int quoted, char *buf);

#endif /* ST_SAFETENSORS_H */

/* ------------------------------------------------------------------------ */

#if defined(ST_IMPLEMENTATION) && !defined(ST_IMPLEMENTATION_DONE)
#define ST_IMPLEMENTATION_DONE

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
    const char *name;
    unsigned bits;
} st__dtypes[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 8},
    [ST_F4] = {"F4", 4},
    [ST_F6_E2M3] = {"F6_E2M3", 6},
    [ST_F6_E3M2] = {"F6_E3M2", 6},
    [ST_U8] = {"U8", 8},
    [ST_I8] = {"I8", 8},
    [ST_F8_E5M2] = {"F8_E5M2", 8},
    [ST_F8_E4M3] = {"F8_E4M3", 8},
    [ST_F8_E8M0] = {"F8_E8M0", 8},
    [ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [ST_I16] = {"I16", 16},
    [ST_U16] = {"U16", 16},
    [ST_F16] = {"F16", 16},
    [ST_BF16] = {"BF16", 16},
    [ST_I32] = {"I32", 32},
    [ST_U32] = {"U32", 32},
    [ST_F32] = {"F32", 32},
    [ST_C64] = {"C64", 64},
    [ST_F64] = {"F64", 64},
    [ST_I64] = {"I64", 64},
    [ST_U64] = {"U64", 64},
};

const char *st_dtype_name(st_dtype d)
{
    return (unsigned)d < ST_DTYPE_COUNT ? st__dtypes[d].name : NULL;
}

unsigned st_dtype_bits(st_dtype d)
{
    return (unsigned)d < ST_DTYPE_COUNT ? st__dtypes[d].bits : 0;
}

int st_dtype_parse(const char *name, st_dtype *out)
{
    if (!name)
        return -EINVAL;
    for (unsigned i = 0; i < ST_DTYPE_COUNT; i++) {
        if (strcmp(name, st__dtypes[i].name) == 0) {
            if (out)
                *out = (st_dtype)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* --- messages ----------------------------------------------------------- */

static int st__fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int st__fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* "NAME: " in front of the message already in err (cut at errlen). */
static void st__prefix(char *err, size_t errlen, const char *name)
{
    size_t pl, ml;

    if (!err || !errlen || !name)
        return;
    pl = strlen(name) + 2;
    if (pl >= errlen) {
        snprintf(err, errlen, "%s: ", name);
        return;
    }
    ml = strlen(err);
    if (ml > errlen - 1 - pl)
        ml = errlen - 1 - pl;
    memmove(err + pl, err, ml);
    err[pl + ml] = '\0';
    memcpy(err, name, pl - 2);
    memcpy(err + pl - 2, ": ", 2);
}

/* Budget for one quoted string in a message, so that a hostile 1 MB name
 * cannot crowd out the rule that was broken. */
#define ST__QUOTE_MAX 160
#define ST__QUOTE_BUF (ST__QUOTE_MAX * 4 + 8)

/* Writes s[0..n) on one printable line: control bytes escaped, quoted (in
 * double quotes, " and \ escaped) or not, more than max bytes cut (at a
 * UTF-8 boundary) with "...". buf holds ST_MSG_BUF(max) bytes. */
static const char *st__msg_n(const char *s, size_t n, size_t max, int quoted, char *buf)
{
    size_t o = 0, i, first = quoted ? 1 : 0;

    if (quoted)
        buf[o++] = '"';
    for (i = 0; i < n && i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        if (quoted && (c == '"' || c == '\\')) {
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            o += (size_t)snprintf(buf + o, 5, "\\x%02x", c);
        } else {
            buf[o++] = (char)c;
        }
    }
    if (i < n) {
        /* Do not leave half of a multi-byte character before the dots. */
        while (o > first && ((unsigned char)buf[o - 1] & 0xc0) == 0x80)
            o--;
        if (o > first && (unsigned char)buf[o - 1] >= 0xc0)
            o--;
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    if (quoted)
        buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

static const char *st__quote_n(const char *s, size_t n, char *buf)
{
    return st__msg_n(s, n, ST__QUOTE_MAX, 1, buf);
}

const char *st_msg_str(const char *s, size_t max, int quoted, char *buf)
{
    return st__msg_n(s ? s : "(null)", s ? strlen(s) : 6, max, quoted, buf);
}

static const char *st__quote(const char *s, char *buf)
{
    return st__quote_n(s, strlen(s), buf);
}

/* "[128, 2880]"; long shapes are cut after a few dimensions. */
static const char *st__shape_str(const uint64_t *shape, size_t ndim, char *buf, size_t cap)
{
    size_t o = 0, i;

    o += (size_t)snprintf(buf, cap, "[");
    for (i = 0; i < ndim && i < 8 && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%llu", i ? ", " : "",
                              (unsigned long long)shape[i]);
    if (i < ndim && o < cap)
        o += (size_t)snprintf(buf + o, cap - o, ", ... (%zu dims)", ndim);
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
    return buf;
}

static const char *st__json_type(const cJSON *v)
{
    if (cJSON_IsObject(v))
        return "an object";
    if (cJSON_IsArray(v))
        return "an array";
    if (cJSON_IsString(v))
        return "a string";
    if (cJSON_IsNumber(v))
        return "a number";
    if (cJSON_IsBool(v))
        return "a boolean";
    if (cJSON_IsNull(v))
        return "null";
    return "an invalid value";
}

/* --- UTF-8 and JSON tokens ---------------------------------------------- */

int st_utf8_check(const char *str, size_t len, size_t *bad_at)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;

    while (i < len) {
        unsigned char c = s[i];
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf;   /* bounds of the 2nd byte */

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0;     /* overlong */
            else if (c == 0xed)
                hi = 0x9f;     /* UTF-16 surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90;     /* overlong */
            else if (c == 0xf4)
                hi = 0x8f;     /* past U+10FFFF */
        } else {
            goto bad;
        }
        if (len - i <= need || s[i + 1] < lo || s[i + 1] > hi)
            goto bad;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                goto bad;
        i += need + 1;
    }
    return 0;
bad:
    if (bad_at)
        *bad_at = i;
    return -EBADMSG;
}

static int st__is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

size_t st_json_skip_ws(const char *s, size_t from, size_t len)
{
    while (from < len && st__is_ws(s[from]))
        from++;
    return from;
}

/* Bytes that may follow a number or a literal: anything else would be read
 * differently by cJSON's greedy scanners than by the JSON grammar. */
static int st__is_delim(const char *s, size_t len, size_t i)
{
    return i == len || st__is_ws(s[i]) || s[i] == ',' || s[i] == ']' || s[i] == '}' || s[i] == ':';
}

static int st__hex4(const char *s, unsigned *out)
{
    unsigned v = 0;

    for (int k = 0; k < 4; k++) {
        char c = s[k];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* A string literal at s[*pos] == '"'; leaves *pos past the closing quote. */
static int st__lex_string(const char *s, size_t len, size_t *pos, char *err, size_t errlen)
{
    size_t start = *pos, i = *pos + 1;
    char q[ST__QUOTE_BUF];

    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        unsigned u, lo;

        if (c == '"') {
            *pos = i + 1;
            return 0;
        }
        if (c < 0x20)
            return st__fail(err, errlen, -EBADMSG,
                            "not valid JSON: raw control byte 0x%02x in a string at byte %zu "
                            "(it must be escaped)", c, i);
        if (c != '\\') {
            i++;
            continue;
        }
        if (i + 1 >= len)
            break;
        switch (s[i + 1]) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            i += 2;
            continue;
        case 'u':
            if (len - i < 6 || st__hex4(s + i + 2, &u) < 0)
                return st__fail(err, errlen, -EBADMSG,
                                "not valid JSON: bad \\u escape at byte %zu", i);
            if (u == 0)
                return st__fail(err, errlen, -EBADMSG,
                                "string starting %s at byte %zu contains an escaped NUL "
                                "(\\u0000), which C strings cannot hold",
                                st__quote_n(s + start + 1, i - start - 1, q), start);
            if (u >= 0xdc00 && u <= 0xdfff)
                return st__fail(err, errlen, -EBADMSG,
                                "not valid JSON: lone UTF-16 low surrogate \\u%04x at byte %zu",
                                u, i);
            if (u >= 0xd800 && u <= 0xdbff) {
                if (len - i < 12 || s[i + 6] != '\\' || s[i + 7] != 'u' ||
                    st__hex4(s + i + 8, &lo) < 0 || lo < 0xdc00 || lo > 0xdfff)
                    return st__fail(err, errlen, -EBADMSG,
                                    "not valid JSON: UTF-16 high surrogate \\u%04x at byte %zu "
                                    "without its low half", u, i);
                i += 12;
            } else {
                i += 6;
            }
            continue;
        default:
            return st__fail(err, errlen, -EBADMSG,
                            "not valid JSON: unknown escape '\\%c' at byte %zu",
                            (unsigned char)s[i + 1] >= 0x20 && (unsigned char)s[i + 1] < 0x7f
                                ? s[i + 1] : '?', i);
        }
    }
    return st__fail(err, errlen, -EBADMSG, "not valid JSON: unterminated string at byte %zu",
                    start);
}

/* Longest number cJSON reads whole (its scratch buffer is 64 bytes). */
#define ST__NUMBER_MAX 63

static int st__lex_number(const char *s, size_t len, size_t *pos, char *err, size_t errlen)
{
    size_t start = *pos, i = *pos;

    if (s[i] == '-')
        i++;
    if (i < len && s[i] == '0') {
        i++;
    } else if (i < len && s[i] >= '1' && s[i] <= '9') {
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    } else {
        goto bad;
    }
    if (i < len && s[i] == '.') {
        i++;
        if (i >= len || s[i] < '0' || s[i] > '9')
            goto bad;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= len || s[i] < '0' || s[i] > '9')
            goto bad;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (!st__is_delim(s, len, i))
        goto bad;
    if (i - start > ST__NUMBER_MAX)
        return st__fail(err, errlen, -EBADMSG,
                        "number at byte %zu is longer than %d characters", start, ST__NUMBER_MAX);
    *pos = i;
    return 0;
bad:
    return st__fail(err, errlen, -EBADMSG, "not valid JSON: malformed number at byte %zu", start);
}

int st_json_check(const char *json, size_t len, size_t *end, char *err, size_t errlen)
{
    size_t i = 0, bad;
    long depth = 0;
    int rc;

    if (st_utf8_check(json, len, &bad) < 0)
        return st__fail(err, errlen, -EBADMSG, "not valid UTF-8 (byte 0x%02x at offset %zu)",
                        (unsigned char)json[bad], bad);
    while (i < len && st__is_ws(json[i]))
        i++;
    if (i == len)
        return st__fail(err, errlen, -EBADMSG, "not valid JSON: no value (empty or blank)");
    if (json[i] != '{')
        return st__fail(err, errlen, -EBADMSG, "not a JSON object (starts with '%c' at byte %zu)",
                        (unsigned char)json[i] >= 0x20 && (unsigned char)json[i] < 0x7f
                            ? json[i] : '?', i);
    while (i < len) {
        char c = json[i];

        if (st__is_ws(c)) {
            i++;
            continue;
        }
        switch (c) {
        case '{': case '[':
            depth++;
            i++;
            break;
        case '}': case ']':
            depth--;
            i++;
            break;
        case ':': case ',':
            i++;
            break;
        case '"':
            rc = st__lex_string(json, len, &i, err, errlen);
            if (rc < 0)
                return rc;
            break;
        case 't': case 'f': case 'n': {
            const char *word = c == 't' ? "true" : c == 'f' ? "false" : "null";
            size_t wl = strlen(word);
            if (len - i < wl || memcmp(json + i, word, wl) != 0 || !st__is_delim(json, len, i + wl))
                return st__fail(err, errlen, -EBADMSG,
                                "not valid JSON: bad literal at byte %zu", i);
            i += wl;
            break;
        }
        default:
            if (c == '-' || (c >= '0' && c <= '9')) {
                rc = st__lex_number(json, len, &i, err, errlen);
                if (rc < 0)
                    return rc;
                break;
            }
            return st__fail(err, errlen, -EBADMSG,
                            "not valid JSON: unexpected byte 0x%02x at offset %zu",
                            (unsigned char)c, i);
        }
        if (depth == 0) {
            *end = i;
            return 0;
        }
    }
    return st__fail(err, errlen, -EBADMSG, "not valid JSON: the object is not closed");
}

/* --- JSON writing -------------------------------------------------------- */

typedef struct st__buf {
    char *p;
    size_t len, cap;
    int failed;
} st__buf;

static void st__put(st__buf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap - b->len < n) {
            if (cap > SIZE_MAX / 2) {
                b->failed = 1;
                return;
            }
            cap *= 2;
        }
        p = realloc(b->p, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void st__puts(st__buf *b, const char *s)
{
    st__put(b, s, strlen(s));
}

static void st__put_u64(st__buf *b, uint64_t v)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    st__put(b, tmp, (size_t)n);
}

static void st__put_jstr(st__buf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";

    st__put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        size_t run = 0;

        /* Copy plain runs in one piece. */
        while (s[run] && (unsigned char)s[run] >= 0x20 && s[run] != '"' && s[run] != '\\')
            run++;
        if (run) {
            st__put(b, s, run);
            s += run - 1;
            continue;
        }
        switch (c) {
        case '"': st__put(b, "\\\"", 2); break;
        case '\\': st__put(b, "\\\\", 2); break;
        case '\n': st__put(b, "\\n", 2); break;
        case '\r': st__put(b, "\\r", 2); break;
        case '\t': st__put(b, "\\t", 2); break;
        case '\b': st__put(b, "\\b", 2); break;
        case '\f': st__put(b, "\\f", 2); break;
        default: {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            st__put(b, e, 6);
        }
        }
    }
    st__put(b, "\"", 1);
}

char *st_json_quote(const char *s)
{
    st__buf b = {0};

    st__put_jstr(&b, s ? s : "");
    st__put(&b, "", 1);
    if (b.failed) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

/* --- parsing -------------------------------------------------------------- */

/* cJSON keeps numbers only as doubles, which cannot tell 1.0 from 1 nor
 * hold 2^53+1. So before validating, each number node's valueint (unused
 * otherwise) is pointed at its token in the raw text: cJSON builds nodes in
 * document order, so a pre-order walk meets them in the order of the
 * tokens. The raw text was checked by st_json_check, so skipping strings
 * needs no error handling. */
static size_t st__next_number(const char *s, size_t len, size_t i)
{
    while (i < len) {
        char c = s[i];
        if (c == '"') {
            for (i++; i < len && s[i] != '"'; i++)
                if (s[i] == '\\')
                    i++;
            i++;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            return i;
        } else {
            i++;
        }
    }
    return len;
}

static int st__map_numbers(cJSON *node, const char *s, size_t len, size_t *pos)
{
    for (; node; node = node->next) {
        if (cJSON_IsNumber(node)) {
            size_t at = st__next_number(s, len, *pos);
            if (at >= len)
                return -1;
            node->valueint = (int)at;   /* len <= ST_MAX_HEADER_LEN < INT_MAX */
            *pos = at + 1;
            while (*pos < len && !st__is_delim(s, len, *pos))
                (*pos)++;
        }
        if (node->child && st__map_numbers(node->child, s, len, pos) < 0)
            return -1;
    }
    return 0;
}

/* The token behind a number node: 0 with *out for a plain non-negative
 * integer that fits 64 bits; -1 for anything else (negative, fraction,
 * exponent); -2 for an integer past 2^64-1. *tok is its text for messages. */
static int st__node_u64(const cJSON *node, const char *s, size_t len, uint64_t *out,
                        char *tok, size_t tokcap)
{
    size_t at = (size_t)node->valueint, i = at, n;
    uint64_t v = 0;
    int rc = 0;

    while (i < len && !st__is_delim(s, len, i))
        i++;
    n = i - at;
    for (i = at; i < at + n; i++) {
        unsigned d;
        if (s[i] < '0' || s[i] > '9') {
            rc = -1;
            break;
        }
        d = (unsigned)(s[i] - '0');
        if (rc == 0 && (v > (UINT64_MAX - d) / 10))
            rc = -2;   /* keep scanning: "1e999999..." must still say -1 */
        v = v * 10 + d;
    }
    if (rc < 0) /* the text, for the caller's message */
        snprintf(tok, tokcap, "%.*s", (int)(n < tokcap ? n : tokcap - 1), s + at);
    else
        *out = v;
    return rc;
}

typedef struct st__ctx {
    const char *json;     /* NUL-terminated copy of the object */
    size_t len;
    char *err;
    size_t errlen;
} st__ctx;

/* A non-negative integer element of an array field, with a message naming
 * the tensor, the field and the index on failure. */
static int st__get_u64(const st__ctx *c, const cJSON *v, const char *qname, const char *field,
                       size_t idx, uint64_t *out)
{
    char tok[ST__NUMBER_MAX + 1];
    int rc;

    if (!cJSON_IsNumber(v))
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: %s[%zu] is %s, not a non-negative integer",
                        qname, field, idx, st__json_type(v));
    rc = st__node_u64(v, c->json, c->len, out, tok, sizeof tok);
    if (rc == -1)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: %s[%zu] is %s, not a non-negative integer",
                        qname, field, idx, tok);
    if (rc == -2)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: %s[%zu] is %s, past 2^64-1", qname, field, idx, tok);
    return 0;
}

/* Checks the shape of a tensor entry (types, fields) and returns its parts. */
static int st__entry_fields(const st__ctx *c, const cJSON *entry, const char *qname,
                            const cJSON **dtype, const cJSON **shape, const cJSON **offsets)
{
    static const char *const names[3] = {"dtype", "shape", "data_offsets"};
    const cJSON *found[3] = {NULL, NULL, NULL};
    const cJSON *f;
    char q[ST__QUOTE_BUF];
    int k;

    if (!cJSON_IsObject(entry))
        return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: entry is %s, not an object",
                        qname, st__json_type(entry));
    for (f = entry->child; f; f = f->next) {
        for (k = 0; k < 3; k++)
            if (strcmp(f->string, names[k]) == 0)
                break;
        if (k == 3)
            return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: unknown field %s",
                            qname, st__quote(f->string, q));
        if (found[k])
            return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: field \"%s\" appears twice",
                            qname, names[k]);
        found[k] = f;
    }
    for (k = 0; k < 3; k++)
        if (!found[k])
            return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: missing field \"%s\"",
                            qname, names[k]);
    if (!cJSON_IsString(found[0]))
        return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: \"dtype\" is %s, not a string",
                        qname, st__json_type(found[0]));
    if (st_dtype_parse(found[0]->valuestring, NULL) < 0)
        return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: unknown dtype %s",
                        qname, st__quote(found[0]->valuestring, q));
    if (!cJSON_IsArray(found[1]))
        return st__fail(c->err, c->errlen, -EBADMSG, "tensor %s: \"shape\" is %s, not an array",
                        qname, st__json_type(found[1]));
    if (!cJSON_IsArray(found[2]))
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: \"data_offsets\" is %s, not an array of 2 integers",
                        qname, st__json_type(found[2]));
    if (cJSON_GetArraySize(found[2]) != 2)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: \"data_offsets\" has %d elements, not 2",
                        qname, cJSON_GetArraySize(found[2]));
    *dtype = found[0];
    *shape = found[1];
    *offsets = found[2];
    return 0;
}

static int st__cmp_offsets(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;

    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    /* Empty tensors share their begin with the next one: the empty one
     * first, as the reference sorts by (begin, end). */
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int st__cmp_by_name(const void *a, const void *b)
{
    const st_tensor *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int st__cmp_meta_key(const void *a, const void *b)
{
    const st_meta *const *x = a, *const *y = b;
    return strcmp((*x)->key, (*y)->key);
}

static int st__checked_add(size_t *acc, size_t v)
{
    if (*acc > SIZE_MAX - v)
        return -1;
    *acc += v;
    return 0;
}

/* The bytes that `shape` of `dtype` takes, into *bytes. A shape of more than
 * 2^64-1 elements or bits fails with overflow_rc, one that is not a whole
 * number of bytes with partial_rc; the message names tensor q. */
static int st__shape_bytes(const uint64_t *shape, size_t ndim, st_dtype dtype, const char *q, int overflow_rc,
                           int partial_rc, uint64_t *bytes, char *err, size_t errlen)
{
    char shp[160];
    uint64_t numel = 1, bits;

    for (size_t d = 0; d < ndim; d++)
        if (__builtin_mul_overflow(numel, shape[d], &numel))
            return st__fail(err, errlen, overflow_rc, "tensor %s: shape %s has more than 2^64-1 elements", q,
                            st__shape_str(shape, ndim, shp, sizeof shp));
    if (__builtin_mul_overflow(numel, (uint64_t)st_dtype_bits(dtype), &bits))
        return st__fail(err, errlen, overflow_rc, "tensor %s: shape %s x %s is more than 2^64-1 bits", q,
                        st__shape_str(shape, ndim, shp, sizeof shp), st_dtype_name(dtype));
    if (bits % 8)
        return st__fail(err, errlen, partial_rc, "tensor %s: shape %s x %s is %llu bits, not a whole number of bytes",
                        q, st__shape_str(shape, ndim, shp, sizeof shp), st_dtype_name(dtype),
                        (unsigned long long)bits);
    *bytes = bits / 8;
    return 0;
}

/* Size, dtype and offsets of one tensor, already filled in. */
static int st__check_tensor(const st__ctx *c, const st_tensor *t)
{
    char q[ST__QUOTE_BUF], shp[160];
    uint64_t bytes;
    int rc;

    st__quote(t->name, q);
    if (t->end < t->begin)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: data_offsets [%llu, %llu] end before they begin", q,
                        (unsigned long long)t->begin, (unsigned long long)t->end);
    if ((rc = st__shape_bytes(t->shape, t->ndim, t->dtype, q, -EBADMSG, -EBADMSG, &bytes, c->err, c->errlen)))
        return rc;
    if (t->end - t->begin != bytes)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "tensor %s: data_offsets [%llu, %llu] hold %llu bytes but shape %s x %s "
                        "needs %llu", q, (unsigned long long)t->begin,
                        (unsigned long long)t->end, (unsigned long long)(t->end - t->begin),
                        st__shape_str(t->shape, t->ndim, shp, sizeof shp), st_dtype_name(t->dtype),
                        (unsigned long long)bytes);
    return 0;
}

/* Sorted by offsets, the tensors must tile [0, end) with no gap or overlap,
 * and, when the data length is known, end must be exactly that. */
static int st__check_layout(const st__ctx *c, const st_file *f, uint64_t data_len)
{
    char q[ST__QUOTE_BUF], qp[ST__QUOTE_BUF];
    uint64_t pos = 0;

    for (size_t i = 0; i < f->n_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->begin > pos) {
            if (i == 0)
                return st__fail(c->err, c->errlen, -EBADMSG,
                                "tensor %s: data_offsets [%llu, %llu] leave a gap of %llu bytes "
                                "at the start of the data", st__quote(t->name, q),
                                (unsigned long long)t->begin, (unsigned long long)t->end,
                                (unsigned long long)t->begin);
            return st__fail(c->err, c->errlen, -EBADMSG,
                            "tensor %s: data_offsets [%llu, %llu] leave a gap of %llu bytes "
                            "after tensor %s, which ends at %llu", st__quote(t->name, q),
                            (unsigned long long)t->begin, (unsigned long long)t->end,
                            (unsigned long long)(t->begin - pos),
                            st__quote(f->tensors[i - 1].name, qp), (unsigned long long)pos);
        }
        if (t->begin < pos) {
            const st_tensor *p = &f->tensors[i - 1];
            return st__fail(c->err, c->errlen, -EBADMSG,
                            "tensor %s: data_offsets [%llu, %llu] overlap tensor %s [%llu, %llu]",
                            st__quote(t->name, q), (unsigned long long)t->begin,
                            (unsigned long long)t->end, st__quote(p->name, qp),
                            (unsigned long long)p->begin, (unsigned long long)p->end);
        }
        pos = t->end;
    }
    if (data_len == ST_DATA_LEN_UNKNOWN || data_len == pos)
        return 0;
    if (data_len < pos)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "data section is %llu bytes but the tensors need %llu (truncated file?)",
                        (unsigned long long)data_len, (unsigned long long)pos);
    if (f->n_tensors == 0)
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "data section is %llu bytes but the header lists no tensors",
                        (unsigned long long)data_len);
    return st__fail(c->err, c->errlen, -EBADMSG,
                    "%llu bytes follow the last tensor %s, which ends at %llu (data section is "
                    "%llu bytes)", (unsigned long long)(data_len - pos),
                    st__quote(f->tensors[f->n_tensors - 1].name, q), (unsigned long long)pos,
                    (unsigned long long)data_len);
}

static int st__fill_meta(const st__ctx *c, const cJSON *md, st_file *f)
{
    const cJSON *m;
    size_t n = 0, bytes = 0, i;
    const st_meta **sorted = NULL;
    char q[ST__QUOTE_BUF], *strings;
    int rc = 0;

    if (!cJSON_IsObject(md))
        return st__fail(c->err, c->errlen, -EBADMSG,
                        "\"__metadata__\" is %s, not an object of strings", st__json_type(md));
    for (m = md->child; m; m = m->next) {
        if (!cJSON_IsString(m))
            return st__fail(c->err, c->errlen, -EBADMSG,
                            "\"__metadata__\": the value of %s is %s, not a string",
                            st__quote(m->string, q), st__json_type(m));
        if (st__checked_add(&bytes, strlen(m->string) + strlen(m->valuestring) + 2) < 0)
            return st__fail(c->err, c->errlen, -ENOMEM, "\"__metadata__\" is too large");
        n++;
    }
    if (n == 0)
        return 0;
    if (n > (SIZE_MAX - bytes) / sizeof(st_meta))
        return st__fail(c->err, c->errlen, -ENOMEM, "\"__metadata__\" is too large");
    f->meta = malloc(n * sizeof(st_meta) + bytes);
    if (!f->meta)
        return st__fail(c->err, c->errlen, -ENOMEM, "out of memory for \"__metadata__\"");
    f->n_meta = n;
    strings = (char *)(f->meta + n);
    for (m = md->child, i = 0; m; m = m->next, i++) {
        size_t kl = strlen(m->string) + 1, vl = strlen(m->valuestring) + 1;
        f->meta[i].key = memcpy(strings, m->string, kl);
        strings += kl;
        f->meta[i].value = memcpy(strings, m->valuestring, vl);
        strings += vl;
    }
    /* cJSON keeps duplicate keys; the reference's map would silently keep
     * one of them. Refuse instead. */
    if (n > 1) {
        sorted = malloc(n * sizeof *sorted);
        if (!sorted)
            return st__fail(c->err, c->errlen, -ENOMEM, "out of memory for \"__metadata__\"");
        for (i = 0; i < n; i++)
            sorted[i] = &f->meta[i];
        qsort(sorted, n, sizeof *sorted, st__cmp_meta_key);
        for (i = 1; i < n; i++) {
            if (strcmp(sorted[i - 1]->key, sorted[i]->key) == 0) {
                rc = st__fail(c->err, c->errlen, -EBADMSG, "\"__metadata__\": key %s appears twice",
                              st__quote(sorted[i]->key, q));
                break;
            }
        }
        free(sorted);
    }
    return rc;
}

int st_parse_header(const char *json, size_t len, uint64_t data_len, st_file *out,
                    char *err, size_t errlen)
{
    st__ctx c = {NULL, 0, err, errlen};
    st_file f;
    cJSON *root = NULL;
    const cJSON *e, *md = NULL;
    char *copy = NULL, *names;
    char q[ST__QUOTE_BUF];
    size_t end = 0, pos = 0, n = 0, ndims = 0, name_bytes = 0, total, i;
    uint64_t *shapes;
    int rc;

    memset(&f, 0, sizeof f);
    if (out)
        memset(out, 0, sizeof *out);
    if (!out || (!json && len))
        return st__fail(err, errlen, -EINVAL, "st_parse_header: bad arguments");
    if (len > ST_MAX_HEADER_LEN) {
        rc = st__fail(err, errlen, -EBADMSG, "header is %zu bytes, over the limit of %llu",
                      len, ST_MAX_HEADER_LEN);
        goto out;
    }
    if (len == 0) {
        rc = st__fail(err, errlen, -EBADMSG, "header is empty");
        goto out;
    }
    /* The reference (0.4 on) insists on '{' first; no leading blanks. */
    if (json[0] != '{' && st_utf8_check(json, len, NULL) == 0) {
        rc = st__fail(err, errlen, -EBADMSG, "header does not start with '{' (byte 0x%02x)",
                      (unsigned char)json[0]);
        goto out;
    }
    rc = st_json_check(json, len, &end, err, errlen);
    if (rc < 0) {
        st__prefix(err, errlen, "header");
        goto out;
    }
    /* Writers pad with spaces; JSON whitespace is accepted as the reference
     * (serde_json) does, anything else is not. */
    if ((i = st_json_skip_ws(json, end, len)) < len) {
        rc = st__fail(err, errlen, -EBADMSG,
                      "header has byte 0x%02x at offset %zu after the JSON object "
                      "(only whitespace padding may follow it)", (unsigned char)json[i], i);
        goto out;
    }

    /* cJSON gets a NUL-terminated copy of exactly the object, so that
     * nothing it does can read past what the caller gave. */
    copy = malloc(end + 1);
    if (!copy) {
        rc = st__fail(err, errlen, -ENOMEM, "out of memory for a %zu-byte header", len);
        goto out;
    }
    memcpy(copy, json, end);
    copy[end] = '\0';
    c.json = copy;
    c.len = end;
    {
        const char *stop = NULL;
        root = cJSON_ParseWithLengthOpts(copy, end + 1, &stop, 1);
        if (!root) {
            rc = st__fail(err, errlen, -EBADMSG, "header is not valid JSON (error near byte %zu)",
                          stop && stop >= copy ? (size_t)(stop - copy) : (size_t)0);
            goto out;
        }
    }
    if (st__map_numbers(root, copy, end, &pos) < 0) {
        rc = st__fail(err, errlen, -EBADMSG, "header: numbers do not match the JSON text");
        goto out;
    }

    /* Pass 1: types and fields, and the sizes of the one allocation. */
    for (e = root->child; e; e = e->next) {
        const cJSON *dt, *sh, *of;
        if (strcmp(e->string, "__metadata__") == 0) {
            if (md) {
                rc = st__fail(err, errlen, -EBADMSG, "\"__metadata__\" appears twice");
                goto out;
            }
            md = e;
            continue;
        }
        rc = st__entry_fields(&c, e, st__quote(e->string, q), &dt, &sh, &of);
        if (rc < 0)
            goto out;
        n++;
        if (st__checked_add(&ndims, (size_t)cJSON_GetArraySize(sh)) < 0 ||
            st__checked_add(&name_bytes, strlen(e->string) + 1) < 0) {
            rc = st__fail(err, errlen, -ENOMEM, "header is too large");
            goto out;
        }
    }
    if (md) {
        rc = st__fill_meta(&c, md, &f);
        if (rc < 0)
            goto out;
    }

    if (n) {
        size_t a = n * sizeof(st_tensor), b = n * sizeof(st_tensor *), s;
        if (n > SIZE_MAX / sizeof(st_tensor) || ndims > SIZE_MAX / sizeof(uint64_t)) {
            rc = st__fail(err, errlen, -ENOMEM, "header is too large");
            goto out;
        }
        s = ndims * sizeof(uint64_t);
        total = a;
        if (st__checked_add(&total, b) < 0 || st__checked_add(&total, s) < 0 ||
            st__checked_add(&total, name_bytes) < 0) {
            rc = st__fail(err, errlen, -ENOMEM, "header is too large");
            goto out;
        }
        /* [tensors][by_name][shapes][names]: all 8-byte aligned but names. */
        f.tensors = calloc(1, total);
        if (!f.tensors) {
            rc = st__fail(err, errlen, -ENOMEM, "out of memory for %zu tensors", n);
            goto out;
        }
        f.by_name = (const st_tensor **)((char *)f.tensors + a);
        shapes = (uint64_t *)((char *)f.tensors + a + b);
        names = (char *)f.tensors + a + b + s;

        /* Pass 2: values, in document order. */
        i = 0;
        for (e = root->child; e; e = e->next) {
            const cJSON *dt, *sh, *of, *v;
            st_tensor *t;
            size_t d = 0, nl;

            if (e == md)
                continue;
            t = &f.tensors[i++];
            st__quote(e->string, q);
            (void)st__entry_fields(&c, e, q, &dt, &sh, &of);
            nl = strlen(e->string) + 1;
            t->name = memcpy(names, e->string, nl);
            names += nl;
            (void)st_dtype_parse(dt->valuestring, &t->dtype);
            t->ndim = (size_t)cJSON_GetArraySize(sh);
            t->shape = t->ndim ? shapes : NULL;
            for (v = sh->child; v; v = v->next, d++) {
                rc = st__get_u64(&c, v, q, "shape", d, &shapes[d]);
                if (rc < 0)
                    goto out;
            }
            shapes += t->ndim;
            rc = st__get_u64(&c, of->child, q, "data_offsets", 0, &t->begin);
            if (rc < 0)
                goto out;
            rc = st__get_u64(&c, of->child->next, q, "data_offsets", 1, &t->end);
            if (rc < 0)
                goto out;
            rc = st__check_tensor(&c, t);
            if (rc < 0)
                goto out;
        }
        f.n_tensors = n;

        /* Data order first, then the name index over the sorted tensors. */
        qsort(f.tensors, n, sizeof *f.tensors, st__cmp_offsets);
        for (i = 0; i < n; i++)
            f.by_name[i] = &f.tensors[i];
        qsort(f.by_name, n, sizeof *f.by_name, st__cmp_by_name);
        for (i = 1; i < n; i++) {
            if (strcmp(f.by_name[i - 1]->name, f.by_name[i]->name) == 0) {
                rc = st__fail(err, errlen, -EBADMSG, "tensor %s appears twice in the header",
                              st__quote(f.by_name[i]->name, q));
                goto out;
            }
        }
    }
    rc = st__check_layout(&c, &f, data_len);
    if (rc < 0)
        goto out;

    f.header_len = len;
    f.data_offset = 8 + (uint64_t)len;
    f.data_len = data_len;
    *out = f;
    memset(&f, 0, sizeof f);
    rc = 0;
out:
    cJSON_Delete(root);
    free(copy);
    st_free(&f);
    return rc;
}

int st_parse_buffer(const void *file_image, size_t len, st_file *out, char *err, size_t errlen)
{
    const unsigned char *p = file_image;
    uint64_t n = 0;

    if (out)
        memset(out, 0, sizeof *out);
    if (!out || (!file_image && len))
        return st__fail(err, errlen, -EINVAL, "st_parse_buffer: bad arguments");
    if (len < 8)
        return st__fail(err, errlen, -EBADMSG,
                        "file is %zu bytes, too short for the 8-byte header length", len);
    for (int k = 7; k >= 0; k--)
        n = n << 8 | p[k];
    if (n > ST_MAX_HEADER_LEN)
        return st__fail(err, errlen, -EBADMSG, "header length %llu is over the limit of %llu",
                        (unsigned long long)n, ST_MAX_HEADER_LEN);
    if (n > len - 8)
        return st__fail(err, errlen, -EBADMSG,
                        "header length %llu runs past the end of the file (%zu bytes)",
                        (unsigned long long)n, len);
    return st_parse_header((const char *)p + 8, (size_t)n, (uint64_t)(len - 8 - n), out,
                           err, errlen);
}

/* pread until n bytes or end of file; *got is what arrived. */
static int st__pread_full(int fd, void *buf, size_t n, uint64_t off, size_t *got)
{
    size_t done = 0;

    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *got = done;
            return -errno;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

/* Longest file name shown in a message. */
#define ST__NAME_MAX 1024

int st_read_fd(int fd, const char *display_name, st_file *out, char *err, size_t errlen)
{
    char name_buf[ST_MSG_BUF(ST__NAME_MAX)];
    const char *name = st_msg_str(display_name ? display_name : "(fd)", ST__NAME_MAX, 0, name_buf);
    unsigned char prefix[8];
    char *header = NULL;
    struct stat sb;
    uint64_t n = 0, size;
    size_t got;
    int rc;

    if (out)
        memset(out, 0, sizeof *out);
    if (!out || fd < 0)
        return st__fail(err, errlen, -EINVAL, "%s: st_read_fd: bad arguments", name);
    if (fstat(fd, &sb) < 0) {
        rc = -errno;
        return st__fail(err, errlen, rc, "%s: cannot stat: %s", name, strerror(-rc));
    }
    if (S_ISDIR(sb.st_mode))
        return st__fail(err, errlen, -EISDIR, "%s: is a directory, not a safetensors file", name);
    if (!S_ISREG(sb.st_mode))
        return st__fail(err, errlen, -EINVAL, "%s: not a regular file", name);
    size = (uint64_t)sb.st_size;
    if (size < 8)
        return st__fail(err, errlen, -EBADMSG,
                        "%s: file is %llu bytes, too short for the 8-byte header length", name,
                        (unsigned long long)size);
    rc = st__pread_full(fd, prefix, 8, 0, &got);
    if (rc < 0)
        return st__fail(err, errlen, rc, "%s: cannot read: %s", name, strerror(-rc));
    if (got < 8)
        return st__fail(err, errlen, -EIO, "%s: file shrank while being read", name);
    for (int k = 7; k >= 0; k--)
        n = n << 8 | prefix[k];
    if (n > ST_MAX_HEADER_LEN)
        return st__fail(err, errlen, -EBADMSG, "%s: header length %llu is over the limit of %llu",
                        name, (unsigned long long)n, ST_MAX_HEADER_LEN);
    if (n > size - 8)
        return st__fail(err, errlen, -EBADMSG,
                        "%s: header length %llu runs past the end of the file (%llu bytes)",
                        name, (unsigned long long)n, (unsigned long long)size);
    header = malloc(n ? (size_t)n : 1);
    if (!header)
        return st__fail(err, errlen, -ENOMEM, "%s: out of memory for a %llu-byte header", name,
                        (unsigned long long)n);
    rc = st__pread_full(fd, header, (size_t)n, 8, &got);
    if (rc < 0) {
        rc = st__fail(err, errlen, rc, "%s: cannot read the header: %s", name, strerror(-rc));
        goto out;
    }
    if (got < n) {
        rc = st__fail(err, errlen, -EIO, "%s: file shrank while the header was read", name);
        goto out;
    }
    rc = st_parse_header(header, (size_t)n, size - 8 - n, out, err, errlen);
    if (rc < 0)
        st__prefix(err, errlen, name);
out:
    free(header);
    return rc;
}

int st_read(const char *path, st_file *out, char *err, size_t errlen)
{
    int fd, rc;

    if (out)
        memset(out, 0, sizeof *out);
    if (!path || !out)
        return st__fail(err, errlen, -EINVAL, "st_read: bad arguments");
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; st_read_fd
     * refuses anything but a regular file. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        char name_buf[ST_MSG_BUF(ST__NAME_MAX)];
        rc = -errno;
        return st__fail(err, errlen, rc, "%s: cannot open: %s",
                        st_msg_str(path, ST__NAME_MAX, 0, name_buf), strerror(-rc));
    }
    rc = st_read_fd(fd, path, out, err, errlen);
    close(fd);
    return rc;
}

void st_free(st_file *f)
{
    if (!f)
        return;
    free(f->tensors);   /* names, shapes and the index live in this block */
    free(f->meta);      /* and the metadata strings in this one */
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    size_t lo = 0, hi;

    if (!f || !name || !f->by_name)
        return NULL;
    hi = f->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->name);
        if (c == 0)
            return f->by_name[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

uint64_t st_tensor_numel(const st_tensor *t)
{
    uint64_t n = 1;

    for (size_t d = 0; d < t->ndim; d++)
        if (__builtin_mul_overflow(n, t->shape[d], &n))
            return UINT64_MAX;
    return n;
}

/* --- writing ------------------------------------------------------------ */

static int st__cmp_spec_name(const void *a, const void *b)
{
    const st_tensor_spec *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

int st_build_header(const st_tensor_spec *tensors, size_t n, const st_meta *meta, size_t n_meta,
                    char **out, size_t *out_len, uint64_t *data_len, char *err, size_t errlen)
{
    const st_tensor_spec **sorted = NULL;
    const st_meta **msorted = NULL;
    st__buf b = {0};
    char q[ST__QUOTE_BUF];
    uint64_t offset = 0, hlen;
    size_t i;
    int rc;

    if (!out || !out_len || !data_len || (n && !tensors) || (n_meta && !meta))
        return st__fail(err, errlen, -EINVAL, "st_build_header: bad arguments");
    *out = NULL;
    *out_len = 0;
    *data_len = 0;

    for (i = 0; i < n; i++) {
        const st_tensor_spec *t = &tensors[i];
        uint64_t bytes;

        if (!t->name)
            return st__fail(err, errlen, -EINVAL, "tensor %zu has no name", i);
        st__quote(t->name, q);
        if (st_utf8_check(t->name, strlen(t->name), NULL) < 0)
            return st__fail(err, errlen, -EINVAL, "tensor %s: name is not valid UTF-8", q);
        if (strcmp(t->name, "__metadata__") == 0)
            return st__fail(err, errlen, -EINVAL, "tensor %s: the name is reserved", q);
        if (!st_dtype_name(t->dtype))
            return st__fail(err, errlen, -EINVAL, "tensor %s: dtype %d is not a dtype", q,
                            (int)t->dtype);
        if (t->ndim && !t->shape)
            return st__fail(err, errlen, -EINVAL, "tensor %s: %zu dims but no shape", q, t->ndim);
        if ((rc = st__shape_bytes(t->shape, t->ndim, t->dtype, q, -EOVERFLOW, -EINVAL, &bytes, err, errlen)))
            return rc;
        if (__builtin_add_overflow(offset, bytes, &offset))
            return st__fail(err, errlen, -EOVERFLOW,
                            "tensor %s: the data would pass 2^64-1 bytes", q);
    }
    for (i = 0; i < n_meta; i++) {
        if (!meta[i].key || !meta[i].value)
            return st__fail(err, errlen, -EINVAL, "metadata entry %zu has no key or value", i);
        if (st_utf8_check(meta[i].key, strlen(meta[i].key), NULL) < 0 ||
            st_utf8_check(meta[i].value, strlen(meta[i].value), NULL) < 0)
            return st__fail(err, errlen, -EINVAL, "metadata %s: not valid UTF-8",
                            st__quote(meta[i].key, q));
    }

    if (n > 1) {
        sorted = malloc(n * sizeof *sorted);
        if (!sorted) {
            rc = st__fail(err, errlen, -ENOMEM, "out of memory");
            goto out;
        }
        for (i = 0; i < n; i++)
            sorted[i] = &tensors[i];
        qsort(sorted, n, sizeof *sorted, st__cmp_spec_name);
        for (i = 1; i < n; i++) {
            if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
                rc = st__fail(err, errlen, -EINVAL, "tensor %s appears twice",
                              st__quote(sorted[i]->name, q));
                goto out;
            }
        }
    }
    if (n_meta > 1) {
        msorted = malloc(n_meta * sizeof *msorted);
        if (!msorted) {
            rc = st__fail(err, errlen, -ENOMEM, "out of memory");
            goto out;
        }
        for (i = 0; i < n_meta; i++)
            msorted[i] = &meta[i];
        qsort(msorted, n_meta, sizeof *msorted, st__cmp_meta_key);
        for (i = 1; i < n_meta; i++) {
            if (strcmp(msorted[i - 1]->key, msorted[i]->key) == 0) {
                rc = st__fail(err, errlen, -EINVAL, "metadata key %s appears twice",
                              st__quote(msorted[i]->key, q));
                goto out;
            }
        }
    }

    st__put(&b, "\0\0\0\0\0\0\0\0{", 9);
    if (n_meta) {
        st__puts(&b, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (i)
                st__put(&b, ",", 1);
            st__put_jstr(&b, meta[i].key);
            st__put(&b, ":", 1);
            st__put_jstr(&b, meta[i].value);
        }
        st__put(&b, "}", 1);
    }
    offset = 0;
    for (i = 0; i < n; i++) {
        const st_tensor_spec *t = &tensors[i];
        uint64_t nbytes = 1;

        for (size_t d = 0; d < t->ndim; d++)
            nbytes *= t->shape[d];
        nbytes = nbytes * st_dtype_bits(t->dtype) / 8; /* no overflow: checked above */
        if (i || n_meta)
            st__put(&b, ",", 1);
        st__put_jstr(&b, t->name);
        st__puts(&b, ":{\"dtype\":\"");
        st__puts(&b, st_dtype_name(t->dtype));
        st__puts(&b, "\",\"shape\":[");
        for (size_t d = 0; d < t->ndim; d++) {
            if (d)
                st__put(&b, ",", 1);
            st__put_u64(&b, t->shape[d]);
        }
        st__puts(&b, "],\"data_offsets\":[");
        st__put_u64(&b, offset);
        st__put(&b, ",", 1);
        st__put_u64(&b, offset + nbytes);
        st__puts(&b, "]}");
        offset += nbytes;
    }
    st__put(&b, "}", 1);
    while (!b.failed && b.len % 8)
        st__put(&b, " ", 1);
    if (b.failed) {
        rc = st__fail(err, errlen, -ENOMEM, "out of memory for the header");
        goto out;
    }
    hlen = b.len - 8;
    if (hlen > ST_MAX_HEADER_LEN) {
        rc = st__fail(err, errlen, -EFBIG, "header would be %llu bytes, over the limit of %llu",
                      (unsigned long long)hlen, ST_MAX_HEADER_LEN);
        goto out;
    }
    for (int k = 0; k < 8; k++)
        b.p[k] = (char)(unsigned char)(hlen >> (8 * k));
    *out = b.p;
    *out_len = b.len;
    *data_len = offset;
    b.p = NULL;
    rc = 0;
out:
    free(b.p);
    free(sorted);
    free(msorted);
    return rc;
}

#endif /* ST_IMPLEMENTATION */
