/* s3rollup's native rollup kernels: per group, the rows and, per value column, the count,
 * mean, M2 (sum of squared deviations from the mean), min and max.
 *
 * Three ways in, one per-value update:
 *   sr_codes - rows already mapped to dense group codes (any key types, any format);
 *   sr_keys  - rows with an int64 key column (as pyarrow read it), grouped by a table
 *              indexed by the key when the keys span fewer than 2^16 values (a category
 *              column), else by an open-addressing hash;
 *   sr_csv   - a plain CSV body parsed natively, for one int64 group key and float64 value
 *              columns. It accepts only the plainest records and answers SR_UNSUPPORTED for
 *              anything else (quotes, stray carriage returns, spaces, "inf", a wrong field
 *              count, ...): the caller then reads the part with pyarrow, which accepts or
 *              rejects it and says where. So this path never rejects a part and never
 *              accepts one that pyarrow would reject. A cell spelled as one of the missing
 *              values sr_na gave (pandas' "NA", "null", "N/A", ... by default) is NaN in a
 *              value column, and leaves its row out of every group in the key column, as
 *              pandas' groupby leaves out a row whose key is missing.
 *
 * And one way to combine partials: sr_merge, Chan et al.'s merge as stats._merge_tables
 * computes it with NumPy, in the same order (so the same bits).
 *
 * One pass over the rows, pandas' own arithmetic per value: group_mean's Kahan-compensated
 * sum (compensation reset when it turns NaN, GH#50367), so the mean is pandas' to the bit,
 * and group_var's Welford update for M2, in row order, NaN skipped. On x86-64 CPUs with
 * AVX2 a row's values are updated four at a time (one vector lane per value column, the same
 * operations in the same order, so the same bits); elsewhere one at a time. Build with
 * -ffp-contract=off (no fused multiply-add), never -ffast-math. Loaded with ctypes (no
 * Python API), so calls run without the GIL. A context takes one call of sr_codes or sr_csv,
 * or any number of sr_keys calls (one per batch of a part's rows).
 *
 * Numbers are converted exactly as a correctly rounded strtod would: the Eisel-Lemire
 * method (a 64 x 128-bit product with a table of powers of five, for decimal exponents
 * within +-27), then Clinger's exact fast path, then one x87 extended-precision operation
 * whose result is checked to be safely away from a double rounding tie, then strtod itself.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SR_OK 0
#define SR_UNSUPPORTED 1
#define SR_NOMEM (-1)
#define SR_BADARG 2

#define ROLE_SKIP (-2)
#define ROLE_KEY (-1)
#define MAX_VALUES 64
#define MAX_NUMBER_TEXT 64

/* The moments of up to four value columns of one group, one lane each: a row's values are
 * updated together in vector registers where the CPU has AVX2, else lane by lane, with the
 * same arithmetic. nobs is a double (exact to 2^53). Lanes beyond the value columns stay 0. */
typedef double v4 __attribute__((vector_size(32), aligned(8)));
typedef int64_t m4 __attribute__((vector_size(32), aligned(8)));
typedef struct {
    v4 nobs;
    v4 sum, comp; /* compensated sum (pandas group_mean) */
    v4 mean, m2;  /* Welford (pandas group_var) */
    v4 min, max;
} blk_t;

#define BLOCKS(nv) (((nv) + 3) / 4)

/* sr_keys with many groups: partitions by the top bits of a key's hash (defer_rows). */
#define PART_BITS 6
#define NPART (1 << PART_BITS)
#define DEFER_GROUPS 16384
#define DEFER_BYTES ((size_t)16 << 20)

/* A slot of the hash table: the key beside its group (index + 1, 0 = empty), so a lookup
 * reads one cache line, not the table's and then the group's key. */
typedef struct {
    int64_t key;
    int64_t group;
} slot_t;

/* A hash table of keys to groups: open addressing, linear probing. A key's slot is the top
 * bits of its hash after the first skip bits (a partition's table: those bits are the
 * partition's, defer_rows). */
typedef struct {
    slot_t *slot; /* NULL: no table yet */
    int64_t size, used;
    int shift; /* the slot: (hash << skip) >> shift */
    int skip;
} hash_t;

/* Memory a thread keeps for its next parts, since fresh memory is what a new process pays
 * most for (about 2 us per 4 KiB page touched for the first time on Fargate's and this
 * machine's Firecracker VMs): the buffer its contexts' rows wait in (defer_rows, 16 MiB) and
 * the group storage of the last context freed on it (up to SPARE_BYTES). Both are freed when
 * the thread ends (thread_end); sr_thread_bytes says how much all threads keep. */
#define SPARE_BYTES ((size_t)64 << 20)

/* The thread's wait buffer is lent to one context at a time. A thread that ends while it is
 * lent leaves it to that context to free (ORPHAN). */
enum { WAIT_IDLE, WAIT_LENT, WAIT_ORPHAN };
struct wait_buffer {
    void *mem;
    size_t bytes;
    atomic_int state;
};

/* Group storage (a context's keys, rows and acc) for alloc groups of per blocks each. */
struct spare {
    int64_t *keys, *rows;
    blk_t *acc;
    int64_t alloc;
    size_t per;
};

struct thread_mem {
    struct wait_buffer *wait;
    struct spare spare;
};


typedef struct {
    int nvalues;
    int vector; /* update rows with AVX2 */
    int64_t ngroups, cap; /* groups, and groups whose storage is initialised */
    int64_t alloc;        /* groups the storage has room for */
    int64_t *keys; /* the group's key (sr_csv) or code (sr_codes) */
    int64_t *rows;
    blk_t *acc; /* ngroups x BLOCKS(nvalues) */
    hash_t table;    /* sr_keys over a wide key range, and sr_csv */
    int32_t *direct; /* sr_keys over a small key range: group index + 1 at key - dmin */
    int64_t dmin, dmax;
    /* sr_keys with many groups: a hash table per partition, and rows waiting by partition
     * (defer_rows) */
    hash_t *parts;
    struct wait_buffer *wbuf; /* where wkeys and wvals are: its thread's, or its own (wown) */
    int wown;
    int64_t *wkeys;  /* NPART x wcap keys */
    double *wvals;   /* NPART x wcap rows of 4 x BLOCKS(nvalues) values, NaN-padded */
    int64_t *wfill;  /* rows waiting in each partition */
    int64_t wcap;
    int64_t defer_groups; /* rows wait from this many groups on (DEFER_GROUPS) */
    size_t defer_bytes;   /* in buffers of about this many bytes (DEFER_BYTES) */
    int64_t keyless; /* sr_csv: records whose key is missing (in no group) */
    int na_empty;  /* sr_csv: an empty cell is missing */
    char *na;      /* sr_csv: the other missing-value spellings, each ended by a NUL */
    int64_t na_len;
} sr_ctx;

#if defined(__x86_64__) && defined(__GNUC__)
#define SR_VECTOR 1
#define SR_AVX2 __attribute__((target("avx2")))
static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#else
#define SR_VECTOR 0
static int cpu_has_avx2(void) { return 0; }
#endif

/* What all threads keep (thread_mem), in bytes. */
static atomic_llong kept_bytes;

/* The bytes of group storage (keys, rows and acc) for alloc groups of per blocks each. */
static size_t storage_bytes(int64_t alloc, size_t per) {
    return (size_t)alloc * (2 * sizeof(int64_t) + per * sizeof(blk_t));
}

static void spare_free(struct spare *s) {
    if (!s->acc) return;
    atomic_fetch_sub(&kept_bytes, (long long)storage_bytes(s->alloc, s->per));
    free(s->keys);
    free(s->rows);
    free(s->acc);
    *s = (struct spare){0};
}

