/* The free-block pool: a treap keyed by (size, address), so that best fit,
 * "largest below", insert and erase are all O(log n) — PyTorch uses a
 * std::set with the same order (BlockComparatorSize, one stream here). */
#include "allocator/internal.h"

static bool key_less(const wa_block *b, uint64_t size, uint64_t addr)
{
    return b->size < size || (b->size == size && b->addr < addr);
}

/* Splits t into blocks with key < (size, addr) and the rest. */
static void split(wa_block *t, uint64_t size, uint64_t addr, wa_block **lo, wa_block **hi)
{
    if (!t) {
        *lo = *hi = NULL;
    } else if (key_less(t, size, addr)) {
        split(t->right, size, addr, &t->right, hi);
        *lo = t;
    } else {
        split(t->left, size, addr, lo, &t->left);
        *hi = t;
    }
}

/* Joins two treaps where every key of lo is below every key of hi. */
static wa_block *join(wa_block *lo, wa_block *hi)
{
    if (!lo)
        return hi;
    if (!hi)
        return lo;
    if (lo->prio > hi->prio) {
        lo->right = join(lo->right, hi);
        return lo;
    }
    hi->left = join(lo, hi->left);
    return hi;
}

void wa__pool_insert(wa_pool *pool, wa_block *b)
{
    wa_block *lo, *hi;

    /* A hash of the address keeps the tree's shape reproducible run to run. */
    uint64_t h = (b->addr ^ (b->size << 7)) * 0x9E3779B97F4A7C15ULL;
    b->prio = (uint32_t)(h >> 32);
    b->left = b->right = NULL;
    split(pool->root, b->size, b->addr, &lo, &hi);
    pool->root = join(join(lo, b), hi);
    pool->count++;
}

void wa__pool_erase(wa_pool *pool, wa_block *b)
{
    wa_block **link = &pool->root;

    while (*link && *link != b)
        link = key_less(*link, b->size, b->addr) ? &(*link)->right : &(*link)->left;
    if (!*link)
        return;
    *link = join(b->left, b->right);
    b->left = b->right = NULL;
    pool->count--;
}

wa_block *wa__pool_lower_bound(const wa_pool *pool, uint64_t size)
{
    wa_block *t = pool->root, *best = NULL;

    while (t) {
        if (t->size >= size) {
            best = t;
            t = t->left;
        } else {
            t = t->right;
        }
    }
    return best;
}

wa_block *wa__pool_before(const wa_pool *pool, uint64_t size, uint64_t addr)
{
    wa_block *t = pool->root, *best = NULL;

    while (t) {
        if (key_less(t, size, addr)) {
            best = t;
            t = t->right;
        } else {
            t = t->left;
        }
    }
    return best;
}

wa_block *wa__pool_max(const wa_pool *pool)
{
    wa_block *t = pool->root;

    while (t && t->right)
        t = t->right;
    return t;
}

static void each(wa_block *t, void (*fn)(wa_block *, void *), void *ctx)
{
    while (t) {
        each(t->left, fn, ctx);
        fn(t, ctx);
        t = t->right;
    }
}

void wa__pool_each(const wa_pool *pool, void (*fn)(wa_block *, void *), void *ctx)
{
    each(pool->root, fn, ctx);
}

struct collect_ctx {
    wa_block **out;
    size_t n;
};

static void collect_one(wa_block *b, void *ctx)
{
    struct collect_ctx *c = ctx;
    c->out[c->n++] = b;
}

size_t wa__pool_collect(const wa_pool *pool, wa_block **out)
{
    struct collect_ctx c = {out, 0};

    each(pool->root, collect_one, &c);
    return c.n;
}
