/* The models the daemon holds. */
#include "daemon/daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int wd_model_name_check(const char *name, wd_error *err)
{
    size_t n = strlen(name);

    if (n == 0 || n > WD_MODEL_NAME_MAX)
        return wd_error_set(err, -EINVAL, "a model name has 1 to %d characters", WD_MODEL_NAME_MAX);
    if (name[0] == '.' || name[0] == '-')
        return wd_error_set(err, -EINVAL, "model name \"%s\" may not start with '.' or '-'", name);
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '-'))
            return wd_error_set(err, -EINVAL, "model name \"%s\": only letters, digits, '.', '_' and '-' are allowed",
                                name);
    }
    return 0;
}

wd_model *wd_registry_find(wd_server *s, const char *name)
{
    for (wd_model *m = s->models; m; m = m->next)
        if (strcmp(m->name, name) == 0)
            return m;
    return NULL;
}

size_t wd_registry_count(const wd_server *s)
{
    size_t n = 0;

    for (const wd_model *m = s->models; m; m = m->next)
        n++;
    return n;
}

int wd_registry_add(wd_server *s, const char *name, const char *path, const int *devices, size_t n_devices,
                    wl_placement placement, wd_model **out, wd_error *err)
{
    wd_model *m, **tail;
    int rc;

    if ((rc = wd_model_name_check(name, err)))
        return rc;
    if (wd_registry_find(s, name))
        return wd_error_set(err, -EEXIST, "a model named \"%s\" is already loaded (unload it or choose another --name)",
                            name);
    if (!(m = calloc(1, sizeof *m)) || !(m->name = strdup(name)) || !(m->path = strdup(path)) ||
        !(m->devices = malloc(n_devices * sizeof *m->devices))) {
        if (m) {
            free(m->name);
            free(m->path);
        }
        free(m);
        return wd_error_set(err, -ENOMEM, "out of memory");
    }
    memcpy(m->devices, devices, n_devices * sizeof *devices);
    m->n_devices = n_devices;
    m->placement = placement;
    m->state = WD_MODEL_LOADING;
    /* Keep arrival order so that list shows models as they came. */
    for (tail = &s->models; *tail; tail = &(*tail)->next)
        ;
    *tail = m;
    *out = m;
    return 0;
}

void wd_registry_remove(wd_server *s, wd_model *m, bool give_back)
{
    for (wd_model **link = &s->models; *link; link = &(*link)->next)
        if (*link == m) {
            *link = m->next;
            break;
        }
    for (size_t i = 0; m->blocks && i < m->n_dest; i++)
        wa_free(s->alloc, m->blocks[i]);
    for (size_t i = 0; give_back && i < m->n_devices; i++)
        wa_empty_cache(s->alloc, m->devices[i]);
    wl_checkpoint_close(&m->ckpt);
    free(m->blocks);
    free(m->dest);
    free(m->devices);
    free(m->name);
    free(m->path);
    free(m);
}

const char *wd_model_devices_text(const wd_model *m, char *buf, size_t len)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < m->n_devices && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%d", i ? "," : "", m->devices[i]);
    return buf;
}

cJSON *wd_model_devices_json(const wd_model *m)
{
    cJSON *a = cJSON_CreateArray();

    for (size_t i = 0; i < m->n_devices; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(m->devices[i]));
    return a;
}