static void wait_free(struct wait_buffer *w) {
    atomic_fetch_sub(&kept_bytes, (long long)w->bytes);
    free(w->mem);
    free(w);
}

/* A thread ends (pthread key destructor): its memory goes, but a wait buffer still lent
 * to a context goes when that context is freed. */
static void thread_end(void *p) {
    struct thread_mem *m = p;
    if (m->wait && atomic_exchange(&m->wait->state, WAIT_ORPHAN) == WAIT_IDLE) wait_free(m->wait);
    spare_free(&m->spare);
    free(m);
}

static pthread_key_t mem_key;
static pthread_once_t mem_once = PTHREAD_ONCE_INIT;
static int mem_key_made;
static _Thread_local struct thread_mem *this_thread;

static void make_mem_key(void) { mem_key_made = pthread_key_create(&mem_key, thread_end) == 0; }

/* This thread's memory; NULL when there is none to be had (contexts then use their own). */
static struct thread_mem *thread_mem(void) {
    if (this_thread) return this_thread;
    pthread_once(&mem_once, make_mem_key);
    if (!mem_key_made) return NULL;
    struct thread_mem *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (pthread_setspecific(mem_key, m) != 0) {
        free(m);
        return NULL;
    }
    return this_thread = m;
}

/* sr_csv's records whose key cell was a missing value: in no group, as pandas' groupby
 * leaves them out. */
int64_t sr_keyless(const sr_ctx *c) { return c->keyless; }

/* Bytes kept by threads for their next parts (wait buffers and spare group storage). */
int64_t sr_thread_bytes(void) { return (int64_t)atomic_load(&kept_bytes); }

sr_ctx *sr_new(int nvalues) {
    if (nvalues < 0 || nvalues > MAX_VALUES) return NULL;
    sr_ctx *c = calloc(1, sizeof(sr_ctx));
    if (c) {
        c->nvalues = nvalues;
        c->vector = cpu_has_avx2();
        c->defer_groups = DEFER_GROUPS;
        c->defer_bytes = DEFER_BYTES;
        c->na_empty = 1;
    }
    return c;
}

/* The cells sr_csv reads as missing: an empty one when empty is set, and the len bytes of
 * spellings, each ended by a NUL (copied). Without a call: the empty cell only. */
int sr_na(sr_ctx *c, const char *spellings, int64_t len, int empty) {
    char *copy = NULL;
    if (len > 0) {
        if (spellings[len - 1] != '\0') return SR_BADARG;
        copy = malloc((size_t)len);
        if (!copy) return SR_NOMEM;
        memcpy(copy, spellings, (size_t)len);
    }
    free(c->na);
    c->na = copy;
    c->na_len = len;
    c->na_empty = empty != 0;
    return SR_OK;
}

/* Whether the context updates rows with AVX2; 0 turns that off (the lane-by-lane path gives
 * the same bits: the tests compare the two). */
/* When sr_keys's rows start to wait by partition, and in how large buffers (defer_rows): the
 * defaults unless a test asks for others (rows then wait from the first group on, or never). */
void sr_defer(sr_ctx *c, int64_t groups, int64_t bytes) {
    c->defer_groups = groups;
    c->defer_bytes = bytes > 0 ? (size_t)bytes : 0;
}

int sr_vector(sr_ctx *c, int on) {
    if (!on) c->vector = 0;
    return c->vector;
}

static void keep_storage(sr_ctx *c);

/* Free a context (on the thread that filled it: that thread lent it its wait buffer, and
 * keeps its group storage for its next context). */
void sr_free(sr_ctx *c) {
    if (!c) return;
    keep_storage(c);
    free(c->table.slot);
    free(c->direct);
    if (c->parts)
        for (int p = 0; p < NPART; p++) free(c->parts[p].slot);
    free(c->parts);
    if (c->wbuf && (c->wown || atomic_exchange(&c->wbuf->state, WAIT_IDLE) == WAIT_ORPHAN))
        wait_free(c->wbuf); /* its own, or its thread's after that thread ended */
    free(c->wfill);
    free(c->na);
    free(c);
}


/* A context's group storage for the thread's next context, unless it is larger than
 * SPARE_BYTES or smaller than what the thread keeps; else freed. */
static void keep_storage(sr_ctx *c) {
    size_t per = (size_t)BLOCKS(c->nvalues);
    size_t bytes = storage_bytes(c->alloc, per);
    struct thread_mem *m = c->acc && bytes <= SPARE_BYTES ? thread_mem() : NULL;
    if (m && m->spare.alloc * (int64_t)m->spare.per <= c->alloc * (int64_t)per) {
        spare_free(&m->spare);
        m->spare = (struct spare){c->keys, c->rows, c->acc, c->alloc, per};
        atomic_fetch_add(&kept_bytes, (long long)bytes);
        return;
    }
    free(c->keys);
    free(c->rows);
    free(c->acc);
}

/* Room for need groups, their storage initialised: the thread's spare storage first (its
 * pages are in memory already), then doubling. */
static int reserve(sr_ctx *c, int64_t need) {
    if (need <= c->cap) return SR_OK;
    int64_t cap = c->cap ? c->cap : 1024;
    while (cap < need) cap *= 2;
    size_t per = (size_t)BLOCKS(c->nvalues);
    struct thread_mem *m = c->alloc ? NULL : thread_mem();
    if (m && m->spare.acc && m->spare.per == per) {
        struct spare *s = &m->spare;
        atomic_fetch_sub(&kept_bytes, (long long)storage_bytes(s->alloc, per));
        c->keys = s->keys, c->rows = s->rows, c->acc = s->acc, c->alloc = s->alloc;
        *s = (struct spare){0};
    }
    if (cap > c->alloc) {
        int64_t *keys = realloc(c->keys, (size_t)cap * sizeof *keys);
        if (!keys) return SR_NOMEM;
        c->keys = keys;
        int64_t *rows = realloc(c->rows, (size_t)cap * sizeof *rows);
        if (!rows) return SR_NOMEM;
        c->rows = rows;
        blk_t *acc = realloc(c->acc, (size_t)cap * per * sizeof *acc + 1);
        if (!acc) return SR_NOMEM;
        c->acc = acc;
        c->alloc = cap;
    }
    memset(c->rows + c->cap, 0, (size_t)(cap - c->cap) * sizeof *c->rows);
    const v4 inf = {INFINITY, INFINITY, INFINITY, INFINITY};
    for (size_t i = (size_t)c->cap * per; i < (size_t)cap * per; i++)
        c->acc[i] = (blk_t){.min = inf, .max = -inf};
    c->cap = cap;
    return SR_OK;
}

/* One value into lane l of its group's moments: pandas' arithmetic, NaN skipped. */
enum { NOBS, SUM, COMP, MEAN, M2, MIN, MAX };
#define LANE(b, field, l) (((double *)(b))[4 * (field) + (l)])
static inline void update_lane(blk_t *b, int l, double v) {
    if (v != v) return;
    double *nobs = &LANE(b, NOBS, l), *sum = &LANE(b, SUM, l), *comp = &LANE(b, COMP, l);
    double *mean = &LANE(b, MEAN, l), *m2 = &LANE(b, M2, l), *min = &LANE(b, MIN, l), *max = &LANE(b, MAX, l);
    double n = *nobs + 1.0;
    *nobs = n;
    double y = v - *comp;
    double t = *sum + y;
    double cmp = t - *sum - y;
    *comp = cmp != cmp ? 0.0 : cmp;
    *sum = t;
    double old = *mean;
    *mean += (v - old) / n;
    *m2 += (v - *mean) * (v - old);
    if (v < *min) *min = v; /* min starts at +inf, max at -inf (reserve) */
    if (v > *max) *max = v;
}

