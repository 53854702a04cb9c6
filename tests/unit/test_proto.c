/* Framing, descriptor passing and messages, over real socket pairs. */
#include "tests/unit/suites.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "proto/proto.h"

static void pair(int sv[2])
{
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

START_TEST(lines_split_across_reads_are_reassembled)
{
    int sv[2];
    wp_reader r;
    char *line;
    size_t len;

    pair(sv);
    wp_reader_init(&r);
    ck_assert_int_eq(write(sv[0], "{\"a\":", 5), 5);
    ck_assert_int_gt(wp_reader_fill(&r, sv[1]), 0);
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 0);
    ck_assert_int_eq(write(sv[0], "1}\n{\"b\":2}\n\n", 12), 12);
    ck_assert_int_gt(wp_reader_fill(&r, sv[1]), 0);
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 1);
    ck_assert_str_eq(line, "{\"a\":1}");
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 1);
    ck_assert_str_eq(line, "{\"b\":2}");
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 1);
    ck_assert_uint_eq(len, 0);
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 0);
    ck_assert_int_eq(wp_reader_fill(&r, sv[1]), -EAGAIN);
    close(sv[0]);
    ck_assert_int_eq(wp_reader_fill(&r, sv[1]), 0);
    wp_reader_free(&r);
    close(sv[1]);
}
END_TEST

