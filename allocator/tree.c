/* Treaps of blocks. The free-block pools are ordered by (size, address), so
 * that best fit, "largest below", insert and erase are all O(log n) — PyTorch
 * uses a std::set with the same order (BlockComparatorSize, one stream here);
 * unmapped ranges are ordered by address (BlockComparatorAddress). */
#include "allocator/internal.h"

static bool key_less(const wa_tree *t, const wa_block *b, uint64_t size, uint64_t addr)
{
    if (t->by_addr)
        return b->addr < addr;
    return b->size < size || (b->size == size && b->addr < addr);
}

/* Splits r into blocks with key < (size, addr) and the rest. */
static void split(const wa_tree *t, wa_block *r, uint64_t size, uint64_t addr, wa_block **lo, wa_block **hi)
{
    if (!r) {
        *lo = *hi = NULL;
    } else if (key_less(t, r, size, addr)) {
        split(t, r->right, size, addr, &r->right, hi);
        *lo = r;
    } else {
        split(t, r->left, size, addr, lo, &r->left);
        *hi = r;
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

void wa__tree_insert(wa_tree *t, wa_block *b)
{
    wa_block *lo, *hi;
    /* A hash of the key keeps the tree's shape reproducible run to run. */
    uint64_t h = (b->addr ^ (b->size << 7)) * 0x9E3779B97F4A7C15ULL;

    b->prio = (uint32_t)(h >> 32);
    b->left = b->right = NULL;
    split(t, t->root, b->size, b->addr, &lo, &hi);
    t->root = join(join(lo, b), hi);
    t->count++;
}

void wa__tree_erase(wa_tree *t, wa_block *b)
{
    wa_block **link = &t->root;

    while (*link && *link != b)
        link = key_less(t, *link, b->size, b->addr) ? &(*link)->right : &(*link)->left;
    if (!*link)
        return;
    *link = join(b->left, b->right);
    b->left = b->right = NULL;
    t->count--;
}

wa_block *wa__tree_lower_bound(const wa_tree *t, uint64_t size, uint64_t addr)
{
    wa_block *r = t->root, *best = NULL;

    while (r) {
        if (!key_less(t, r, size, addr)) {
            best = r;
            r = r->left;
        } else {
            r = r->right;
        }
    }
    return best;
}

wa_block *wa__tree_next(const wa_tree *t, const wa_block *b)
{
    /* The first key strictly after b's: at or after (size, addr + 1). */
    return b->addr == UINT64_MAX ? NULL : wa__tree_lower_bound(t, b->size, b->addr + 1);
}

wa_block *wa__tree_prev(const wa_tree *t, const wa_block *b)
{
    wa_block *r = t->root, *best = NULL;

    while (r) {
        if (key_less(t, r, b->size, b->addr)) {
            best = r;
            r = r->right;
        } else {
            r = r->left;
        }
    }
    return best;
}

wa_block *wa__tree_max(const wa_tree *t)
{
    wa_block *r = t->root;

    while (r && r->right)
        r = r->right;
    return r;
}

static size_t collect(wa_block *r, wa_block **out, size_t n)
{
    while (r) {
        n = collect(r->left, out, n);
        out[n++] = r;
        r = r->right;
    }
    return n;
}

size_t wa__tree_collect(const wa_tree *t, wa_block **out)
{
    return collect(t->root, out, 0);
}
