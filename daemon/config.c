/* The daemon's options: one table (daemon.h) drives the defaults, the config
 * file, the environment, the command line and --help. */
#include "daemon/daemon.h"

#include <ctype.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/size.h"

typedef enum opt_type { OPT_STRING, OPT_INT, OPT_SIZE, OPT_LEVEL, OPT_BOOL } opt_type;

typedef struct opt_desc {
    const char *name, *def, *meta, *help;
    opt_type type;
    bool live;
    size_t offset;
} opt_desc;

#define OPT_WHEN_LIVE true
#define OPT_WHEN_RESTART false

/* In the table's order: options[id] is option id's. */
static const opt_desc options[] = {
#define X(name, type, def, meta, when, help) \
    {#name, def, meta, help, OPT_##type, OPT_WHEN_##when, offsetof(wd_config, name)},
    WD_OPTION_TABLE(X)
#undef X
};
#define N_OPTIONS (sizeof options / sizeof options[0])

static size_t option_id(const opt_desc *o)
{
    return (size_t)(o - options);
}

const char *wd_option_name(wd_option_id id)
{
    return options[id].name;
}

bool wd_option_live(wd_option_id id)
{
    return options[id].live;
}

/* Integer bounds, by name; options not listed take any non-negative value. */
static const struct {
    const char *name;
    int64_t min, max;
} int_bounds[] = {{"host_devices", 1, 64}, {"max_clients", 1, 65536}, {"read_threads", 0, 256}};

static const opt_desc *find_option(const char *name, size_t len)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const char *n = options[i].name;
        size_t j;
        for (j = 0; j < len && n[j]; j++)
            if (!(n[j] == name[j] || (n[j] == '_' && name[j] == '-')))
                break;
        if (j == len && n[j] == '\0')
            return &options[i];
    }
    return NULL;
}

static void flag_name(const opt_desc *o, char *buf, size_t len)
{
    snprintf(buf, len, "--%s", o->name);
    for (char *p = buf; *p; p++)
        if (*p == '_')
            *p = '-';
}

static int parse_value(wd_config *c, const opt_desc *o, const char *value, const char *source, wd_error *err)
{
    void *field = (char *)c + o->offset;

    switch (o->type) {
    case OPT_STRING: {
        char *copy = strdup(value);
        if (!copy)
            return wd_error_set(err, -ENOMEM, "out of memory");
        free(*(char **)field);
        *(char **)field = copy;
        return 0;
    }
    case OPT_INT: {
        char *end;
        long long v;
        int64_t min = 0, max = INT64_MAX;
        for (size_t i = 0; i < sizeof int_bounds / sizeof int_bounds[0]; i++)
            if (strcmp(int_bounds[i].name, o->name) == 0) {
                min = int_bounds[i].min;
                max = int_bounds[i].max;
            }
        errno = 0;
        v = strtoll(value, &end, 10);
        if (errno || end == value || *end || v < min || v > max)
            return wd_error_set(err, -EINVAL, "%s: %s must be a whole number from %lld to %lld, not \"%s\"", source,
                                o->name, (long long)min, (long long)max, value);
        *(int64_t *)field = v;
        return 0;
    }
    case OPT_SIZE:
        if (wd_size_parse(value, (uint64_t *)field))
            return wd_error_set(err, -EINVAL, "%s: %s must be a size such as 8GiB or 512M, not \"%s\"", source,
                                o->name, value);
        return 0;
    case OPT_BOOL: {
        static const char *const yes[] = {"on", "yes", "true", "1"}, *const no[] = {"off", "no", "false", "0"};
        for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++)
            if (strcasecmp(value, yes[i]) == 0 || strcasecmp(value, no[i]) == 0) {
                *(bool *)field = strcasecmp(value, yes[i]) == 0;
                return 0;
            }
        return wd_error_set(err, -EINVAL, "%s: %s must be on or off, not \"%s\"", source, o->name, value);
    }
    case OPT_LEVEL:
        if (wd_log_level_parse(value, (wd_log_level *)field))
            return wd_error_set(err, -EINVAL, "%s: %s must be error, warning, notice, info or debug, not \"%s\"",
                                source, o->name, value);
        return 0;
    }
    return -EINVAL;
}

/* Sets o from value, and remembers where it came from (line: the config
 * file's, for WD_ORIGIN_FILE). */