/* update_lane on four lanes at once, one value column per lane: the same operations in the
 * same order, so the same bits (blends stand for its branches). */
#define SEL(m, a, b) ((v4)(((m) & (m4)(a)) | (~(m) & (m4)(b))))
static inline __attribute__((always_inline)) void update_vec(blk_t *b, const v4 *value) {
    v4 v = *value;
    const v4 zero = {0.0, 0.0, 0.0, 0.0}, one = {1.0, 1.0, 1.0, 1.0};
    m4 ok = v == v;
    v4 n = b->nobs + SEL(ok, one, zero);
    v4 y = v - b->comp;
    v4 t = b->sum + y;
    v4 comp = t - b->sum - y;
    comp = SEL(comp == comp, comp, zero);
    v4 old = b->mean;
    v4 mean = old + (v - old) / n;
    v4 m2 = b->m2 + (v - mean) * (v - old);
    b->nobs = n;
    b->comp = SEL(ok, comp, b->comp);
    b->sum = SEL(ok, t, b->sum);
    b->mean = SEL(ok, mean, old);
    b->m2 = SEL(ok, m2, b->m2);
    b->min = SEL(v < b->min, v, b->min); /* false where v is NaN */
    b->max = SEL(v > b->max, v, b->max);
}

/* One row's values into its group's blocks. row[j] for j < nv, NaN after, up to BLOCKS(nv)
 * whole blocks. vec is a constant where this is inlined. */
static inline __attribute__((always_inline)) void update_row(blk_t *b, const double *row, int nv, int vec) {
    if (vec) {
        for (int k = 0; k < BLOCKS(nv); k++) {
            v4 v;
            memcpy(&v, row + 4 * k, sizeof v);
            update_vec(b + k, &v);
        }
    } else {
        for (int j = 0; j < nv; j++) update_lane(b + (j >> 2), j & 3, row[j]);
    }
}

/* Row i of value columns cols[0..nv) into its group's blocks, read straight from the columns
 * (a row buffer would cost a stalled store-to-load forward per block). */
static inline __attribute__((always_inline)) void update_columns(blk_t *b, const double *const *cols, int64_t i,
                                                                 int nv, int vec) {
    if (!vec) {
        for (int j = 0; j < nv; j++) update_lane(b + (j >> 2), j & 3, cols[j][i]);
        return;
    }
    for (int k = 0; 4 * k < nv; k++) {
        const double *const *c = cols + 4 * k;
        v4 v;
        switch (nv - 4 * k) {
        case 1: v = (v4){c[0][i], NAN, NAN, NAN}; break;
        case 2: v = (v4){c[0][i], c[1][i], NAN, NAN}; break;
        case 3: v = (v4){c[0][i], c[1][i], c[2][i], NAN}; break;
        default: v = (v4){c[0][i], c[1][i], c[2][i], c[3][i]}; break;
        }
        update_vec(b + k, &v);
    }
}

/* Rows with dense codes in [0, k); code -1 (a null key) is skipped. */
static inline __attribute__((always_inline)) int codes_rows(sr_ctx *c, const int64_t *codes, int64_t n, int64_t k,
                                                            const double *const *values, int vec) {
    int nv = c->nvalues;
    for (int64_t i = 0; i < n; i++) {
        int64_t g = codes[i];
        if (g < 0) continue;
        if (g >= k) return SR_BADARG;
        c->rows[g] += 1;
        update_columns(c->acc + (size_t)g * (size_t)BLOCKS(nv), values, i, nv, vec);
    }
    return SR_OK;
}
#if SR_VECTOR
SR_AVX2 static int codes_avx2(sr_ctx *c, const int64_t *codes, int64_t n, int64_t k, const double *const *values) {
    return codes_rows(c, codes, n, k, values, 1);
}
#endif
static int codes_lanes(sr_ctx *c, const int64_t *codes, int64_t n, int64_t k, const double *const *values) {
    return codes_rows(c, codes, n, k, values, 0);
}

int sr_codes(sr_ctx *c, const int64_t *codes, int64_t n, int64_t k, const double *const *values) {
    if (reserve(c, k) != SR_OK) return SR_NOMEM;
    for (int64_t g = c->ngroups; g < k; g++) c->keys[g] = g;
    if (k > c->ngroups) c->ngroups = k;
#if SR_VECTOR
    if (c->vector) return codes_avx2(c, codes, n, k, values);
#endif
    return codes_lanes(c, codes, n, k, values);
}

/* ---- keys -> groups ------------------------------------------------------------------ */

static inline uint64_t hash_of(int64_t key) { return (uint64_t)key * 0x9E3779B97F4A7C15ull; }
static inline uint64_t slot_in(const hash_t *t, int64_t key) { return (hash_of(key) << t->skip) >> t->shift; }

/* key's group (index + 1) into t, at its slot or the first free one after it. */
static inline void hash_put(hash_t *t, int64_t key, int64_t group) {
    uint64_t s = slot_in(t, key);
    while (t->slot[s].group) s = (s + 1) & (uint64_t)(t->size - 1);
    t->slot[s] = (slot_t){key, group};
    t->used++;
}

/* t with 2^bits empty slots (what it held is dropped: the caller puts it back). */
static int hash_init(hash_t *t, int bits, int skip) {
    slot_t *slot = calloc((size_t)1 << bits, sizeof *slot);
    if (!slot) return SR_NOMEM;
    free(t->slot);
    *t = (hash_t){slot, (int64_t)1 << bits, 0, 64 - bits, skip};
    return SR_OK;
}

/* t at twice its size, its keys moved in. */
static int hash_grow(hash_t *t) {
    hash_t old = *t;
    t->slot = NULL;
    if (hash_init(t, 64 - old.shift + 1, old.skip) != SR_OK) {
        *t = old;
        return SR_NOMEM;
    }
    for (int64_t i = 0; i < old.size; i++)
        if (old.slot[i].group) hash_put(t, old.slot[i].key, old.slot[i].group);
    free(old.slot);
    return SR_OK;
}

/* The group of a key in t, added on first sight (the context's next group); -1 when out of
 * memory. */
static inline int64_t group_in(sr_ctx *c, hash_t *t, int64_t key) {
    uint64_t mask = (uint64_t)(t->size - 1);
    uint64_t s = slot_in(t, key);
    for (;;) {
        int64_t g = t->slot[s].group;
        if (g == 0) break;
        if (t->slot[s].key == key) return g - 1;
        s = (s + 1) & mask;
    }
    int64_t g = c->ngroups;
    if (reserve(c, g + 1) != SR_OK) return -1;
    c->keys[g] = key;
    c->ngroups = g + 1;
    t->slot[s] = (slot_t){key, g + 1};
    t->used++;
    if (2 * t->used > t->size && hash_grow(t) != SR_OK) return -1;
    return g;
}

/* Rows are grouped BATCH at a time: first every row's table slot is fetched ahead
 * (prefetch), then each row's group is looked up (added on first sight, in row order) and
 * its moments fetched ahead, then the rows update their groups in row order. With many
 * groups the table and the moments do not fit in the caches: a row waited for each of
 * those reads in turn, a batch waits for them all at once. Same groups, same order of
 * updates, so the same bits. */
#define BATCH 32

static inline void prefetch_slot(const hash_t *t, int64_t key) { __builtin_prefetch(&t->slot[slot_in(t, key)]); }

/* Fetch ahead what updating group g touches: its row count and its moments' blocks. */
static inline void prefetch_group(const sr_ctx *c, int64_t g) {
    __builtin_prefetch(&c->rows[g], 1);
    const char *b = (const char *)(c->acc + (size_t)g * (size_t)BLOCKS(c->nvalues));
    size_t bytes = (size_t)BLOCKS(c->nvalues) * sizeof(blk_t);
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(b + off, 1);
    __builtin_prefetch(b + bytes - 1, 1);
}