START_TEST(a_line_over_the_limit_is_emsgsize)
{
    int sv[2], rc = 0;
    wp_reader r;
    char *chunk = malloc(65536), *line;
    size_t len, sent = 0;

    pair(sv);
    wp_reader_init(&r);
    memset(chunk, 'x', 65536);
    while (sent <= WP_MAX_LINE && rc == 0) {
        ssize_t n = write(sv[0], chunk, 65536);
        if (n > 0)
            sent += (size_t)n;
        while ((rc = wp_reader_fill(&r, sv[1])) > 0)
            if ((rc = wp_reader_next(&r, &line, &len)) != 0)
                break;
        if (rc == -EAGAIN)
            rc = 0;
    }
    ck_assert_int_eq(rc, -EMSGSIZE);
    free(chunk);
    wp_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

START_TEST(descriptors_travel_with_their_message)
{
    int sv[2], fd = memfd_create("t", MFD_CLOEXEC), got[4];
    wp_writer w;
    wp_reader r;
    char *line, buf[7] = {0};
    size_t len;

    pair(sv);
    ck_assert_int_eq(write(fd, "weight", 6), 6);
    wp_writer_init(&w);
    wp_reader_init(&r);
    ck_assert_int_eq(wp_writer_push(&w, "{\"x\":1}\n", 8, &fd, 1), 0);
    close(fd); /* the writer holds its own duplicate */
    ck_assert_int_eq(wp_writer_flush(&w, sv[0]), 0);
    ck_assert(wp_writer_empty(&w));
    ck_assert_int_gt(wp_reader_fill(&r, sv[1]), 0);
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 1);
    ck_assert_uint_eq(wp_reader_take_fds(&r, got, 4), 1);
    ck_assert_int_eq(pread(got[0], buf, 6, 0), 6);
    ck_assert_str_eq(buf, "weight");
    close(got[0]);
    wp_writer_free(&w);
    wp_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

/* As many descriptors as the kernel lets one message carry (SCM_MAX_FD),
 * twice in a row: each message's arrive with it, in order. */
START_TEST(a_message_carries_the_kernels_most_descriptors)
{
    int sv[2], fds[WP_MAX_FDS], got[WP_MAX_FDS];
    wp_writer w;
    wp_reader r;
    char *line;
    size_t len;

    pair(sv);
    for (int i = 0; i < WP_MAX_FDS; i++)
        ck_assert_int_ge(fds[i] = memfd_create("t", MFD_CLOEXEC), 0);
    ck_assert_int_eq(ftruncate(fds[7], 7), 0);
    wp_writer_init(&w);
    wp_reader_init(&r);
    ck_assert_int_eq(wp_writer_push(&w, "{\"a\":1}\n", 8, fds, WP_MAX_FDS), 0);
    ck_assert_int_eq(wp_writer_push(&w, "{\"b\":2}\n", 8, fds, 3), 0);
    ck_assert_int_eq(wp_writer_push(&w, "x\n", 2, fds, WP_MAX_FDS + 1), -EINVAL);
    ck_assert_int_eq(wp_writer_flush(&w, sv[0]), 0);
    for (int msg = 0; msg < 2; msg++) {
        size_t want = msg == 0 ? WP_MAX_FDS : 3;
        struct stat st;
        while (wp_reader_next(&r, &line, &len) != 1)
            ck_assert_int_gt(wp_reader_fill(&r, sv[1]), 0);
        ck_assert_str_eq(line, msg == 0 ? "{\"a\":1}" : "{\"b\":2}");
        ck_assert_uint_eq(wp_reader_take_fds(&r, got, want), want);
        ck_assert_int_eq(fstat(got[7 % want], &st), 0);
        ck_assert_int_eq(st.st_size, msg == 0 ? 7 : 0);
        for (size_t i = 0; i < want; i++)
            close(got[i]);
    }
    ck_assert_uint_eq(wp_reader_take_fds(&r, got, 1), 0);
    for (int i = 0; i < WP_MAX_FDS; i++)
        close(fds[i]);
    wp_writer_free(&w);
    wp_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

/* A line sent in pieces, each with descriptors, after other such lines, all
 * read at once: recvmsg glues a line's end to the next message, whose
 * descriptors then arrive with it. Descriptors of lines already read are
 * dropped, so a well-behaved peer never runs the reader out of room (the
 * live campaign found EMSGSIZE here), and a line gets its own message's. */
START_TEST(descriptors_of_earlier_lines_are_dropped)
{
    int sv[2], a[252], b[252], c[10], got[WP_MAX_FDS];
    wp_writer w;
    wp_reader r;
    char *line;
    size_t len;
    struct stat st;
    int rc;

    pair(sv);
    for (int i = 0; i < 252; i++) {
        ck_assert_int_ge(a[i] = memfd_create("a", MFD_CLOEXEC), 0);
        ck_assert_int_ge(b[i] = memfd_create("b", MFD_CLOEXEC), 0);
        ck_assert_int_eq(ftruncate(b[i], 2), 0);
    }
    for (int i = 0; i < 10; i++)
        ck_assert_int_ge(c[i] = memfd_create("c", MFD_CLOEXEC), 0);
    wp_writer_init(&w);
    wp_reader_init(&r);
    ck_assert_int_eq(wp_writer_push(&w, "{", 1, a, 252), 0);
    ck_assert_int_eq(wp_writer_push(&w, "\"a\":1}\n", 7, NULL, 0), 0);
    ck_assert_int_eq(wp_writer_push(&w, "{\"b\"", 4, b, 252), 0);
    ck_assert_int_eq(wp_writer_push(&w, ":2}\n", 4, NULL, 0), 0);
    ck_assert_int_eq(wp_writer_push(&w, "\n", 1, c, 10), 0);
    ck_assert_int_eq(wp_writer_flush(&w, sv[0]), 0);
    for (int i = 0; i < 252; i++)
        close(a[i]), close(b[i]);
    for (int i = 0; i < 10; i++)
        close(c[i]);

    const char *want[] = {"{\"a\":1}", "{\"b\":2}", ""};
    for (int n = 0; n < 3; n++) {
        while ((rc = wp_reader_next(&r, &line, &len)) == 0)
            ck_assert_int_gt(wp_reader_fill(&r, sv[1]), 0);
        ck_assert_int_eq(rc, 1);
        ck_assert_str_eq(line, want[n]);
        if (n == 1) {
            ck_assert_uint_eq(wp_reader_take_fds(&r, got, 252), 252);
            for (int i = 0; i < 252; i++) {
                ck_assert_int_eq(fstat(got[i], &st), 0);
                ck_assert_int_eq(st.st_size, 2); /* b's, not a's */
                close(got[i]);
            }
        }
    }
    ck_assert_int_eq(wp_reader_next(&r, &line, &len), 0);
    ck_assert_uint_eq(r.n_fds, 0); /* c's went with the empty line */
    wp_writer_free(&w);
    wp_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

START_TEST(writer_queues_when_the_peer_is_slow)
{
    int sv[2];
    wp_writer w;
    char *big = calloc(1, 1 << 20);
    int rc;

    pair(sv);
    wp_writer_init(&w);
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(wp_writer_push(&w, big, 1 << 20, NULL, 0), 0);
    rc = wp_writer_flush(&w, sv[0]);
    ck_assert_int_eq(rc, -EAGAIN);
    ck_assert(!wp_writer_empty(&w));
    ck_assert_uint_gt(w.queued, 0);
    close(sv[1]);
    while ((rc = wp_writer_flush(&w, sv[0])) == -EAGAIN)
        ;
    ck_assert_int_eq(rc, -EPIPE);
    wp_writer_free(&w);
    free(big);
    close(sv[0]);
}
END_TEST

START_TEST(parse_accepts_objects_only)
{
    cJSON *m = NULL;
    wd_error err = {0};

    ck_assert_int_eq(wp_parse("{\"id\":1}  ", 10, &m, &err), 0);
    cJSON_Delete(m);
    ck_assert_int_eq(wp_parse("[1,2]", 5, &m, &err), -EBADMSG);
    ck_assert_int_eq(wp_parse("{\"a\":1} x", 9, &m, &err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err.msg, "trailing"));
    ck_assert_int_eq(wp_parse("{\"a\":", 5, &m, &err), -EBADMSG);
    ck_assert_int_eq(wp_parse("{\"a\":\"\0\"}", 9, &m, &err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err.msg, "NUL"));
}
END_TEST

START_TEST(replies_echo_ids_and_carry_error_codes)
{
    cJSON *id = cJSON_CreateString("req-7"), *rep = wp_reply_error(id, -ENOENT, "no model named \"x\"");
    size_t len;
    char *line = wp_encode(rep, &len);

    ck_assert_str_eq(line, "{\"id\":\"req-7\",\"ok\":false,\"error\":{\"code\":\"ENOENT\",\"message\":\"no model named "
                           "\\\"x\\\"\"}}\n");
    ck_assert_uint_eq(len, strlen(line));
    free(line);
    cJSON_Delete(rep);
    rep = wp_reply_ok(NULL, NULL);
    line = wp_encode(rep, &len);
    ck_assert_str_eq(line, "{\"id\":null,\"ok\":true,\"result\":{}}\n");
    free(line);
    cJSON_Delete(rep);
    cJSON_Delete(id);
}
END_TEST

START_TEST(typed_arguments_reject_wrong_types)
{
    cJSON *args = cJSON_Parse("{\"s\":\"x\",\"n\":3,\"f\":1.5,\"b\":true,\"big\":1e300}");
    const char *s;
    int64_t n;
    bool b;
    wd_error err = {0};

    ck_assert_int_eq(wp_arg_string(args, "s", true, &s, &err), 0);
    ck_assert_int_eq(wp_arg_string(args, "n", true, &s, &err), -EINVAL);
    ck_assert_int_eq(wp_arg_string(args, "missing", false, &s, &err), -ENOENT);
    ck_assert_int_eq(wp_arg_string(args, "missing", true, &s, &err), -EINVAL);
    ck_assert_int_eq(wp_arg_int(args, "n", true, 0, 10, &n, &err), 0);
    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(wp_arg_int(args, "n", true, 0, 2, &n, &err), -EINVAL);
    ck_assert_int_eq(wp_arg_int(args, "f", true, 0, 10, &n, &err), -EINVAL);
    ck_assert_int_eq(wp_arg_int(args, "big", true, 0, INT64_MAX, &n, &err), -EINVAL);
    ck_assert_int_eq(wp_arg_bool(args, "b", &b, &err), 0);
    ck_assert(b);
    ck_assert_int_eq(wp_arg_bool(args, "s", &b, &err), -EINVAL);
    cJSON_Delete(args);
}
END_TEST

START_TEST(default_socket_follows_the_environment)
{
    char buf[108];

    setenv("WEIGHTD_SOCKET", "/tmp/x.sock", 1);
    ck_assert_str_eq(wp_default_socket(buf, sizeof buf), "/tmp/x.sock");
    unsetenv("WEIGHTD_SOCKET");
    if (geteuid() == 0) {
        ck_assert_str_eq(wp_default_socket(buf, sizeof buf), "/run/weightd/weightd.sock");
    } else {
        setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
        ck_assert_str_eq(wp_default_socket(buf, sizeof buf), "/run/user/1000/weightd.sock");
    }
}
END_TEST

Suite *proto_suite(void)
{
    Suite *s = suite_create("proto");
    TCase *tc = tcase_create("proto");

    tcase_add_test(tc, lines_split_across_reads_are_reassembled);
    tcase_add_test(tc, a_line_over_the_limit_is_emsgsize);
    tcase_add_test(tc, descriptors_travel_with_their_message);
    tcase_add_test(tc, a_message_carries_the_kernels_most_descriptors);
    tcase_add_test(tc, descriptors_of_earlier_lines_are_dropped);
    tcase_add_test(tc, writer_queues_when_the_peer_is_slow);
    tcase_add_test(tc, parse_accepts_objects_only);
    tcase_add_test(tc, replies_echo_ids_and_carry_error_codes);
    tcase_add_test(tc, typed_arguments_reject_wrong_types);
    tcase_add_test(tc, default_socket_follows_the_environment);
    suite_add_tcase(s, tc);
    return s;
}