static int set_option(wd_config *c, const opt_desc *o, const char *value, wd_option_origin origin, unsigned line,
                      const char *source, wd_error *err)
{
    int rc = parse_value(c, o, value, source, err);

    if (rc == 0) {
        c->origin[option_id(o)] = origin;
        c->line[option_id(o)] = line;
    }
    return rc;
}

static char *trim(char *s)
{
    char *e;

    while (isspace((unsigned char)*s))
        s++;
    e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

/* Lines of "key = value"; '#' starts a comment; keys as in the table, with
 * '-' or '_'. */
static int load_file(wd_config *c, const char *path, wd_error *err)
{
    FILE *f = fopen(path, "re");
    char line[4096], where[512];
    unsigned lineno = 0;
    int rc = 0;

    if (!f)
        return wd_error_set(err, -errno, "config file %s: %s", path, strerror(errno));
    while (fgets(line, sizeof line, f)) {
        char *hash, *eq, *key, *value;
        const opt_desc *o;
        lineno++;
        snprintf(where, sizeof where, "%s:%u", path, lineno);
        if (!strchr(line, '\n') && !feof(f)) {
            rc = wd_error_set(err, -EINVAL, "%s: line too long", where);
            break;
        }
        if ((hash = strchr(line, '#')))
            *hash = '\0';
        key = trim(line);
        if (!*key)
            continue;
        if (!(eq = strchr(key, '='))) {
            rc = wd_error_set(err, -EINVAL, "%s: expected \"key = value\"", where);
            break;
        }
        *eq = '\0';
        key = trim(key);
        value = trim(eq + 1);
        if (!(o = find_option(key, strlen(key))) || strcmp(o->name, "config") == 0) {
            rc = wd_error_set(err, -EINVAL, "%s: unknown option \"%s\"", where, key);
            break;
        }
        if ((rc = set_option(c, o, value, WD_ORIGIN_FILE, lineno, where, err)))
            break;
    }
    if (!rc && ferror(f))
        rc = wd_error_set(err, -EIO, "config file %s: read error", path);
    fclose(f);
    return rc;
}

static void env_name(const opt_desc *o, char *buf, size_t len)
{
    snprintf(buf, len, "WEIGHTD_%s", o->name);
    for (char *p = buf; *p; p++)
        *p = (char)toupper((unsigned char)*p);
}

const char *wd_config_origin(const wd_config *c, wd_option_id id, char *buf, size_t len)
{
    switch (c->origin[id]) {
    case WD_ORIGIN_FILE:
        snprintf(buf, len, "%s:%u", c->config, c->line[id]);
        break;
    case WD_ORIGIN_ENVIRONMENT:
        env_name(&options[id], buf, len);
        break;
    case WD_ORIGIN_COMMAND_LINE:
        flag_name(&options[id], buf, len);
        break;
    default:
        snprintf(buf, len, "the default");
        break;
    }
    return buf;
}

int wd_config_error_origin(const wd_config *c, wd_option_id id, wd_error *err)
{
    char where[600];

    if (c->origin[id] != WD_ORIGIN_DEFAULT)
        wd_error_prefix(err, "%s", wd_config_origin(c, id, where, sizeof where));
    return err->code;
}

/* Checks that span the values themselves: known names and well-formed
 * allocator configurations, so that a typo is a usage error at once. */
static int validate(const wd_config *c, wd_error *err)
{
    static const char *const backends[] = {"host", "fake", "cuda", "cuda-ipc"};
    wa_config conf;
    size_t i;

    for (i = 0; i < sizeof backends / sizeof backends[0]; i++)
        if (strcmp(c->backend, backends[i]) == 0)
            break;
    if (i == sizeof backends / sizeof backends[0]) {
        wd_error_set(err, -EINVAL, "unknown backend \"%s\" (host, fake, cuda or cuda-ipc)", c->backend);
        return wd_config_error_origin(c, WD_OPT_backend, err);
    }
    if (c->host_capacity == 0) {
        wd_error_set(err, -EINVAL, "host_capacity must be more than 0");
        return wd_config_error_origin(c, WD_OPT_host_capacity, err);
    }
    if (c->staging_memory && c->staging_memory < (4u << 20)) {
        wd_error_set(err, -EINVAL, "staging_memory: 0 (4MiB a buffer) or at least 4MiB");
        return wd_config_error_origin(c, WD_OPT_staging_memory, err);
    }
    if (c->devices[0] && (strcmp(c->backend, "host") == 0 || strcmp(c->backend, "fake") == 0)) {
        wd_error_set(err, -EINVAL, "--devices picks GPUs for the cuda backends; the %s backend takes "
                     "--host-devices", c->backend);
        return wd_config_error_origin(c, WD_OPT_devices, err);
    }
    if (wa_config_parse(c->alloc_conf, NULL, WA_CONF_OVERLAY, &conf, err)) {
        wd_error_prefix(err, "alloc_conf");
        return wd_config_error_origin(c, WD_OPT_alloc_conf, err);
    }
    if (wa_config_parse(c->load_alloc_conf, NULL, WA_CONF_OVERLAY, &conf, err)) {
        wd_error_prefix(err, "load_alloc_conf");
        return wd_config_error_origin(c, WD_OPT_load_alloc_conf, err);
    }
    return 0;
}

/* Writes text as "# " comment lines of at most 79 columns, cut at spaces. */
static void comment_wrapped(FILE *f, const char *text)
{
    const size_t width = 79 - 2;

    while (*text) {
        size_t n = strlen(text), cut = n;
        if (n > width) {
            for (cut = width; cut > 0 && text[cut] != ' '; cut--)
                ;
            if (cut == 0) /* a word longer than the line: cut after it */
                cut = strcspn(text, " ");
        }
        fprintf(f, "# %.*s\n", (int)cut, text);
        text += cut;
        while (*text == ' ')
            text++;
    }
}

int wd_config_template(FILE *f)
{
    char flag[64], env[64], text[1024];

    fprintf(f, "# weightd's configuration: \"name = value\" lines; '#' starts a comment.\n"
               "# Every option is listed at its default, commented out. WEIGHTD_NAME in the\n"
               "# environment and --name on the command line win over this file. Options\n"
               "# marked live take a new value on `systemctl reload weightd` (SIGHUP);\n"
               "# the others at the next start.\n"
               "# Written by `weightd --print-config` (weightd %s) from its option table.\n",
            WD_VERSION);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const opt_desc *o = &options[i];
        flag_name(o, flag, sizeof flag);
        env_name(o, env, sizeof env);
        snprintf(text, sizeof text, "%s %s (%s, %s%s): %s", o->name, o->meta, flag, env, o->live ? ", live" : "",
                 o->help);
        fputc('\n', f);
        comment_wrapped(f, text);
        if (strcmp(o->name, "config") == 0)
            fprintf(f, "# (Not read from a file: --config or WEIGHTD_CONFIG names this one.)\n");
        else
            fprintf(f, "#%s =%s%s\n", o->name, o->def[0] ? " " : "", o->def);
    }
    return fflush(f) || ferror(f) ? -EIO : 0;
}