/* The groups of keys[0..n) in table t into g (added on first sight, in order), with their
 * moments fetched ahead, and their slots first when ``slots`` (not for a partition's table,
 * already in the cache: defer_rows); keys whose skip[b] is set (may be NULL) are in no
 * group (-1). */
static inline __attribute__((always_inline)) int batch_groups(sr_ctx *c, hash_t *t, const int64_t *keys,
                                                              const unsigned char *skip, int n, int slots,
                                                              int64_t *g) {
    for (int b = 0; slots && b < n; b++)
        if (!skip || !skip[b]) prefetch_slot(t, keys[b]);
    for (int b = 0; b < n; b++) {
        if (skip && skip[b]) {
            g[b] = -1;
            continue;
        }
        int64_t x = group_in(c, t, keys[b]);
        if (x < 0) return SR_NOMEM;
        g[b] = x;
        prefetch_group(c, x);
    }
    return SR_OK;
}

/* group_in for a key in the direct table's range. */
static inline int64_t direct_group_of(sr_ctx *c, int64_t key) {
    int32_t *slot = c->direct + (key - c->dmin);
    if (*slot) return *slot - 1;
    int64_t g = c->ngroups;
    if (reserve(c, g + 1) != SR_OK) return -1;
    c->keys[g] = key;
    c->ngroups = g + 1;
    *slot = (int32_t)(g + 1);
    return g;
}

/* Many groups: rows wait by partition. Once a part's hash holds DEFER_GROUPS groups, their
 * moments outgrow the CPU's caches and each row's update waited on memory, prefetched or
 * not. From then on sr_keys (and sr_csv) append each row to one of NPART buffers, chosen
 * by the top bits of its key's hash, and when one is full (and before the groups are read:
 * sr_groups) take every waiting row in, a partition at a time. Each partition has a hash
 * table of its own and the groups it adds get consecutive moments, so while a partition's
 * rows are taken in, its table and its groups stay in the cache. Each group still takes
 * its rows in row order: the same bits; only the groups' order differs. */

static inline int part_of(int64_t key) { return (int)(hash_of(key) >> (64 - PART_BITS)); }

/* The partitions' tables, holding the groups so far, and their empty buffers. */
static int defer_start(sr_ctx *c) {
    if (!(c->parts = calloc(NPART, sizeof *c->parts))) return SR_NOMEM;
    for (int p = 0; p < NPART; p++)
        if (hash_init(&c->parts[p], 6, PART_BITS) != SR_OK) return SR_NOMEM;
    for (int64_t g = 0; g < c->ngroups; g++) {
        hash_t *t = &c->parts[part_of(c->keys[g])];
        hash_put(t, c->keys[g], g + 1);
        if (2 * t->used > t->size && hash_grow(t) != SR_OK) return SR_NOMEM;
    }
    size_t width = 4 * (size_t)BLOCKS(c->nvalues);
    size_t cap = c->defer_bytes / (NPART * (sizeof(int64_t) + width * sizeof(double)));
    c->wcap = cap < 64 ? 64 : (int64_t)cap;
    size_t nkeys = NPART * (size_t)c->wcap;
    size_t bytes = nkeys * (sizeof(int64_t) + width * sizeof(double));
    struct thread_mem *m = thread_mem();
    struct wait_buffer *w = m ? m->wait : NULL;
    if (m && !w && (w = m->wait = calloc(1, sizeof *w))) atomic_init(&w->state, WAIT_IDLE);
    if (!w || atomic_load(&w->state) == WAIT_LENT) {
        /* another context of this thread has it (or the thread has none): one of its own */
        if (!(w = calloc(1, sizeof *w))) return SR_NOMEM;
        c->wown = 1;
    }
    c->wbuf = w;
    atomic_store(&w->state, WAIT_LENT);
    if (w->bytes < bytes) {
        atomic_fetch_sub(&kept_bytes, (long long)w->bytes);
        free(w->mem);
        w->bytes = 0;
        if (!(w->mem = malloc(bytes))) return SR_NOMEM;
        w->bytes = bytes;
        atomic_fetch_add(&kept_bytes, (long long)bytes);
    }
    c->wkeys = w->mem;
    c->wvals = (double *)(c->wkeys + nkeys);
    c->wfill = calloc(NPART, sizeof *c->wfill);
    return c->wfill ? SR_OK : SR_NOMEM;
}

/* Every waiting row into its group, a partition at a time, in row order within each. */
static inline __attribute__((always_inline)) int flush_rows(sr_ctx *c, int vec) {
    int nv = c->nvalues;
    size_t width = 4 * (size_t)BLOCKS(nv);
    int64_t gs[BATCH];
    for (int p = 0; p < NPART; p++) {
        const int64_t *keys = c->wkeys + (size_t)p * (size_t)c->wcap;
        const double *vals = c->wvals + (size_t)p * (size_t)c->wcap * width;
        for (int64_t r0 = 0; r0 < c->wfill[p]; r0 += BATCH) {
            int m = c->wfill[p] - r0 < BATCH ? (int)(c->wfill[p] - r0) : BATCH;
            if (batch_groups(c, &c->parts[p], keys + r0, NULL, m, 0, gs) != SR_OK) return SR_NOMEM;
            for (int b = 0; b < m; b++) {
                c->rows[gs[b]] += 1;
                update_row(c->acc + (size_t)gs[b] * (size_t)BLOCKS(nv), vals + (size_t)(r0 + b) * width, nv, vec);
            }
        }
        c->wfill[p] = 0;
    }
    return SR_OK;
}
#if SR_VECTOR
SR_AVX2 static int flush_avx2(sr_ctx *c) { return flush_rows(c, 1); }
#endif
static int flush_lanes(sr_ctx *c) { return flush_rows(c, 0); }
static int flush_waiting(sr_ctx *c) {
    if (!c->wfill) return SR_OK;
#if SR_VECTOR
    if (c->vector) return flush_avx2(c);
#endif
    return flush_lanes(c);
}

/* Whether rows of the hash wait by partition from now on (defer_start done); -1: out of
 * memory. */
static inline int deferring(sr_ctx *c) {
    if (c->wfill) return 1;
    if (c->ngroups < c->defer_groups) return 0;
    return defer_start(c) == SR_OK ? 1 : -1;
}

/* Where key's row waits (4 x BLOCKS(nvalues) values to fill), its partition's rows taken
 * in first when it is full; NULL when out of memory. */
static inline double *wait_slot(sr_ctx *c, int64_t key) {
    int p = part_of(key);
    if (c->wfill[p] == c->wcap && flush_waiting(c) != SR_OK) return NULL;
    size_t r = (size_t)p * (size_t)c->wcap + (size_t)c->wfill[p]++;
    c->wkeys[r] = key;
    return c->wvals + r * 4 * (size_t)BLOCKS(c->nvalues);
}

/* Rows i0.. of keys (hash mode) to wait in their partitions. */
static int defer_rows(sr_ctx *c, const int64_t *keys, int64_t i0, int64_t n, const double *const *cols) {
    int nv = c->nvalues, width = 4 * BLOCKS(nv);
    for (int64_t i = i0; i < n; i++) {
        double *row = wait_slot(c, keys[i]);
        if (!row) return SR_NOMEM;
        int j = 0;
        for (; j < nv; j++) row[j] = cols[j][i];
        for (; j < width; j++) row[j] = NAN;
    }
    return SR_OK;
}

