/* Zero the pruned blocks of many row-major matrices in one call, on the CPU.
 *
 * Each pruned block is block_size rows of block_size elements each, one matrix row apart.
 * They are written with non-temporal stores: a row of a block is a whole cache line or half
 * of one, and an ordinary store would first read the line it overwrites; with streaming
 * stores a scattered write of the pruned blocks runs near the speed of one contiguous
 * memset of their bytes. The blocks of one block row are written row by row, neighbours as
 * one span, in address order; with 32-byte stores (AVX2, where the CPU has it) that took a
 * sixth off the time of writing block after block on an Intel Xeon (BENCHMARKS.md; not yet
 * measured on AMD). Built by block_zero.py and called through ctypes.
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

typedef struct {
    const matrix_t *matrices;
    int64_t num_matrices;
    int64_t first, last; /* this thread's share: blocks [first, last) counted over all matrices */
    void (*zero_range)(const matrix_t *, int64_t, int64_t);
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

/* Blocks [start, stop) of m: each run of them in one block row, row by row, a run of neighbours as one span.
 * Always inlined with a constant zero_span, so that each caller below is compiled for its own stores. */
__attribute__((always_inline)) static inline void zero_range(const matrix_t *m, int64_t start, int64_t stop,
                                                             zero_span_t zero_span) {
    const int64_t *starts = (const int64_t *)(intptr_t)m->block_starts;
    char *data = (char *)(intptr_t)m->data;
    int64_t columns = m->row_bytes / m->element_bytes, band = columns * m->block_size; /* elements per block row */
    int64_t block_bytes = m->block_size * m->element_bytes;
    for (int64_t first = start, end; first < stop; first = end) {
        for (end = first + 1; end < stop && starts[end] / band == starts[first] / band; end++) {}
        for (int64_t r = 0; r < m->block_size; r++) {
            for (int64_t k = first, next; k < end; k = next) {
                for (next = k + 1; next < end && starts[next] == starts[next - 1] + m->block_size; next++) {}
                zero_span(data + (starts[k] + r * columns) * m->element_bytes, (next - k) * block_bytes);
            }
        }
    }
}

static void zero_range_sse2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_range(m, start, stop, zero_span_sse2);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void zero_range_avx2(const matrix_t *m, int64_t start, int64_t stop) {
    zero_range(m, start, stop, zero_span_avx2);
}
#endif

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

void zero_blocks(const matrix_t *matrices, int64_t num_matrices, int threads) {
    int64_t total = 0;
    for (int64_t i = 0; i < num_matrices; i++) total += matrices[i].count;
    if (threads > total / MIN_BLOCKS_PER_THREAD) threads = (int)(total / MIN_BLOCKS_PER_THREAD);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    share_t shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    void (*zero_range)(const matrix_t *, int64_t, int64_t) = zero_range_sse2;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) zero_range = zero_range_avx2;
#endif
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
