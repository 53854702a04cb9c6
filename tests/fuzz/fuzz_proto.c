/* fuzz_proto: libFuzzer harness for the protocol's reading side
 * (proto/framing.c, proto/message.c): what any client can send the daemon.
 *
 * The input is the byte stream of one connection. It is written into one end
 * of a socketpair, which is then shut, and read from the other end as the
 * daemon reads it: wp_reader_fill until the end, each whole line through
 * wp_reader_next and wp_parse. For every line that parses, the daemon's
 * argument accessors run on its "args", and replies are built and encoded as
 * the daemon would (an error reply and an ok reply echoing id and args).
 *
 * Checks: a parsed message is an object; a refused line gets -EBADMSG and one
 * line of printable UTF-8; the accessors return 0, -ENOENT or -EINVAL (with a
 * message) and honour their bounds; every encoded reply is one line, ending
 * in its only newline, that parses back to JSON that encodes the same (a
 * number too large for a double becomes null: JSON has no spelling for
 * infinity); the reader never yields more bytes than it was given. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proto/proto.h"
#include "tests/fuzz/fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* msg encoded is one line that parses back to what encodes the same. (Text,
 * not cJSON_Compare: a message may repeat a key, and compare looks up the
 * first of each.) */
static void check_encoding(const cJSON *msg)
{
    size_t len = 0, len2 = 0;
    char *line = wp_encode(msg, &len), *again;
    cJSON *back = NULL;
    wd_error err = {0};

    FZ_CHECK(line != NULL, "wp_encode failed");
    FZ_CHECK(len >= 3 && line[len - 1] == '\n', "an encoded message must end in a newline");
    FZ_CHECK(memchr(line, '\n', len - 1) == NULL, "an encoded message holds a newline before its end");
    FZ_CHECK(wp_parse(line, len - 1, &back, &err) == 0, "an encoded message does not parse back: %s", err.msg);
    again = wp_encode(back, &len2);
    FZ_CHECK(again && len2 == len && memcmp(line, again, len) == 0, "an encoded message parses back different");
    cJSON_Delete(back);
    free(again);
    free(line);
}

static void check_arg_result(int rc, const wd_error *err, const char *key)
{
    FZ_CHECK(rc == 0 || rc == -ENOENT || rc == -EINVAL, "argument %s: rc %d", key, rc);
    if (rc == -EINVAL) {
        FZ_CHECK(err->code == -EINVAL, "argument %s: err.code %d", key, err->code);
        fz_check_msg(err->msg, sizeof err->msg);
    }
}

/* What the daemon does with a parsed request before its handler runs. */
static void handle(const cJSON *msg)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(msg, "id");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(msg, "args");
    const char *s = NULL;
    int64_t v = 0;
    bool b = false;
    wd_error err = {0};
    cJSON *reply;
    int rc;

    if (!cJSON_IsObject(args))
        args = NULL;
    rc = wp_arg_string(args, "name", false, &s, &err);
    check_arg_result(rc, &err, "name");
    FZ_CHECK(rc != 0 || (s && cJSON_IsString(cJSON_GetObjectItemCaseSensitive(args, "name"))), "name: no string");
    memset(&err, 0, sizeof err);
    rc = wp_arg_int(args, "offset", false, 0, 100000, &v, &err);
    check_arg_result(rc, &err, "offset");
    FZ_CHECK(rc != 0 || (v >= 0 && v <= 100000), "offset %lld out of its bounds", (long long)v);
    memset(&err, 0, sizeof err);
    rc = wp_arg_bool(args, "events", &b, &err);
    check_arg_result(rc, &err, "events");

    reply = wp_reply_error(id, -EINVAL, "a message\nwith a newline and \x01 a control byte");
    FZ_CHECK(reply != NULL, "wp_reply_error failed");
    check_encoding(reply);
    cJSON_Delete(reply);
    reply = wp_reply_ok(id, args ? cJSON_Duplicate(args, 1) : NULL);
    FZ_CHECK(reply != NULL, "wp_reply_ok failed");
    check_encoding(reply);
    cJSON_Delete(reply);
    check_encoding(msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    size_t sent = 0, yielded = 0;
    bool shut = false;
    wp_reader r;

    /* Both ends non-blocking: the input is written as the reader drains it,
     * so inputs larger than a socket's buffer (and lines past the 1 MiB
     * limit) go through as well. */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        return 0;
    wp_reader_init(&r);
    for (;;) {
        int got, more;
        char *line;
        size_t len;

        while (sent < size) {
            ssize_t n = write(sv[1], data + sent, size - sent);
            if (n <= 0)
                break;
            sent += (size_t)n;
        }
        if (sent == size && !shut) {
            shutdown(sv[1], SHUT_WR);
            shut = true;
        }
        got = wp_reader_fill(&r, sv[0]);
        FZ_CHECK(got >= 0 || got == -EAGAIN, "wp_reader_fill: %d", got);
        while ((more = wp_reader_next(&r, &line, &len)) == 1) {
            cJSON *msg = NULL;
            wd_error err = {0};
            int rc = wp_parse(line, len, &msg, &err);

            yielded += len + 1;
            FZ_CHECK(yielded <= sent, "the reader gave %zu bytes of %zu", yielded, sent);
            FZ_CHECK(line[len] == '\0', "a line must be NUL-terminated");
            if (rc == 0) {
                FZ_CHECK(cJSON_IsObject(msg), "wp_parse gave a non-object");
                handle(msg);
                cJSON_Delete(msg);
            } else {
                FZ_CHECK(rc == -EBADMSG && err.code == -EBADMSG && msg == NULL, "wp_parse: rc %d", rc);
                fz_check_msg(err.msg, sizeof err.msg);
            }
        }
        FZ_CHECK(more == 0 || more == -EMSGSIZE, "wp_reader_next: %d", more);
        if (got == 0 || more < 0)
            break;
    }
    wp_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    return 0;
}
