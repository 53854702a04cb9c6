/* Mixture-of-experts structure from tensor names, and placement across
 * devices built on it. */
#include "tests/unit/suites.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/moe.h"
#include "loader/placement.h"

typedef struct tspec {
    const char *name;
    uint64_t d0, d1;   /* a [d0, d1] BF16 tensor */
} tspec;

/* Writes one safetensors file holding these tensors (zeros) and opens it. */
static void open_with(const tspec *t, size_t n, wl_checkpoint *ck)
{
    st_tensor_spec *specs = calloc(n, sizeof *specs);
    uint64_t (*shapes)[2] = calloc(n, sizeof *shapes);
    char *header, err[256], *path = wd_test_path("m.safetensors");
    size_t len;
    uint64_t data_len;
    wd_error e = {0};
    FILE *f;

    for (size_t i = 0; i < n; i++) {
        shapes[i][0] = t[i].d0;
        shapes[i][1] = t[i].d1;
        specs[i] = (st_tensor_spec){t[i].name, ST_BF16, 2, shapes[i]};
    }
    ck_assert_int_eq(st_build_header(specs, n, NULL, 0, &header, &len, &data_len, err, sizeof err), 0);
    ck_assert_ptr_nonnull(f = fopen(path, "wb"));
    ck_assert_uint_eq(fwrite(header, 1, len, f), len);
    ck_assert_int_eq(ftruncate(fileno(f), (off_t)(len + data_len)), 0);
    fclose(f);
    ck_assert_msg(wl_checkpoint_open(path, ck, &e) == 0, "%s", e.msg);
    free(header);
    free(specs);
    free(shapes);
    free(path);
}

START_TEST(per_expert_layers_count_distinct_experts)
{
    const tspec t[] = {
        {"model.embed_tokens.weight", 100, 8},
        {"model.layers.0.self_attn.q_proj.weight", 8, 8},
        {"model.layers.0.block_sparse_moe.experts.0.w1.weight", 16, 8},
        {"model.layers.0.block_sparse_moe.experts.0.w2.weight", 8, 16},
        {"model.layers.0.block_sparse_moe.experts.1.w1.weight", 16, 8},
        {"model.layers.0.block_sparse_moe.experts.1.w2.weight", 8, 16},
        {"model.layers.0.block_sparse_moe.experts.2.w1.weight", 16, 8},
        {"model.layers.0.block_sparse_moe.experts.2.w2.weight", 8, 16},
        {"model.layers.1.self_attn.q_proj.weight", 8, 8},
        {"model.layers.1.block_sparse_moe.experts.10.w1.weight", 16, 8},
        {"lm_head.weight", 100, 8},
    };
    wl_checkpoint ck;
    wl_moe m;
    wd_error e = {0};

    open_with(t, sizeof t / sizeof t[0], &ck);
    ck_assert_int_eq(wl_moe_analyse(&ck, &m, &e), 0);
    ck_assert_int_eq(m.layout, WL_MOE_PER_EXPERT);
    ck_assert_uint_eq(m.n_layers, 2);
    ck_assert_uint_eq(m.layers[0].experts, 3);
    ck_assert_uint_eq(m.layers[1].experts, 1);
    ck_assert_uint_eq(m.experts_per_layer, 3);
    ck_assert_uint_eq(m.layers[0].expert_bytes, 6 * 128 * 2);
    ck_assert_uint_eq(m.layers[0].other_bytes, 64 * 2);
    ck_assert_uint_eq(m.outside_bytes, 2 * 800 * 2);
    ck_assert_uint_eq(m.expert_tensors, 7);
    ck_assert_uint_eq(m.expert_bytes + (m.layer_bytes - m.expert_bytes) + m.outside_bytes, ck.total_bytes);
    wl_moe_free(&m);
    wl_checkpoint_close(&ck);
}
END_TEST