/* The number of groups, every waiting row taken in first (-1: out of memory). */
int64_t sr_groups(sr_ctx *c) { return flush_waiting(c) == SR_OK ? c->ngroups : -1; }

/* Rows keyed by any int64 values (a key column pyarrow read): grouped by hashing, or by
 * indexing when the keys span a small range. Groups in first-seen order, but for rows that
 * waited by partition (defer_rows): their new groups in first-seen order per partition. */
static inline __attribute__((always_inline)) int keys_rows(sr_ctx *c, const int64_t *keys, int64_t n,
                                                           const double *const *values, int vec) {
    int nv = c->nvalues;
    if (c->direct) {
        for (int64_t i = 0; i < n; i++) {
            int64_t g = direct_group_of(c, keys[i]);
            if (g < 0) return SR_NOMEM;
            c->rows[g] += 1;
            update_columns(c->acc + (size_t)g * (size_t)BLOCKS(nv), values, i, nv, vec);
        }
        return SR_OK;
    }
    int64_t gs[BATCH];
    int64_t i0 = 0;
    int waiting = 0;
    for (; i0 < n && !(waiting = deferring(c)); i0 += BATCH) {
        int m = n - i0 < BATCH ? (int)(n - i0) : BATCH;
        if (batch_groups(c, &c->table, keys + i0, NULL, m, 1, gs) != SR_OK) return SR_NOMEM;
        for (int b = 0; b < m; b++) {
            c->rows[gs[b]] += 1;
            update_columns(c->acc + (size_t)gs[b] * (size_t)BLOCKS(nv), values, i0 + b, nv, vec);
        }
    }
    if (waiting < 0) return SR_NOMEM;
    return i0 < n ? defer_rows(c, keys, i0, n, values) : SR_OK;
}
#if SR_VECTOR
SR_AVX2 static int keys_avx2(sr_ctx *c, const int64_t *keys, int64_t n, const double *const *values) {
    return keys_rows(c, keys, n, values, 1);
}
#endif
static int keys_lanes(sr_ctx *c, const int64_t *keys, int64_t n, const double *const *values) {
    return keys_rows(c, keys, n, values, 0);
}

/* Keys spanning fewer than this many values are grouped through a direct table. */
#define DIRECT_SPAN (1 << 16)

/* Ready the lookup for keys in [lo, hi] besides those seen: the direct table, grown to
 * cover them while the span stays small, else the hash (every group so far moved in). */
static int prepare_keys(sr_ctx *c, int64_t lo, int64_t hi) {
    if (c->table.slot) return SR_OK;
    if (c->direct) {
        lo = lo < c->dmin ? lo : c->dmin;
        hi = hi > c->dmax ? hi : c->dmax;
        if (lo == c->dmin && hi == c->dmax) return SR_OK;
    } else if (c->ngroups) {
        return SR_BADARG; /* a context sr_codes filled */
    }
    free(c->direct);
    c->direct = NULL;
    if ((uint64_t)hi - (uint64_t)lo < DIRECT_SPAN) {
        c->direct = calloc((size_t)((uint64_t)hi - (uint64_t)lo + 1), sizeof *c->direct);
        if (!c->direct) return SR_NOMEM;
        c->dmin = lo;
        c->dmax = hi;
        for (int64_t g = 0; g < c->ngroups; g++) c->direct[c->keys[g] - lo] = (int32_t)(g + 1);
        return SR_OK;
    }
    int bits = 11;
    while (2 * c->ngroups > (int64_t)1 << bits) bits++;
    if (hash_init(&c->table, bits, 0) != SR_OK) return SR_NOMEM;
    for (int64_t g = 0; g < c->ngroups; g++) hash_put(&c->table, c->keys[g], g + 1);
    return SR_OK;
}

/* May be called again on the same context with more rows (a part read in batches). */
int sr_keys(sr_ctx *c, const int64_t *keys, int64_t n, const double *const *values) {
    if (n <= 0) return SR_OK;
    int64_t lo = keys[0], hi = lo;
    for (int64_t i = 1; i < n; i++) {
        lo = keys[i] < lo ? keys[i] : lo;
        hi = keys[i] > hi ? keys[i] : hi;
    }
    int status = prepare_keys(c, lo, hi);
    if (status != SR_OK) return status;
#if SR_VECTOR
    if (c->vector) return keys_avx2(c, keys, n, values);
#endif
    return keys_lanes(c, keys, n, values);
}

/* ---- numbers ------------------------------------------------------------------------- */

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

#if LDBL_MANT_DIG == 64
/* 10^0 .. 10^27 are exact in x87 extended precision (5^27 < 2^64). */
static const long double POW10L[28] = {1e0L, 1e1L, 1e2L, 1e3L, 1e4L, 1e5L, 1e6L, 1e7L, 1e8L, 1e9L, 1e10L, 1e11L, 1e12L, 1e13L, 1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L, 1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};
#endif

/* 5^q for q in [POW5_MIN, POW5_MAX] to 128 bits, {high word, low word}, the top bit set:
 * for q >= 0, 5^q shifted left (exact); for q < 0, floor(2^b / 5^-q) + 1 with b the
 * smallest exponent that gives 128 bits (rounded up). Made by:
 *   for q in range(-27, 28):
 *       if q >= 0: c = 5**q << (128 - (5**q).bit_length())
 *       else: z = (5**-q - 1).bit_length(); c = 2**(z + 127) // 5**-q + 1 */