void wd_config_usage(FILE *f)
{
    fprintf(f, "usage: weightd [OPTION...]\n\n"
               "The weightd daemon: loads safetensors checkpoints onto devices and serves them\n"
               "to workers over a Unix socket. Every option can also be set as WEIGHTD_NAME in\n"
               "the environment or as \"name = value\" in the --config file; the command line\n"
               "wins over the environment, which wins over the file. Options marked (live)\n"
               "take a new value from the file on SIGHUP (systemctl reload weightd); the\n"
               "others keep theirs until the next start.\n\n");
    for (size_t i = 0; i < N_OPTIONS; i++) {
        char flag[64], left[96];
        flag_name(&options[i], flag, sizeof flag);
        snprintf(left, sizeof left, "%s %s", flag, options[i].meta);
        fprintf(f, "  %-28s %s", left, options[i].help);
        if (options[i].def[0])
            fprintf(f, " [%s]", options[i].def);
        if (options[i].live)
            fputs(" (live)", f);
        fputc('\n', f);
    }
    fprintf(f, "  %-28s %s\n  %-28s %s\n  %-28s %s\n", "--print-config",
            "print a config file with every option at its default, commented out, and exit", "--help",
            "print this and exit", "--version", "print the version and exit");
}

void wd_config_free(wd_config *c)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (options[i].type == OPT_STRING) {
            char **field = (char **)((char *)c + options[i].offset);
            free(*field);
            *field = NULL;
        }
    for (int i = 0; c->argv && i < c->argc; i++)
        free(c->argv[i]);
    free(c->argv);
    c->argv = NULL;
    c->argc = 0;
}

