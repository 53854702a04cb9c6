/* Protocol messages: parsing, encoding, builders and typed arguments. */
#include "proto/proto.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Whether the JSON text holds the escape \u0000 (a NUL in a string, which
 * C strings would cut short: "list\u0000x" would run list). A backslash
 * counts when an even number of backslashes comes before it. */
static bool has_nul_escape(const char *s, size_t len)
{
    for (size_t i = 0; i + 6 <= len; i++) {
        size_t k = i;
        if (s[i] != '\\' || s[i + 1] != 'u' || s[i + 2] != '0' || s[i + 3] != '0' || s[i + 4] != '0' ||
            s[i + 5] != '0')
            continue;
        while (k > 0 && s[k - 1] == '\\')
            k--;
        if ((i - k) % 2 == 0)
            return true;
    }
    return false;
}

int wp_parse(const char *line, size_t len, cJSON **out, wd_error *err)
{
    const char *end = NULL;
    cJSON *msg;
    size_t bad;

    if (memchr(line, '\0', len))
        return wd_error_set(err, -EBADMSG, "message contains a NUL byte");
    /* JSON is UTF-8: raw bytes outside it would travel on into replies,
     * logs and other clients' decoders. */
    if ((bad = wd_utf8_check(line, len)) < len)
        return wd_error_set(err, -EBADMSG, "message is not valid UTF-8 (byte %zu)", bad);
    if (memchr(line, '\\', len) && has_nul_escape(line, len))
        return wd_error_set(err, -EBADMSG, "a string holds a NUL character (\\u0000)");
    msg = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (!msg)
        /* end, not cJSON_GetErrorPtr(): that is one global for every thread. */
        return wd_error_set(err, -EBADMSG, "malformed JSON near byte %zu",
                            end && end >= line ? (size_t)(end - line) : (size_t)0);
    while (end && end < line + len && (*end == ' ' || *end == '\t' || *end == '\r'))
        end++;
    if (end && end < line + len) {
        cJSON_Delete(msg);
        return wd_error_set(err, -EBADMSG, "trailing bytes after the JSON object");
    }
    if (!cJSON_IsObject(msg)) {
        cJSON_Delete(msg);
        return wd_error_set(err, -EBADMSG, "a message must be a JSON object");
    }
    *out = msg;
    return 0;
}

char *wp_encode(const cJSON *msg, size_t *len)
{
    char *text = cJSON_PrintUnformatted(msg), *line;
    size_t n;

    if (!text)
        return NULL;
    n = strlen(text);
    if (!(line = realloc(text, n + 2))) {
        free(text);
        return NULL;
    }
    line[n] = '\n';
    line[n + 1] = '\0';
    *len = n + 1;
    return line;
}

static void add_id(cJSON *msg, const cJSON *id)
{
    cJSON *copy = id ? cJSON_Duplicate(id, 1) : cJSON_CreateNull();
    if (copy)
        cJSON_AddItemToObject(msg, "id", copy);
}

cJSON *wp_request_new(int64_t id, const char *op, cJSON *args)
{
    cJSON *msg = cJSON_CreateObject();

    if (!msg) {
        cJSON_Delete(args);
        return NULL;
    }
    cJSON_AddNumberToObject(msg, "id", (double)id);
    cJSON_AddStringToObject(msg, "op", op);
    cJSON_AddItemToObject(msg, "args", args ? args : cJSON_CreateObject());
    return msg;
}

cJSON *wp_reply_ok(const cJSON *id, cJSON *result)
{
    cJSON *msg = cJSON_CreateObject();

    if (!msg) {
        cJSON_Delete(result);
        return NULL;
    }
    add_id(msg, id);
    cJSON_AddBoolToObject(msg, "ok", 1);
    cJSON_AddItemToObject(msg, "result", result ? result : cJSON_CreateObject());
    return msg;
}

cJSON *wp_reply_error(const cJSON *id, int code, const char *message)
{
    cJSON *msg = cJSON_CreateObject(), *e;

    if (!msg)
        return NULL;
    add_id(msg, id);
    cJSON_AddBoolToObject(msg, "ok", 0);
    e = cJSON_AddObjectToObject(msg, "error");
    cJSON_AddStringToObject(e, "code", wd_errname(code));
    cJSON_AddStringToObject(e, "message", message && *message ? message : wd_strerror(code));
    return msg;
}

cJSON *wp_event_new(const cJSON *id, const char *event)
{
    cJSON *msg = cJSON_CreateObject();

    if (!msg)
        return NULL;
    cJSON_AddStringToObject(msg, "event", event);
    add_id(msg, id);
    return msg;
}

int wp_arg_string(const cJSON *args, const char *key, bool required, const char **out, wd_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, key);

    if (!v || cJSON_IsNull(v))
        return required ? wd_error_set(err, -EINVAL, "argument \"%s\" is required", key) : -ENOENT;
    if (!cJSON_IsString(v))
        return wd_error_set(err, -EINVAL, "argument \"%s\" must be a string", key);
    *out = v->valuestring;
    return 0;
}

int wp_int_value(const cJSON *v, const char *what, int64_t min, int64_t max, int64_t *out, wd_error *err)
{
    double d;

    if (!cJSON_IsNumber(v))
        return wd_error_set(err, -EINVAL, "%s must be a number", what);
    d = v->valuedouble;
    if (!isfinite(d) || d != floor(d))
        return wd_error_set(err, -EINVAL, "%s must be a whole number", what);
    /* Past 2^53 a double no longer holds every whole number: the bounds
     * below could not be checked exactly. */
    if (fabs(d) > 9007199254740992.0 || d < (double)min || d > (double)max)
        return wd_error_set(err, -EINVAL, "%s must be between %lld and %lld", what, (long long)min, (long long)max);
    *out = (int64_t)d;
    return 0;
}

int wp_arg_int(const cJSON *args, const char *key, bool required, int64_t min, int64_t max, int64_t *out,
               wd_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, key);
    char what[96];

    if (!v || cJSON_IsNull(v))
        return required ? wd_error_set(err, -EINVAL, "argument \"%s\" is required", key) : -ENOENT;
    snprintf(what, sizeof what, "argument \"%.80s\"", key);
    return wp_int_value(v, what, min, max, out, err);
}

int wp_arg_bool(const cJSON *args, const char *key, bool *out, wd_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, key);

    if (!v || cJSON_IsNull(v))
        return -ENOENT;
    if (!cJSON_IsBool(v))
        return wd_error_set(err, -EINVAL, "argument \"%s\" must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

const char *wp_default_socket(char *buf, size_t len)
{
    const char *env = getenv("WEIGHTD_SOCKET"), *xdg;

    if (env && *env)
        snprintf(buf, len, "%s", env);
    else if (geteuid() == 0)
        snprintf(buf, len, "/run/weightd/weightd.sock");
    else if ((xdg = getenv("XDG_RUNTIME_DIR")) && *xdg)
        snprintf(buf, len, "%s/weightd.sock", xdg);
    else
        snprintf(buf, len, "/tmp/weightd-%u.sock", (unsigned)geteuid());
    return buf;
}