#define POW5_MIN (-27)
#define POW5_MAX 27
static const uint64_t POW5_128[POW5_MAX - POW5_MIN + 1][2] = {
    {0x9e74d1b791e07e48ull, 0x775ea264cf55347eull}, /* -27 */
    {0xc612062576589ddaull, 0x95364afe032a819eull}, /* -26 */
    {0xf79687aed3eec551ull, 0x3a83ddbd83f52205ull}, /* -25 */
    {0x9abe14cd44753b52ull, 0xc4926a9672793543ull}, /* -24 */
    {0xc16d9a0095928a27ull, 0x75b7053c0f178294ull}, /* -23 */
    {0xf1c90080baf72cb1ull, 0x5324c68b12dd6339ull}, /* -22 */
    {0x971da05074da7beeull, 0xd3f6fc16ebca5e04ull}, /* -21 */
    {0xbce5086492111aeaull, 0x88f4bb1ca6bcf585ull}, /* -20 */
    {0xec1e4a7db69561a5ull, 0x2b31e9e3d06c32e6ull}, /* -19 */
    {0x9392ee8e921d5d07ull, 0x3aff322e62439fd0ull}, /* -18 */
    {0xb877aa3236a4b449ull, 0x09befeb9fad487c3ull}, /* -17 */
    {0xe69594bec44de15bull, 0x4c2ebe687989a9b4ull}, /* -16 */
    {0x901d7cf73ab0acd9ull, 0x0f9d37014bf60a11ull}, /* -15 */
    {0xb424dc35095cd80full, 0x538484c19ef38c95ull}, /* -14 */
    {0xe12e13424bb40e13ull, 0x2865a5f206b06fbaull}, /* -13 */
    {0x8cbccc096f5088cbull, 0xf93f87b7442e45d4ull}, /* -12 */
    {0xafebff0bcb24aafeull, 0xf78f69a51539d749ull}, /* -11 */
    {0xdbe6fecebdedd5beull, 0xb573440e5a884d1cull}, /* -10 */
    {0x89705f4136b4a597ull, 0x31680a88f8953031ull}, /* -9 */
    {0xabcc77118461cefcull, 0xfdc20d2b36ba7c3eull}, /* -8 */
    {0xd6bf94d5e57a42bcull, 0x3d32907604691b4dull}, /* -7 */
    {0x8637bd05af6c69b5ull, 0xa63f9a49c2c1b110ull}, /* -6 */
    {0xa7c5ac471b478423ull, 0x0fcf80dc33721d54ull}, /* -5 */
    {0xd1b71758e219652bull, 0xd3c36113404ea4a9ull}, /* -4 */
    {0x83126e978d4fdf3bull, 0x645a1cac083126eaull}, /* -3 */
    {0xa3d70a3d70a3d70aull, 0x3d70a3d70a3d70a4ull}, /* -2 */
    {0xccccccccccccccccull, 0xcccccccccccccccdull}, /* -1 */
    {0x8000000000000000ull, 0x0000000000000000ull}, /* 0 */
    {0xa000000000000000ull, 0x0000000000000000ull}, /* 1 */
    {0xc800000000000000ull, 0x0000000000000000ull}, /* 2 */
    {0xfa00000000000000ull, 0x0000000000000000ull}, /* 3 */
    {0x9c40000000000000ull, 0x0000000000000000ull}, /* 4 */
    {0xc350000000000000ull, 0x0000000000000000ull}, /* 5 */
    {0xf424000000000000ull, 0x0000000000000000ull}, /* 6 */
    {0x9896800000000000ull, 0x0000000000000000ull}, /* 7 */
    {0xbebc200000000000ull, 0x0000000000000000ull}, /* 8 */
    {0xee6b280000000000ull, 0x0000000000000000ull}, /* 9 */
    {0x9502f90000000000ull, 0x0000000000000000ull}, /* 10 */
    {0xba43b74000000000ull, 0x0000000000000000ull}, /* 11 */
    {0xe8d4a51000000000ull, 0x0000000000000000ull}, /* 12 */
    {0x9184e72a00000000ull, 0x0000000000000000ull}, /* 13 */
    {0xb5e620f480000000ull, 0x0000000000000000ull}, /* 14 */
    {0xe35fa931a0000000ull, 0x0000000000000000ull}, /* 15 */
    {0x8e1bc9bf04000000ull, 0x0000000000000000ull}, /* 16 */
    {0xb1a2bc2ec5000000ull, 0x0000000000000000ull}, /* 17 */
    {0xde0b6b3a76400000ull, 0x0000000000000000ull}, /* 18 */
    {0x8ac7230489e80000ull, 0x0000000000000000ull}, /* 19 */
    {0xad78ebc5ac620000ull, 0x0000000000000000ull}, /* 20 */
    {0xd8d726b7177a8000ull, 0x0000000000000000ull}, /* 21 */
    {0x878678326eac9000ull, 0x0000000000000000ull}, /* 22 */
    {0xa968163f0a57b400ull, 0x0000000000000000ull}, /* 23 */
    {0xd3c21bcecceda100ull, 0x0000000000000000ull}, /* 24 */
    {0x84595161401484a0ull, 0x0000000000000000ull}, /* 25 */
    {0xa56fa5b99019a5c8ull, 0x0000000000000000ull}, /* 26 */
    {0xcecb8f27f4200f3aull, 0x0000000000000000ull}, /* 27 */
};

/* m x 10^q (0 < m < 2^64) as the nearest double, ties to even, by the Eisel-Lemire method
 * (as in fast_float): m normalised times 5^q to 128 bits, the power of two from q. 0 and
 * *out set; -1 where the truncated product cannot decide the rounding, or the result
 * would not be a normal double: the caller then takes another way. */
static inline int eisel_lemire(uint64_t m, int q, double *out) {
    if (q < POW5_MIN || q > POW5_MAX) return -1;
    int lz = __builtin_clzll(m);
    uint64_t w = m << lz;
    const uint64_t *p = POW5_128[q - POW5_MIN];
    unsigned __int128 first = (unsigned __int128)w * p[0];
    uint64_t hi = (uint64_t)(first >> 64), lo = (uint64_t)first;
    if ((hi & 0x1FF) == 0x1FF) { /* the bits below the 55 kept may carry: add the low word's product */
        uint64_t carry = (uint64_t)(((unsigned __int128)w * p[1]) >> 64);
        lo += carry;
        if (lo < carry) hi++;
        if (lo == UINT64_MAX) return -1;
    }
    int upper = (int)(hi >> 63);
    int shift = upper + 64 - 52 - 3;
    uint64_t mant = hi >> shift;
    /* floor(q log2(5)) + q + 63, exact for |q| < 350 */
    int power2 = ((((152170 + 65536) * q) >> 16) + 63) + upper - lz + 1023;
    if (power2 <= 0) return -1;
    /* exactly halfway (only possible for small q): round to even, not up */
    if (lo <= 1 && q >= -4 && q <= 23 && (mant & 3) == 1 && (mant << shift) == hi) mant &= ~1ull;
    mant += mant & 1;
    mant >>= 1;
    if (mant >= (2ull << 52)) {
        mant = 1ull << 52;
        power2++;
    }
    if (power2 >= 0x7FF) return -1;
    uint64_t bits = (mant & ~(1ull << 52)) | ((uint64_t)power2 << 52);
    memcpy(out, &bits, sizeof bits);
    return 0;
}

/* m x 10^e10 (m < 10^19, m > 0) correctly rounded; text is the field for strtod.
 * Eisel-Lemire first, for every m: one path for numbers of 16 and of 17 digits alike (a
 * branch between Clinger's and another on m <= 2^53 is a coin toss on data written by
 * repr, mispredicted on half the values). */
static double to_double(uint64_t m, int e10, const char *text, size_t len) {
    double v;
    if (eisel_lemire(m, e10, &v) == 0) return v;
    if (m <= (1ull << 53) && e10 >= -22 && e10 <= 22)
        return e10 >= 0 ? (double)m * POW10[e10] : (double)m / POW10[-e10];
#if LDBL_MANT_DIG == 64
    if (e10 >= -27 && e10 <= 27) {
        long double p = POW10L[e10 >= 0 ? e10 : -e10];
        volatile long double r = e10 >= 0 ? (long double)m * p : (long double)m / p;
        uint64_t bits;
        memcpy(&bits, (const void *)&r, sizeof bits); /* the 64-bit significand */
        uint64_t low = bits & 0x7FF;
        if (low < 0x3FF || low > 0x401) return (double)r;
    }
#endif
    char buf[MAX_NUMBER_TEXT + 1];
    memcpy(buf, text, len);
    buf[len] = '\0';
    return strtod(buf, NULL);
}

/* SWAR digit parsing (the tricks of fast_float and simdjson), on little-endian loads. */
static const uint64_t POW10U[9] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000};

/* The value of eight ASCII digits, the first in the lowest byte. */
static inline uint64_t eight_digits_value(uint64_t v) {
    const uint64_t mask = 0x000000FF000000FFull;
    const uint64_t mul1 = 0x000F424000000064ull; /* 100 + (1000000 << 32) */
    const uint64_t mul2 = 0x0000271000000001ull; /* 1 + (10000 << 32) */
    v -= 0x3030303030303030ull;
    v = (v * 10) + (v >> 8);
    v = (((v & mask) * mul1) + (((v >> 16) & mask) * mul2)) >> 32;
    return v;
}

/* How many of the eight bytes, from the lowest, are ASCII digits before the first other. */
static inline int leading_digits(uint64_t v) {
    uint64_t t = v ^ 0x3030303030303030ull;
    /* per byte: a high nibble left, or a low nibble above 9: not a digit (0x10..0xF0) */
    uint64_t bad = (t & 0xF0F0F0F0F0F0F0F0ull) | (((t & 0x0F0F0F0F0F0F0F0Full) + 0x0606060606060606ull) & 0xF0F0F0F0F0F0F0F0ull);
    uint64_t hit = ((bad >> 1) + 0x7F7F7F7F7F7F7F7Full) & 0x8080808080808080ull;
    return hit ? __builtin_ctzll(hit) >> 3 : 8;
}