/* c keeps its own copy of the command line, for a reload. */
static int copy_argv(wd_config *c, int argc, char **argv, wd_error *err)
{
    if (!(c->argv = calloc((size_t)argc + 1, sizeof *c->argv)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    for (c->argc = 0; c->argc < argc; c->argc++)
        if (!(c->argv[c->argc] = strdup(argv[c->argc])))
            return wd_error_set(err, -ENOMEM, "out of memory");
    return 0;
}

int wd_config_load(wd_config *c, int argc, char **argv, FILE *out, wd_error *err)
{
    const char *config_path = NULL;
    char name[64];
    int rc = 0;

    memset(c, 0, sizeof *c);
    if ((rc = copy_argv(c, argc, argv, err)))
        goto fail;
    for (size_t i = 0; i < N_OPTIONS; i++)
        if ((rc = set_option(c, &options[i], options[i].def, WD_ORIGIN_DEFAULT, 0, "default", err)))
            goto fail;
    /* --help, --version and --config first: the file is the lowest layer. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            wd_config_usage(out);
            wd_config_free(c);
            return 1;
        }
        if (strcmp(argv[i], "--print-config") == 0) {
            wd_config_free(c);
            if (wd_config_template(out))
                return wd_error_set(err, -EIO, "--print-config: cannot write the template");
            return 1;
        }
        if (strcmp(argv[i], "--version") == 0) {
            fprintf(out, "weightd %s (protocol %s; backends: %s)\n", WD_VERSION, WP_VERSION, wa_backend_names());
            wd_config_free(c);
            return 1;
        }
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            config_path = argv[i + 1];
        else if (strncmp(argv[i], "--config=", 9) == 0)
            config_path = argv[i] + 9;
    }
    if (config_path) {
        rc = set_option(c, &options[WD_OPT_config], config_path, WD_ORIGIN_COMMAND_LINE, 0, "--config", err);
    } else if ((config_path = getenv("WEIGHTD_CONFIG")) && *config_path) {
        rc = set_option(c, &options[WD_OPT_config], config_path, WD_ORIGIN_ENVIRONMENT, 0, "WEIGHTD_CONFIG", err);
    }
    if (rc || (config_path && *config_path && (rc = load_file(c, config_path, err))))
        goto fail;
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const char *v;
        if (i == WD_OPT_config)
            continue;
        env_name(&options[i], name, sizeof name);
        if ((v = getenv(name)) && *v && (rc = set_option(c, &options[i], v, WD_ORIGIN_ENVIRONMENT, 0, name, err)))
            goto fail;
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *eq, *value;
        const opt_desc *o;
        if (strncmp(arg, "--", 2) != 0) {
            rc = wd_error_set(err, -EINVAL, "unexpected argument \"%s\" (see weightd --help)", arg);
            goto fail;
        }
        arg += 2;
        eq = strchr(arg, '=');
        if (!(o = find_option(arg, eq ? (size_t)(eq - arg) : strlen(arg)))) {
            rc = wd_error_set(err, -EINVAL, "unknown option \"%s\" (see weightd --help)", argv[i]);
            goto fail;
        }
        if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            rc = wd_error_set(err, -EINVAL, "option \"%s\" needs a value", argv[i]);
            goto fail;
        }
        flag_name(o, name, sizeof name);
        if (o != &options[WD_OPT_config] &&
            (rc = set_option(c, o, value, WD_ORIGIN_COMMAND_LINE, 0, name, err)))
            goto fail;
    }
    if ((rc = validate(c, err)))
        goto fail;
    return 0;
fail:
    wd_config_free(c);
    return rc;
}

int wd_config_reload(const wd_config *running, wd_config *next, wd_error *err)
{
    /* The command line was read once already: it asks for no --help now. */
    int rc = wd_config_load(next, running->argc, running->argv, stderr, err);

    return rc == 1 ? wd_error_set(err, -EINVAL, "the command line asks for --help or --version") : rc;
}

/* ---- what a reload compares and moves ------------------------------------- */

static bool same_value(const wd_config *a, const wd_config *b, const opt_desc *o)
{
    const void *x = (const char *)a + o->offset, *y = (const char *)b + o->offset;

    switch (o->type) {
    case OPT_STRING:
        return strcmp(*(char *const *)x, *(char *const *)y) == 0;
    case OPT_INT:
        return *(const int64_t *)x == *(const int64_t *)y;
    case OPT_SIZE:
        return *(const uint64_t *)x == *(const uint64_t *)y;
    case OPT_LEVEL:
        return *(const wd_log_level *)x == *(const wd_log_level *)y;
    case OPT_BOOL:
        return *(const bool *)x == *(const bool *)y;
    }
    return false;
}

/* A size as exactly as it was written: 4GiB, 5G, or bytes. */
static void format_size(uint64_t v, char *buf, size_t len)
{
    static const struct {
        const char *unit;
        uint64_t scale;
    } units[] = {{"TiB", 1ULL << 40}, {"GiB", 1ULL << 30}, {"MiB", 1ULL << 20}, {"KiB", 1ULL << 10},
                 {"T", 1000000000000ULL}, {"G", 1000000000ULL}, {"M", 1000000ULL}, {"K", 1000ULL}};

    for (size_t i = 0; v && i < sizeof units / sizeof units[0]; i++)
        if (v % units[i].scale == 0) {
            snprintf(buf, len, "%llu%s", (unsigned long long)(v / units[i].scale), units[i].unit);
            return;
        }
    snprintf(buf, len, "%llu", (unsigned long long)v);
}

static void format_value(const wd_config *c, const opt_desc *o, char *buf, size_t len)
{
    const void *field = (const char *)c + o->offset;

    switch (o->type) {
    case OPT_STRING:
        snprintf(buf, len, "\"%s\"", *(char *const *)field);
        break;
    case OPT_INT:
        snprintf(buf, len, "%lld", (long long)*(const int64_t *)field);
        break;
    case OPT_SIZE:
        format_size(*(const uint64_t *)field, buf, len);
        break;
    case OPT_LEVEL:
        snprintf(buf, len, "%s", wd_log_level_name(*(const wd_log_level *)field));
        break;
    case OPT_BOOL:
        snprintf(buf, len, "%s", *(const bool *)field ? "on" : "off");
        break;
    }
}

size_t wd_config_diff(const wd_config *running, const wd_config *next, wd_option_change *changes)
{
    size_t n = 0;

    for (size_t i = 0; i < N_OPTIONS; i++) {
        if (same_value(running, next, &options[i]))
            continue;
        changes[n].id = (wd_option_id)i;
        changes[n].live = options[i].live;
        format_value(running, &options[i], changes[n].from, sizeof changes[n].from);
        format_value(next, &options[i], changes[n].to, sizeof changes[n].to);
        n++;
    }
    return n;
}

static size_t field_size(opt_type type)
{
    switch (type) {
    case OPT_STRING:
        return sizeof(char *);
    case OPT_INT:
        return sizeof(int64_t);
    case OPT_SIZE:
        return sizeof(uint64_t);
    case OPT_LEVEL:
        return sizeof(wd_log_level);
    case OPT_BOOL:
        return sizeof(bool);
    }
    return 0;
}

static void swap_bytes(void *a, void *b, size_t n)
{
    unsigned char tmp[sizeof(uint64_t)];

    memcpy(tmp, a, n);
    memcpy(a, b, n);
    memcpy(b, tmp, n);
}

void wd_config_take_live(wd_config *running, wd_config *next)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        if (!options[i].live)
            continue;
        /* A swap: a string's pointer changes owner, and the old one is freed with next. */
        swap_bytes((char *)running + options[i].offset, (char *)next + options[i].offset, field_size(options[i].type));
        swap_bytes(&running->origin[i], &next->origin[i], sizeof running->origin[i]);
        swap_bytes(&running->line[i], &next->line[i], sizeof running->line[i]);
    }
}

cJSON *wd_config_json(const wd_config *c, bool with_admins)
{
    cJSON *o = cJSON_CreateObject();

    for (size_t i = 0; o && i < N_OPTIONS; i++) {
        const void *field = (const char *)c + options[i].offset;
        if (!with_admins && (i == WD_OPT_admin_uids || i == WD_OPT_admin_groups))
            continue;
        switch (options[i].type) {
        case OPT_STRING:
            cJSON_AddStringToObject(o, options[i].name, *(char *const *)field);
            break;
        case OPT_INT:
            cJSON_AddNumberToObject(o, options[i].name, (double)*(const int64_t *)field);
            break;
        case OPT_SIZE:
            cJSON_AddNumberToObject(o, options[i].name, (double)*(const uint64_t *)field);
            break;
        case OPT_LEVEL:
            cJSON_AddStringToObject(o, options[i].name, wd_log_level_name(*(const wd_log_level *)field));
            break;
        case OPT_BOOL:
            cJSON_AddBoolToObject(o, options[i].name, *(const bool *)field);
            break;
        }
    }
    return o;
}
