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
    size_t offset;
} opt_desc;

static const opt_desc options[] = {
#define X(name, type, def, meta, help) {#name, def, meta, help, OPT_##type, offsetof(wd_config, name)},
    WD_OPTION_TABLE(X)
#undef X
};
#define N_OPTIONS (sizeof options / sizeof options[0])

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

static int set_option(wd_config *c, const opt_desc *o, const char *value, const char *source, wd_error *err)
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
        if ((rc = set_option(c, o, value, where, err)))
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

/* Checks that span the values themselves: known names and well-formed
 * allocator configurations, so that a typo is a usage error at once. */
static int validate(const wd_config *c, wd_error *err)
{
    static const char *const backends[] = {"host", "fake", "cuda", "cuda-ipc"};
    wa_config conf;
    size_t i;
    int rc;

    for (i = 0; i < sizeof backends / sizeof backends[0]; i++)
        if (strcmp(c->backend, backends[i]) == 0)
            break;
    if (i == sizeof backends / sizeof backends[0])
        return wd_error_set(err, -EINVAL, "unknown backend \"%s\" (host, fake, cuda or cuda-ipc)", c->backend);
    if (c->host_capacity == 0)
        return wd_error_set(err, -EINVAL, "host_capacity must be more than 0");
    if (c->staging_memory && c->staging_memory < (4u << 20))
        return wd_error_set(err, -EINVAL, "staging_memory: 0 (4MiB a buffer) or at least 4MiB");
    if (c->devices[0] && (strcmp(c->backend, "host") == 0 || strcmp(c->backend, "fake") == 0))
        return wd_error_set(err, -EINVAL, "--devices picks GPUs for the cuda backends; the %s backend takes "
                            "--host-devices", c->backend);
    if ((rc = wa_config_parse(c->alloc_conf, NULL, WA_CONF_OVERLAY, &conf, err))) {
        wd_error_prefix(err, "alloc_conf");
        return rc;
    }
    if ((rc = wa_config_parse(c->load_alloc_conf, NULL, WA_CONF_OVERLAY, &conf, err))) {
        wd_error_prefix(err, "load_alloc_conf");
        return rc;
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
               "# environment and --name on the command line win over this file.\n"
               "# Written by `weightd --print-config` (weightd %s) from its option table.\n",
            WD_VERSION);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const opt_desc *o = &options[i];
        flag_name(o, flag, sizeof flag);
        env_name(o, env, sizeof env);
        snprintf(text, sizeof text, "%s %s (%s, %s): %s", o->name, o->meta, flag, env, o->help);
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
               "wins over the environment, which wins over the file.\n\n");
    for (size_t i = 0; i < N_OPTIONS; i++) {
        char flag[64], left[96];
        flag_name(&options[i], flag, sizeof flag);
        snprintf(left, sizeof left, "%s %s", flag, options[i].meta);
        fprintf(f, "  %-28s %s", left, options[i].help);
        if (options[i].def[0])
            fprintf(f, " [%s]", options[i].def);
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
}

int wd_config_load(wd_config *c, int argc, char **argv, FILE *out, wd_error *err)
{
    const char *config_path = NULL;
    char name[64];
    int rc = 0;

    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < N_OPTIONS; i++)
        if ((rc = set_option(c, &options[i], options[i].def, "default", err)))
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
    if (!config_path)
        config_path = getenv("WEIGHTD_CONFIG");
    if (config_path && *config_path) {
        if ((rc = set_option(c, find_option("config", 6), config_path, "--config", err)) ||
            (rc = load_file(c, config_path, err)))
            goto fail;
    }
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const char *v;
        if (strcmp(options[i].name, "config") == 0)
            continue;
        env_name(&options[i], name, sizeof name);
        if ((v = getenv(name)) && *v && (rc = set_option(c, &options[i], v, name, err)))
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
        if (strcmp(o->name, "config") != 0 && (rc = set_option(c, o, value, name, err)))
            goto fail;
    }
    if ((rc = validate(c, err)))
        goto fail;
    return 0;
fail:
    wd_config_free(c);
    return rc;
}
