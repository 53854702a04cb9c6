/* The one error table: negative errno values, their protocol names and meanings.
 *
 * Functions that can fail return 0 or a negative errno. Where a caller needs
 * more than the number (which file, which tensor, which rule), the function
 * also fills a wd_error. The protocol's "code" field is wd_errname(). */
#ifndef WD_ERRORS_H
#define WD_ERRORS_H

#include <errno.h>
#include <stddef.h>

/* X(errno, what it means in weightd) */
#define WD_ERRNO_TABLE(X)                                                     \
    X(EPERM,           "operation not permitted for this peer")               \
    X(ENOENT,          "no such model, file or tensor")                       \
    X(EIO,             "input/output error")                                  \
    X(EBADF,           "bad file descriptor")                                 \
    X(EAGAIN,          "try again")                                           \
    X(ENOMEM,          "out of memory on the device")                         \
    X(EACCES,          "permission denied")                                   \
    X(EBUSY,           "busy: in use or being loaded")                        \
    X(EEXIST,          "already exists")                                      \
    X(ENODEV,          "no such device")                                      \
    X(ENOTDIR,         "not a directory")                                     \
    X(EISDIR,          "is a directory")                                      \
    X(EINVAL,          "invalid argument")                                    \
    X(EFBIG,           "too large")                                           \
    X(ENOSPC,          "no space left")                                       \
    X(ERANGE,          "out of range")                                        \
    X(ENAMETOOLONG,    "name too long")                                       \
    X(ENOSYS,          "operation not supported by this daemon")              \
    X(EOVERFLOW,       "value too large for its type")                        \
    X(EPROTO,          "protocol error")                                      \
    X(EBADMSG,         "malformed message or file")                           \
    X(EMSGSIZE,        "message too long")                                    \
    X(EPROTONOSUPPORT, "unsupported protocol version")                        \
    X(ENOTSUP,         "not supported by this backend")                       \
    X(EADDRINUSE,      "address in use")                                      \
    X(ECONNRESET,      "connection reset by peer")                            \
    X(EPIPE,           "the connection was closed (broken pipe)")             \
    X(ENOTCONN,        "not connected")                                       \
    X(ETIMEDOUT,       "timed out")                                           \
    X(ECONNREFUSED,    "connection refused: is weightd running?")             \
    X(ECANCELED,       "cancelled")                                           \
    X(EILSEQ,          "invalid byte sequence")                               \
    X(ESTALE,          "the checkpoint changed since it was loaded")

typedef struct wd_error {
    int code;          /* negative errno, 0 when nothing failed */
    char msg[768];     /* one line, no trailing newline */
} wd_error;

/* "ENOENT" for -ENOENT (or ENOENT); "E123" for a value not in the table. */
const char *wd_errname(int err);
/* The table's meaning, or strerror() for a value not in it. */
const char *wd_strerror(int err);
/* -ENOENT for "ENOENT"; -EPROTO for a name not in the table. */
int wd_errcode(const char *name);

/* Sets e (when not NULL) and returns code, so that `return wd_error_set(...)`
 * reads as one step. code is a negative errno. */
int wd_error_set(wd_error *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefixes the message already in e with more context ("shard X: ..."). */
void wd_error_prefix(wd_error *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The message, or the table's meaning when no message was set. */
const char *wd_error_text(const wd_error *e);
/* Makes s one line of valid UTF-8, in place: each byte of an invalid
 * sequence, and each control character, becomes '?'. For text that came
 * from a peer or a file and goes into a message. */
void wd_text_clean(char *s);
/* The offset of the first byte of s[0..len) that is not part of valid
 * UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), or
 * len when all of it is. */
size_t wd_utf8_check(const char *s, size_t len);

#endif
