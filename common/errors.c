#include "common/errors.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int err_abs(int err) { return err < 0 ? -err : err; }

const char *wd_errname(int err)
{
    static __thread char other[16];
    switch (err_abs(err)) {
#define X(code, what) case code: return #code;
        WD_ERRNO_TABLE(X)
#undef X
    default:
        snprintf(other, sizeof other, "E%d", err_abs(err));
        return other;
    }
}

const char *wd_strerror(int err)
{
    switch (err_abs(err)) {
#define X(code, what) case code: return what;
        WD_ERRNO_TABLE(X)
#undef X
    default:
        return strerror(err_abs(err));
    }
}

int wd_errcode(const char *name)
{
#define X(code, what) if (name && strcmp(name, #code) == 0) return -code;
    WD_ERRNO_TABLE(X)
#undef X
    return -EPROTO;
}

int wd_error_set(wd_error *e, int code, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        e->code = code;
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void wd_error_prefix(wd_error *e, const char *fmt, ...)
{
    char prefix[256], joined[sizeof prefix + sizeof e->msg + 2];
    size_t n;
    va_list ap;

    if (!e)
        return;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    snprintf(joined, sizeof joined, "%s: %s", prefix, e->msg[0] ? e->msg : wd_strerror(e->code));
    /* Cut to fit: the message is for people. */
    n = strlen(joined);
    if (n >= sizeof e->msg)
        n = sizeof e->msg - 1;
    memcpy(e->msg, joined, n);
    e->msg[n] = '\0';
}

const char *wd_error_text(const wd_error *e)
{
    return e->msg[0] ? e->msg : wd_strerror(e->code);
}

/* The length of the valid UTF-8 sequence at s (1 to 4), or 0. */
static size_t utf8_sequence(const unsigned char *s)
{
    unsigned c = s[0];
    size_t n = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;

    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    /* no overlong forms, no surrogates, nothing past U+10FFFF */
    if ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f) || (c == 0xf0 && s[1] < 0x90) ||
        (c == 0xf4 && s[1] > 0x8f))
        return 0;
    return n;
}

size_t wd_utf8_check(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    while (i < len) {
        size_t n;
        if (p[i] < 0x80) { /* the common case, a byte at a time */
            i++;
            continue;
        }
        /* utf8_sequence reads up to 4 bytes: only where they exist */
        if (len - i < 4) {
            unsigned char tail[4] = {0};
            memcpy(tail, p + i, len - i);
            n = utf8_sequence(tail);
            if (n == 0 || n > len - i)
                return i;
        } else if ((n = utf8_sequence(p + i)) == 0) {
            return i;
        }
        i += n;
    }
    return len;
}

void wd_text_clean(char *s)
{
    unsigned char *p = (unsigned char *)s;

    while (*p) {
        size_t n = utf8_sequence(p);
        if (n == 0 || (n == 1 && (*p < 0x20 || *p == 0x7f))) {
            *p++ = '?';
            continue;
        }
        p += n;
    }
}
