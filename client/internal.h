/* What the files of libweightd-client share; not installed. */
#ifndef WDC_INTERNAL_H
#define WDC_INTERNAL_H

#include <stdint.h>

#include <cjson/cJSON.h>

#include "client/weightd-client.h"
#include "proto/proto.h"

struct wdc_client {
    int fd;
    wp_reader rd;
    wp_writer wr;
    int64_t next_id;
    char path[108];
    char code[32];
    char message[1024];
    char *server_info;
    wdc_event_fn on_notice;   /* events that name no request (revoke) */
    void *notice_ctx;
    char **notices;           /* those read and not yet handed to on_notice (wdc_poll does) */
    size_t n_notices, cap_notices;
    int64_t waited_us;        /* time blocked in poll(), for attach's figures */
    wdc_attachment *attachments; /* its live attachments, which answer sleep and wake themselves */
};

/* Sets the last error (its code's name and the message) and returns code. */
int wdc__fail(wdc_client *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Sends {"id", "op", "args"} (consumes args); *id is the request's id. */
int wdc__send_request(wdc_client *c, const char *op, cJSON *args, int timeout_ms, int64_t *id);
/* The next message about request id: one of its events or its reply
 * (*raw is its text, valid until the next read). Events that name no
 * request go to the notice handler on the way. */
int wdc__next_for(wdc_client *c, int64_t id, int timeout_ms, cJSON **msg, char **raw);
/* A reply's result (0), or its error as the call's error. */
int wdc__reply_result(wdc_client *c, const cJSON *msg, const cJSON **result);
int wdc__read_message(wdc_client *c, int timeout_ms, cJSON **msg, char **raw);
/* An event that names no request, just read (its descriptors still in the
 * reader): sleep and wake of one of c's attachments are handled here,
 * before the notice handler hears of them. */
void wdc__lease_event(wdc_client *c, const cJSON *msg);
/* c is closing: its attachments stay mapped, but answer nothing more. */
void wdc__forget_attachments(wdc_client *c);
/* Closes the connection and forgets what was read and queued on it. */
void wdc__disconnect(wdc_client *c);

#endif