/* Digits from q on, into *m (which wraps past 19 digits: the caller counts them). */
static inline const char *digits_into(const char *q, const char *end, uint64_t *m) {
    while (end - q >= 8) {
        uint64_t v;
        memcpy(&v, q, 8);
        int k = leading_digits(v);
        if (k == 8) {
            *m = *m * 100000000ull + eight_digits_value(v);
            q += 8;
            continue;
        }
        if (k) {
            /* the k digits to the top, '0's below them */
            int shift = 8 * (8 - k);
            v = (v << shift) | (0x3030303030303030ull >> (64 - shift));
            *m = *m * POW10U[k] + eight_digits_value(v);
        }
        return q + k;
    }
    while (q < end && (unsigned)(*q - '0') < 10) {
        *m = *m * 10 + (uint64_t)(*q - '0');
        q++;
    }
    return q;
}

/* A float64 number: [-]digits[.digits][(e|E)[+|-]digits] with at least one mantissa
 * digit, finite and not subnormal. Anything else (an empty cell included) is not. */
static inline int parse_value(const char *p, const char *end, const char **after, double *out) {
    const char *q = p;
    int neg = 0;
    if (*q == '-') {
        neg = 1;
        q++;
    }
    const char *num = q;
    uint64_t m = 0;
    while (q < end && (unsigned)(*q - '0') < 10) m = m * 10 + (uint64_t)(*q++ - '0');
    int64_t digits = q - num, frac = 0;
    if (q < end && *q == '.') {
        const char *f = ++q;
        q = digits_into(q, end, &m);
        frac = q - f;
        digits += frac;
    }
    if (digits == 0) return SR_UNSUPPORTED;
    const char *mantissa_end = q;
    int exp = 0;
    if (q < end && (*q == 'e' || *q == 'E')) {
        q++;
        int eneg = 0;
        if (q < end && (*q == '+' || *q == '-')) eneg = *q++ == '-';
        int ed = 0;
        while (q < end && (unsigned)(*q - '0') < 10) {
            if (++ed > 4) return SR_UNSUPPORTED;
            exp = exp * 10 + (*q - '0');
            q++;
        }
        if (ed == 0) return SR_UNSUPPORTED;
        if (eneg) exp = -exp;
    }
    size_t len = (size_t)(q - num);
    if (len > MAX_NUMBER_TEXT) return SR_UNSUPPORTED;
    int exact = digits <= 19;
    if (!exact) {
        /* m wrapped: it holds every digit only if the leading zeros make up the excess. */
        int sig = 0;
        m = 0;
        for (const char *d = num; d < mantissa_end; d++) {
            if (*d == '.' || (m == 0 && *d == '0')) continue;
            if (++sig > 19) break;
            m = m * 10 + (uint64_t)(*d - '0');
        }
        exact = sig <= 19;
    }
    double v = 0.0;
    if (!exact) {
        char text[MAX_NUMBER_TEXT + 1];
        memcpy(text, num, len);
        text[len] = '\0';
        v = strtod(text, NULL);
    } else if (m) {
        v = to_double(m, exp - (int)frac, num, len);
    }
    if (v != 0.0 && !(fabs(v) >= DBL_MIN && fabs(v) <= DBL_MAX)) return SR_UNSUPPORTED;
    *out = neg ? -v : v;
    *after = q;
    return SR_OK;
}

/* An int64 cell: [-]digits, 1 to 18 digits (no overflow possible). */
static inline int parse_key(const char *p, const char *end, const char **after, int64_t *out) {
    const char *q = p;
    int neg = 0;
    if (q < end && *q == '-') {
        neg = 1;
        q++;
    }
    const char *d = q;
    int64_t m = 0;
    while (q < end && (unsigned)(*q - '0') < 10) {
        m = m * 10 + (*q - '0');
        q++;
    }
    if (q == d || q - d > 18) return SR_UNSUPPORTED;
    *out = neg ? -m : m;
    *after = q;
    return SR_OK;
}

/* ---- missing values ------------------------------------------------------------------ */

static inline int field_end(const char *q, const char *end) {
    return q == end || *q == ',' || *q == '\n' || *q == '\r';
}

/* Whether the cell at p is one of the missing-value spellings; *after is then its end. A
 * cell that holds a quote never is: pyarrow unquotes it first. Off the numbers' path: only
 * a cell that is not a plain number (or an empty one) is looked up here. */
static int na_cell(const sr_ctx *c, const char *p, const char *end, const char **after) {
    const char *q = p;
    while (!field_end(q, end)) {
        if (*q == '"') return 0;
        q++;
    }
    size_t n = (size_t)(q - p);
    int hit = n == 0 ? c->na_empty : 0;
    for (const char *s = c->na, *stop = c->na + c->na_len; !hit && s < stop;) {
        size_t k = strlen(s);
        hit = k == n && memcmp(s, p, n) == 0;
        s += k + 1;
    }
    if (hit) *after = q;
    return hit;
}

/* A value cell: a plain number, or NaN where it is a missing-value spelling. */
static inline int value_cell(const sr_ctx *c, const char *p, const char *end, const char **after, double *out) {
    if (parse_value(p, end, after, out) == SR_OK && field_end(*after, end)) return SR_OK;
    if (!na_cell(c, p, end, after)) return SR_UNSUPPORTED;
    *out = NAN;
    return SR_OK;
}

/* ---- CSV ----------------------------------------------------------------------------- */

/* sr_csv's records, once its roles are checked. */
static inline __attribute__((always_inline)) int csv_rows(sr_ctx *c, const char *buf, int64_t len, int64_t start,
                                                          const int8_t *roles, int nfields, int vec) {
    int nv = c->nvalues;
    int stride = 4 * BLOCKS(nv); /* a row's values, NaN beyond the value columns (update_row) */
    const char *p = buf + start, *end = buf + len;
    double vals[BATCH * MAX_VALUES];
    for (int j = 0; j < BATCH * MAX_VALUES; j++) vals[j] = NAN;
    int64_t keys[BATCH], gs[BATCH];
    unsigned char keyless[BATCH];
    int m = 0; /* rows parsed, not yet grouped */
    for (;;) {
        if (m == BATCH || (p >= end && m > 0)) {
            int waiting = deferring(c);
            if (waiting < 0) return SR_NOMEM;
            if (waiting) {
                for (int b = 0; b < m; b++) {
                    if (keyless[b]) continue;
                    double *row = wait_slot(c, keys[b]);
                    if (!row) return SR_NOMEM;
                    memcpy(row, vals + b * stride, (size_t)stride * sizeof *row);
                }
            } else {
                if (batch_groups(c, &c->table, keys, keyless, m, 1, gs) != SR_OK) return SR_NOMEM;
                for (int b = 0; b < m; b++) {
                    if (gs[b] < 0) continue;
                    c->rows[gs[b]] += 1;
                    update_row(c->acc + (size_t)gs[b] * (size_t)BLOCKS(nv), vals + b * stride, nv, vec);
                }
            }
            m = 0;
        }
        if (p >= end) break;
        if (*p == '\n') {
            p++;
            continue;
        }
        if (*p == '\r') {
            if (p + 1 < end && p[1] == '\n') {
                p += 2;
                continue;
            }
            return SR_UNSUPPORTED;
        }
        int64_t key = 0;
        int nokey = 0; /* the key cell is a missing value: the row is in no group */
        double *row = vals + m * stride;
        for (int f = 0; f < nfields; f++) {
            const char *q = p;
            int role = roles[f];
            if (role == ROLE_SKIP) {
                while (q < end && *q != ',' && *q != '\n' && *q != '\r') {
                    if (*q == '"') return SR_UNSUPPORTED;
                    q++;
                }
            } else if (role == ROLE_KEY) {
                if (parse_key(p, end, &q, &key) != SR_OK || !field_end(q, end)) {
                    if (!na_cell(c, p, end, &q)) return SR_UNSUPPORTED;
                    nokey = 1;
                }
            } else if (value_cell(c, p, end, &q, &row[role]) != SR_OK) {
                return SR_UNSUPPORTED;
            }
            if (f < nfields - 1) {
                if (q >= end || *q != ',') return SR_UNSUPPORTED;
                p = q + 1;
            } else {
                if (q < end) {
                    if (*q == '\n') q++;
                    else if (*q == '\r' && q + 1 < end && q[1] == '\n') q += 2;
                    else return SR_UNSUPPORTED;
                }
                p = q;
            }
        }
        keys[m] = key;
        keyless[m] = (unsigned char)nokey;
        c->keyless += nokey;
        m++;
    }
    return SR_OK;
}
#if SR_VECTOR
SR_AVX2 static int csv_avx2(sr_ctx *c, const char *buf, int64_t len, int64_t start, const int8_t *roles,
                            int nfields) {
    return csv_rows(c, buf, len, start, roles, nfields, 1);
}
#endif
static int csv_lanes(sr_ctx *c, const char *buf, int64_t len, int64_t start, const int8_t *roles, int nfields) {
    return csv_rows(c, buf, len, start, roles, nfields, 0);
}

