/* weightd-mkckpt: writes a synthetic checkpoint in the shapes of a public
 * model. The work is in ckpt_writer.c; this is arguments and output. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/errors.h"
#include "common/size.h"
#include "loader/ckpt_writer.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: weightd-mkckpt --preset NAME --out DIR [options]\n"
            "\n"
            "Writes DIR/model-0000i-of-0000K.safetensors and model.safetensors.index.json\n"
            "with the tensor names, dtypes and shapes of a public model and reproducible\n"
            "pseudo-random contents.\n"
            "\n"
            "  --preset NAME       the model (see below)\n"
            "  --out DIR           output folder (created if missing)\n"
            "  --layers N          layers (default: the model's)\n"
            "  --experts N         experts per layer (default: the model's)\n"
            "  --vocab N           vocabulary size (default: the model's)\n"
            "  --seed N            contents seed (default 0)\n"
            "  --shard-size SIZE   largest shard, e.g. 5GB, 512MiB (default 5GB)\n"
            "  --sparse            leave the data as holes (zeros): headers and sizes only\n"
            "  --force             replace the checkpoint files already in DIR\n"
            "  --quiet             print nothing but errors\n"
            "  --help              this text\n"
            "\n"
            "presets:\n");
    for (size_t i = 0; i < wl_n_presets; i++)
        fprintf(f, "  %-14s %s: %u layers, %u experts, vocab %llu\n", wl_presets[i].name,
                wl_presets[i].model, wl_presets[i].layers, wl_presets[i].experts,
                (unsigned long long)wl_presets[i].vocab);
}

/* A whole decimal number in [min, max]. */
static int parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    if (!s || !*s || *s == '-' || *s == '+')
        goto bad;
    v = strtoull(s, &end, 10);
    if (errno || *end || v < min || v > max)
        goto bad;
    *out = v;
    return 0;
bad:
    fprintf(stderr, "weightd-mkckpt: %s: '%s' is not a whole number in [%llu, %llu]\n", opt,
            s ? s : "", (unsigned long long)min, (unsigned long long)max);
    return -EINVAL;
}

int main(int argc, char **argv)
{
    enum { OPT_PRESET = 256, OPT_OUT, OPT_LAYERS, OPT_EXPERTS, OPT_VOCAB, OPT_SEED, OPT_SHARD,
           OPT_SPARSE, OPT_FORCE, OPT_QUIET, OPT_HELP };
    static const struct option longopts[] = {
        {"preset", required_argument, NULL, OPT_PRESET},
        {"out", required_argument, NULL, OPT_OUT},
        {"layers", required_argument, NULL, OPT_LAYERS},
        {"experts", required_argument, NULL, OPT_EXPERTS},
        {"vocab", required_argument, NULL, OPT_VOCAB},
        {"seed", required_argument, NULL, OPT_SEED},
        {"shard-size", required_argument, NULL, OPT_SHARD},
        {"sparse", no_argument, NULL, OPT_SPARSE},
        {"force", no_argument, NULL, OPT_FORCE},
        {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    wl_ckpt_options o = {0};
    wd_error err = {0};
    const char *preset = NULL;
    uint64_t v;
    int c, quiet = 0;

    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_PRESET:
            preset = optarg;
            break;
        case OPT_OUT:
            o.out_dir = optarg;
            break;
        case OPT_LAYERS:
            if (parse_u64("--layers", optarg, 1, 1000000, &v) < 0)
                return 2;
            o.layers = (unsigned)v;
            break;
        case OPT_EXPERTS:
            if (parse_u64("--experts", optarg, 1, 1000000, &v) < 0)
                return 2;
            o.experts = (unsigned)v;
            break;
        case OPT_VOCAB:
            if (parse_u64("--vocab", optarg, 1, UINT32_MAX, &v) < 0)
                return 2;
            o.vocab = v;
            break;
        case OPT_SEED:
            if (parse_u64("--seed", optarg, 0, UINT64_MAX, &o.seed) < 0)
                return 2;
            break;
        case OPT_SHARD:
            if (wd_size_parse(optarg, &o.shard_size) < 0 || o.shard_size == 0) {
                fprintf(stderr, "weightd-mkckpt: --shard-size: '%s' is not a size above 0 "
                        "(e.g. 5GB, 512MiB)\n", optarg);
                return 2;
            }
            break;
        case OPT_SPARSE:
            o.sparse = true;
            break;
        case OPT_FORCE:
            o.force = true;
            break;
        case OPT_QUIET:
            quiet = 1;
            break;
        case OPT_HELP:
            usage(stdout);
            return 0;
        default:
            fprintf(stderr, "weightd-mkckpt: try --help\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "weightd-mkckpt: unexpected argument '%s'; try --help\n", argv[optind]);
        return 2;
    }
    if (!preset || !o.out_dir) {
        fprintf(stderr, "weightd-mkckpt: --preset and --out are required; try --help\n");
        return 2;
    }
    o.preset = wl_preset_find(preset);
    if (!o.preset) {
        fprintf(stderr, "weightd-mkckpt: unknown preset '%s'; known:", preset);
        for (size_t i = 0; i < wl_n_presets; i++)
            fprintf(stderr, " %s", wl_presets[i].name);
        fprintf(stderr, "\n");
        return 2;
    }
    o.log = quiet ? NULL : stdout;
    if (wl_ckpt_write(&o, NULL, &err) < 0) {
        fprintf(stderr, "weightd-mkckpt: %s\n", wd_error_text(&err));
        return 1;
    }
    return 0;
}
