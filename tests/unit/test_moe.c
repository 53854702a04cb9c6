/* Mixture-of-experts structure from tensor names. */
#include "tests/unit/suites.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/moe.h"

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
