/* Zero the pruned blocks of many row-major matrices in one call, on the CPU.
 *
 * Each pruned block is block_size rows of block_size elements each, one matrix row apart.
 * They are written with non-temporal stores: a row of a block is a whole cache line or half
 * of one, and an ordinary store would first read the line it overwrites; with streaming
 * stores a scattered write of the pruned blocks runs near the speed of one contiguous
 * memset of their bytes. Neighbouring blocks are written as one span (two half lines make a
 * whole one), with 32-byte stores where the CPU has AVX2.
 *
 * The order that is fastest depends on the CPU (BENCHMARKS.md, "Which order on which CPU"):
 * block by block on two AMD EPYC VMs, where writing each block row row by row in address
 * order took 1.65-2.6x as long in float32; row by row on an Intel Xeon, where it took a sixth
 * off. ORDER_CPU picks by vendor; the others force one, for tests and benchmarks. Likewise
 * wide_stores = 0 keeps to the 16-byte stores of CPUs without AVX2, so that tests run them anywhere.
 * Built by block_zero.py and called through ctypes.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MAX_THREADS 64
#define MIN_BLOCKS_PER_THREAD 256 /* a thread is worth starting for about 256 KB of float32 blocks */

/* One matrix: every field is an int64, so that Python passes the whole table as one array. */
typedef struct {
    int64_t data;          /* address of element (0, 0) */
    int64_t row_bytes;     /* bytes from one row to the next */
    int64_t element_bytes; /* bytes of one element */
    int64_t block_size;    /* rows and columns of a block; block_size * element_bytes is a multiple of 16 */
    int64_t block_starts;  /* address of count int64: the flat index of each block's top-left element */
    int64_t count;         /* pruned blocks */
} matrix_t;

typedef void (*zero_range_t)(const matrix_t *, int64_t, int64_t); /* blocks [start, stop) of one matrix */

typedef struct {
    const matrix_t *matrices;
    int64_t num_matrices;
    int64_t first, last; /* this thread's share: blocks [first, last) counted over all matrices */
    zero_range_t zero_range;
} share_t;

#if defined(__x86_64__)
static inline void zero_span_sse2(char *p, int64_t n) {
    const __m128i zero = _mm_setzero_si128();
    for (int64_t i = 0; i < n; i += 16) _mm_stream_si128((__m128i *)(p + i), zero);
}

/* n is a multiple of 16 and p 16-byte aligned: one 16-byte store up to 32-byte alignment, and one after. */
__attribute__((target("avx2"))) static inline void zero_span_avx2(char *p, int64_t n) {
    if ((intptr_t)p & 31) {
        _mm_stream_si128((__m128i *)p, _mm_setzero_si128());
        p += 16, n -= 16;
    }
    const __m256i zero = _mm256_setzero_si256();
    for (; n >= 32; p += 32, n -= 32) _mm256_stream_si256((__m256i *)p, zero);
    if (n) _mm_stream_si128((__m128i *)p, _mm_setzero_si128());
}
#else
static inline void zero_span_sse2(char *p, int64_t n) { memset(p, 0, (size_t)n); }
#endif

typedef void (*zero_span_t)(char *, int64_t);

enum { ORDER_CPU = 0, ORDER_BLOCKS = 1, ORDER_ROWS = 2 };

/* The end of the run of neighbouring blocks (one block row, side by side) that starts at block k. */
static inline int64_t run_end(const int64_t *starts, int64_t k, int64_t stop, int64_t block_size) {
    int64_t next = k + 1;
    while (next < stop && starts[next] == starts[next - 1] + block_size) next++;
    return next;
}

/* The helpers below are always inlined with a constant zero_span, so that each caller is compiled for its stores. */

/* Blocks [start, stop) of m, one run of neighbours after another, each run row by row. */
__attribute__((always_inline)) static inline void zero_in_block_order(const matrix_t *m, int64_t start,
                                                                      int64_t stop, zero_span_t zero_span) {
    const int64_t *starts = (const int64_t *)(intptr_t)m->block_starts;
    char *data = (char *)(intptr_t)m->data;
    int64_t block_bytes = m->block_size * m->element_bytes;
    for (int64_t k = start, next; k < stop; k = next) {
        next = run_end(starts, k, stop, m->block_size);
        char *corner = data + starts[k] * m->element_bytes;
        for (int64_t r = 0; r < m->block_size; r++) zero_span(corner + r * m->row_bytes, (next - k) * block_bytes);
    }
}

/* Blocks [start, stop) of m: the blocks of each block row together, row by row, in address order. */
__attribute__((always_inline)) static inline void zero_in_row_order(const matrix_t *m, int64_t start, int64_t stop,
                                                                    zero_span_t zero_span) {
    const int64_t *starts = (const int64_t *)(intptr_t)m->block_starts;
    char *data = (char *)(intptr_t)m->data;
    int64_t columns = m->row_bytes / m->element_bytes, band = columns * m->block_size; /* elements per block row */
    int64_t block_bytes = m->block_size * m->element_bytes;
    for (int64_t first = start, end; first < stop; first = end) {
        for (end = first + 1; end < stop && starts[end] / band == starts[first] / band; end++) {}
        for (int64_t r = 0; r < m->block_size; r++) {
            for (int64_t k = first, next; k < end; k = next) {
                next = run_end(starts, k, end, m->block_size);
                zero_span(data + (starts[k] + r * columns) * m->element_bytes, (next - k) * block_bytes);
            }
        }
    }
}

static void blocks_sse2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_in_block_order(m, start, stop, zero_span_sse2);
}

static void rows_sse2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_in_row_order(m, start, stop, zero_span_sse2);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void blocks_avx2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_in_block_order(m, start, stop, zero_span_avx2);
}

__attribute__((target("avx2"))) static void rows_avx2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_in_row_order(m, start, stop, zero_span_avx2);
}
#endif

static zero_range_t choose_zero_range(int order, int wide_stores) {
#if defined(__x86_64__)
    if (order == ORDER_CPU) order = __builtin_cpu_is("intel") ? ORDER_ROWS : ORDER_BLOCKS;
    if (wide_stores && __builtin_cpu_supports("avx2")) return order == ORDER_ROWS ? rows_avx2 : blocks_avx2;
#endif
    return order == ORDER_ROWS ? rows_sse2 : blocks_sse2;
}

static void *zero_share(void *arg) {
    const share_t *share = arg;
    int64_t before = 0; /* blocks of the matrices before m */
    for (int64_t i = 0; i < share->num_matrices && before < share->last; i++) {
        const matrix_t *m = &share->matrices[i];
        int64_t start = share->first > before ? share->first - before : 0;
        int64_t stop = share->last - before < m->count ? share->last - before : m->count;
        if (start < stop) share->zero_range(m, start, stop);
        before += m->count;
    }
#if defined(__x86_64__)
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before returning */
#endif
    return NULL;
}

void zero_blocks(const matrix_t *matrices, int64_t num_matrices, int threads, int order, int wide_stores) {
    int64_t total = 0;
    for (int64_t i = 0; i < num_matrices; i++) total += matrices[i].count;
    if (threads > total / MIN_BLOCKS_PER_THREAD) threads = (int)(total / MIN_BLOCKS_PER_THREAD);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    share_t shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    zero_range_t zero_range = choose_zero_range(order, wide_stores);
    for (int t = 0; t < threads; t++) {
        shares[t] = (share_t){matrices, num_matrices, total * t / threads, total * (t + 1) / threads, zero_range};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, zero_share, &shares[t]) == 0;
    zero_share(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else zero_share(&shares[t]);
    }
}