START_TEST(fused_experts_take_the_leading_dimension)
{
    const tspec t[] = {
        {"model.layers.2.mlp.experts.gate_up_proj_blocks", 32, 64},
        {"model.layers.2.mlp.experts.down_proj_blocks", 32, 16},
        {"model.layers.2.mlp.router.weight", 32, 8},
        {"model.layers.10.mlp.experts.gate_up_proj_blocks", 32, 64},
    };
    wl_checkpoint ck;
    wl_moe m;
    wd_error e = {0};

    open_with(t, sizeof t / sizeof t[0], &ck);
    ck_assert_int_eq(wl_moe_analyse(&ck, &m, &e), 0);
    ck_assert_int_eq(m.layout, WL_MOE_FUSED);
    ck_assert_uint_eq(m.n_layers, 2);
    ck_assert_uint_eq(m.layers[0].index, 2); /* numeric order, not name order */
    ck_assert_uint_eq(m.layers[1].index, 10);
    ck_assert_uint_eq(m.layers[0].experts, 32);
    ck_assert(m.layers[0].fused);
    ck_assert_uint_eq(m.layers[0].other_bytes, 32 * 8 * 2);
    wl_moe_free(&m);
    wl_checkpoint_close(&ck);
}
END_TEST

START_TEST(shared_experts_dense_models_and_odd_names)
{
    const tspec t[] = {
        {"model.layers.0.mlp.shared_experts.gate_proj.weight", 8, 8}, /* every token: not routed */
        {"model.layers.0.mlp.experts.0.gate_proj.weight", 8, 8},
        {"layers.7.attention.wq.weight", 8, 8},                      /* "layers." at the start */
        {"transformer.h.3.attn.c_attn.weight", 8, 8},                /* GPT-2 style */
        {"model.layers3.weight", 8, 8},                              /* no layer number */
        {"model.layers.x.weight", 8, 8},
    };
    wl_checkpoint ck;
    wl_moe m;
    wd_error e = {0};

    open_with(t, sizeof t / sizeof t[0], &ck);
    ck_assert_int_eq(wl_moe_analyse(&ck, &m, &e), 0);
    ck_assert_uint_eq(m.n_layers, 3);
    ck_assert_uint_eq(m.layers[0].index, 0);
    ck_assert_uint_eq(m.layers[0].experts, 1);
    ck_assert_uint_eq(m.layers[0].other_bytes, 128);
    ck_assert_uint_eq(m.layers[1].index, 3);
    ck_assert_uint_eq(m.layers[2].index, 7);
    ck_assert_uint_eq(m.outside_bytes, 2 * 128);
    wl_moe_free(&m);
    wl_checkpoint_close(&ck);

    const tspec dense[] = {{"model.layers.0.mlp.up_proj.weight", 8, 8}, {"model.norm.weight", 8, 1}};
    open_with(dense, 2, &ck);
    ck_assert_int_eq(wl_moe_analyse(&ck, &m, &e), 0);
    ck_assert_int_eq(m.layout, WL_MOE_DENSE);
    ck_assert_str_eq(wl_moe_layout_name(m.layout), "dense");
    ck_assert_uint_eq(m.experts_per_layer, 0);
    wl_moe_free(&m);
    wl_checkpoint_close(&ck);
}
END_TEST

/* ---- placement ------------------------------------------------------------- */

/* Targets come in tensor order, then offset order, stay inside their tensor,
 * and together cover tensor i's bytes copies[i] times (or copies[0] times
 * each with one entry). */
static void check_cover(const wl_checkpoint *ck, const wl_target *t, size_t n, const unsigned *copies,
                        size_t n_copies)
{
    size_t k = 0;

    for (uint32_t i = 0; i < ck->n_tensors; i++) {
        uint64_t bytes = st_tensor_nbytes(ck->tensors[i].st), sum = 0, last_off = 0;
        for (; k < n && t[k].tensor == i; k++) {
            ck_assert_uint_ge(t[k].offset, last_off);
            ck_assert_uint_le(t[k].offset + t[k].len, bytes);
            last_off = t[k].offset;
            sum += t[k].len;
        }
        ck_assert_uint_eq(sum, bytes * copies[n_copies == 1 ? 0 : i]);
    }
    ck_assert_uint_eq(k, n);
}