/* Aggregate the records of buf[start:len]. roles[f] says what field f of every record is:
 * ROLE_SKIP, ROLE_KEY or the index of a value column. Blank lines are skipped, as pyarrow
 * does; records end with \n or \r\n. Missing values are those sr_na gave. */
int sr_csv(sr_ctx *c, const char *buf, int64_t len, int64_t start, const int8_t *roles, int nfields) {
    int nv = c->nvalues;
    int keys = 0, seen[MAX_VALUES] = {0};
    for (int f = 0; f < nfields; f++) {
        if (roles[f] == ROLE_KEY) keys++;
        else if (roles[f] >= 0 && roles[f] < nv) seen[roles[f]]++;
        else if (roles[f] != ROLE_SKIP) return SR_UNSUPPORTED;
    }
    if (keys != 1) return SR_UNSUPPORTED;
    for (int j = 0; j < nv; j++)
        if (seen[j] != 1) return SR_UNSUPPORTED;
    if (!c->table.slot && hash_init(&c->table, 11, 0) != SR_OK) return SR_NOMEM;
#if SR_VECTOR
    if (c->vector) return csv_avx2(c, buf, len, start, roles, nfields);
#endif
    return csv_lanes(c, buf, len, start, roles, nfields);
}

/* ---- results ------------------------------------------------------------------------- */

/* Per group: key and rows; per group and value column (group-major): non-NaN count, mean
 * (compensated sum / count), M2, min, max; NaN moments where a group has no value. */
void sr_export(const sr_ctx *c, int64_t *keys, int64_t *rows, int64_t *count, double *mean, double *m2,
               double *min, double *max) {
    int nv = c->nvalues;
    for (int64_t g = 0; g < c->ngroups; g++) {
        keys[g] = c->keys[g];
        rows[g] = c->rows[g];
        for (int j = 0; j < nv; j++) {
            size_t i = (size_t)g * (size_t)nv + (size_t)j;
            const blk_t *b = c->acc + (size_t)g * (size_t)BLOCKS(nv) + (size_t)(j >> 2);
            int l = j & 3;
            double n = b->nobs[l];
            count[i] = (int64_t)n;
            if (n == 0.0) {
                mean[i] = m2[i] = min[i] = max[i] = NAN;
            } else {
                mean[i] = b->sum[l] / n;
                m2[i] = b->m2[l];
                min[i] = b->min[l];
                max[i] = b->max[l];
            }
        }
    }
}

/* ---- merging partials ------------------------------------------------------------------ */

/* Chan et al.'s combination of partials' moments into k groups, as stats._merge_tables
 * computes it with NumPy, operation for operation and in the same order (bincount adds a
 * row's term to its group in row order; fmin.at and fmax.at likewise), so the same bits,
 * without its temporaries: a merge of 20 partials of 100,000 groups made two dozen arrays
 * of 2,000,000 values each.
 *
 * The rows are nparts partials' rows one after another (lengths[p] each) with their group
 * codes (-1: in no group). cols[p * (1 + 5 * nv) + f] is partial p's field f as float64:
 * rows, then per value column count, mean, M2, min, max. out[f] (k values each, same fields)
 * receives the merge: rows and counts as float64 sums. For each value column, with
 * w = count > 0 and mw = w ? mean : 0:
 *   n = sum(count), mean0 = sum(count * mw) / n, corr = sum(count * (w ? mw - mean0 : 0)) / n,
 *   mean = finite(mean0) ? mean0 + corr : mean0, M2 = sum(w ? M2 + count * (mw - mean)^2 : 0)
 *   (NaN where n == 0), min = fmin of the mins, max = fmax of the maxes (NaN to start). */
int sr_merge(int64_t nparts, const int64_t *lengths, const int64_t *codes, int64_t k, int nv,
             const double *const *cols, double *const *out) {
    if (nv < 0 || nv > MAX_VALUES || k < 0) return SR_BADARG;
    int nf = 1 + 5 * nv;
    for (int f = 0; f < nf; f++) {
        int field = f == 0 ? 0 : (f - 1) % 5;
        double start = field == 3 || field == 4 ? NAN : 0.0; /* min, max */
        for (int64_t g = 0; g < k; g++) out[f][g] = f == 0 ? 0.0 : start;
    }
    for (int pass = 0; pass < 3; pass++) {
        const int64_t *code = codes;
        for (int64_t p = 0; p < nparts; p++) {
            const double *const *c = cols + p * nf;
            for (int64_t i = 0; i < lengths[p]; i++) {
                int64_t g = code[i];
                if (g < 0) continue;
                if (g >= k) return SR_BADARG;
                if (pass == 0) out[0][g] += c[0][i];
                for (int j = 0; j < nv; j++) {
                    const double *const *v = c + 1 + 5 * j;
                    double *const *o = out + 1 + 5 * j;
                    double n = v[0][i];
                    int w = n > 0;
                    double mw = w ? v[1][i] : 0.0;
                    if (pass == 0) {
                        o[0][g] += n;
                        o[1][g] += n * mw; /* then mean0 */
                        o[3][g] = fmin(o[3][g], v[3][i]);
                        o[4][g] = fmax(o[4][g], v[4][i]);
                    } else if (pass == 1) {
                        o[2][g] += n * (w ? mw - o[1][g] : 0.0); /* then the mean's correction */
                    } else {
                        double d = mw - o[1][g];
                        o[2][g] += w ? v[2][i] + n * (d * d) : 0.0;
                    }
                }
            }
            code += lengths[p];
        }
        for (int j = 0; j < nv; j++) {
            double *const *o = out + 1 + 5 * j;
            for (int64_t g = 0; g < k; g++) {
                double n = o[0][g];
                if (pass == 0) {
                    o[1][g] = o[1][g] / n;
                } else if (pass == 1) {
                    double mean0 = o[1][g], corr = o[2][g] / n;
                    o[1][g] = isfinite(mean0) ? mean0 + corr : mean0;
                    o[2][g] = 0.0;
                } else if (n == 0.0) {
                    o[2][g] = NAN;
                }
            }
        }
    }
    return SR_OK;
}