static const tspec moe_model[] = {
    {"model.embed_tokens.weight", 100, 8},
    {"model.layers.0.self_attn.q_proj.weight", 8, 8},
    {"model.layers.0.mlp.experts.0.gate_proj.weight", 16, 8},
    {"model.layers.0.mlp.experts.1.gate_proj.weight", 16, 8},
    {"model.layers.0.mlp.experts.2.gate_proj.weight", 16, 8},
    {"model.layers.0.mlp.experts.3.gate_proj.weight", 16, 8},
    {"model.layers.1.mlp.experts.gate_up_proj", 3, 64}, /* fused: 3 experts */
    {"model.layers.1.mlp.experts.down_proj_bias", 1, 8}, /* fused, one row */
    {"model.norm.weight", 0, 8},                         /* empty */
};
#define MOE_MODEL_N (sizeof moe_model / sizeof moe_model[0])

START_TEST(one_device_holds_every_tensor_once)
{
    wl_checkpoint ck;
    wl_target *t;
    size_t n;
    int dev = 3;
    wd_error e = {0};

    open_with(moe_model, MOE_MODEL_N, &ck);
    for (int kind = WL_REPLICATE; kind <= WL_EXPERT_PARALLEL; kind++) {
        ck_assert_int_eq(wl_place(&ck, &dev, 1, (wl_placement)kind, &t, &n, &e), 0);
        ck_assert_uint_eq(n, MOE_MODEL_N);
        for (size_t i = 0; i < n; i++)
            ck_assert_int_eq(t[i].device, 3);
        check_cover(&ck, t, n, (unsigned[]){1}, 1);
        free(t);
    }
    wl_checkpoint_close(&ck);
}
END_TEST

START_TEST(replicate_puts_everything_on_every_device)
{
    wl_checkpoint ck;
    wl_target *t;
    size_t n;
    const int devs[] = {1, 0};
    wd_error e = {0};

    open_with(moe_model, MOE_MODEL_N, &ck);
    ck_assert_int_eq(wl_place(&ck, devs, 2, WL_REPLICATE, &t, &n, &e), 0);
    ck_assert_uint_eq(n, 2 * MOE_MODEL_N);
    for (size_t i = 0; i < n; i += 2) {
        ck_assert_int_eq(t[i].device, 1); /* in the order asked for */
        ck_assert_int_eq(t[i + 1].device, 0);
        ck_assert_uint_eq(t[i].len, t[i + 1].len);
    }
    check_cover(&ck, t, n, (unsigned[]){2}, 1);
    free(t);
    wl_checkpoint_close(&ck);
}
END_TEST

START_TEST(expert_parallel_splits_experts_and_replicates_the_rest)
{
    const wl_target want[] = {
        {0, 0, 1600, 5}, {0, 0, 1600, 7},    /* embeddings: both devices */
        {1, 0, 128, 5},  {1, 0, 128, 7},     /* attention: both */
        {2, 0, 256, 5},  {3, 0, 256, 5},     /* experts 0 and 1 on the first device */
        {4, 0, 256, 7},  {5, 0, 256, 7},     /* experts 2 and 3 on the second */
        {6, 0, 128, 5},  {6, 128, 256, 7},   /* fused [3, 64]: row 0, rows 1-2 */
        {7, 0, 16, 7},                       /* fused [1, 8]: its one row on one device */
        {8, 0, 0, 5},    {8, 0, 0, 7},       /* empty: nothing to split */
    };
    wl_checkpoint ck;
    wl_target *t;
    size_t n;
    const int devs[] = {5, 7};
    wd_error e = {0};

    open_with(moe_model, MOE_MODEL_N, &ck);
    ck_assert_int_eq(wl_place(&ck, devs, 2, WL_EXPERT_PARALLEL, &t, &n, &e), 0);
    ck_assert_uint_eq(n, sizeof want / sizeof want[0]);
    for (size_t i = 0; i < n; i++) {
        ck_assert_uint_eq(t[i].tensor, want[i].tensor);
        ck_assert_uint_eq(t[i].offset, want[i].offset);
        ck_assert_uint_eq(t[i].len, want[i].len);
        ck_assert_int_eq(t[i].device, want[i].device);
    }
    check_cover(&ck, t, n, (unsigned[]){2, 2, 1, 1, 1, 1, 1, 1, 2}, MOE_MODEL_N);
    free(t);
    wl_checkpoint_close(&ck);
}
END_TEST

/* Three devices, 8 experts: groups of 2, 3 and 3 (expert e on devs[e*3/8]). */
START_TEST(expert_groups_are_contiguous_and_balanced)
{
    tspec model[8];
    char names[8][64];
    wl_checkpoint ck;
    wl_target *t;
    size_t n;
    const int devs[] = {2, 0, 1};
    const int want[] = {2, 2, 2, 0, 0, 0, 1, 1};
    wd_error e = {0};

    for (int i = 0; i < 8; i++) {
        snprintf(names[i], sizeof names[i], "model.layers.0.mlp.experts.%d.up_proj.weight", i);
        model[i] = (tspec){names[i], 4, 4};
    }
    open_with(model, 8, &ck);
    ck_assert_int_eq(wl_place(&ck, devs, 3, WL_EXPERT_PARALLEL, &t, &n, &e), 0);
    ck_assert_uint_eq(n, 8);
    /* Tensors are in data order, which is name order here: experts 0..7. */
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(t[i].device, want[i]);
    free(t);
    wl_checkpoint_close(&ck);
}
END_TEST

START_TEST(placement_names_and_bad_input)
{
    wl_checkpoint ck;
    wl_target *t = (wl_target *)&t;
    size_t n = 9;
    wl_placement p;
    wd_error e = {0};

    ck_assert_int_eq(wl_placement_parse("replicate", &p), 0);
    ck_assert_int_eq(p, WL_REPLICATE);
    ck_assert_int_eq(wl_placement_parse("expert-parallel", &p), 0);
    ck_assert_int_eq(p, WL_EXPERT_PARALLEL);
    ck_assert_str_eq(wl_placement_name(p), "expert-parallel");
    ck_assert_int_eq(wl_placement_parse("Replicate", &p), -EINVAL);
    ck_assert_int_eq(wl_placement_parse("", &p), -EINVAL);
    open_with(moe_model, MOE_MODEL_N, &ck);
    ck_assert_int_eq(wl_place(&ck, NULL, 0, WL_REPLICATE, &t, &n, &e), -EINVAL);
    ck_assert_ptr_null(t);
    ck_assert_uint_eq(n, 0);
    ck_assert_str_eq(e.msg, "no devices to place the model on");
    wl_checkpoint_close(&ck);
}
END_TEST

Suite *placement_suite(void)
{
    Suite *s = suite_create("placement");
    TCase *tc = tcase_create("placement");

    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, one_device_holds_every_tensor_once);
    tcase_add_test(tc, replicate_puts_everything_on_every_device);
    tcase_add_test(tc, expert_parallel_splits_experts_and_replicates_the_rest);
    tcase_add_test(tc, expert_groups_are_contiguous_and_balanced);
    tcase_add_test(tc, placement_names_and_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

Suite *moe_suite(void)
{
    Suite *s = suite_create("moe");
    TCase *tc = tcase_create("moe");

    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, per_expert_layers_count_distinct_experts);
    tcase_add_test(tc, fused_experts_take_the_leading_dimension);
    tcase_add_test(tc, shared_experts_dense_models_and_odd_names);
    suite_add_tcase(s, tc);
    return s;
}
