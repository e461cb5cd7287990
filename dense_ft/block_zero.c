/* Zero the pruned blocks of many row-major matrices in one call, on the CPU.
 *
 * Each pruned block is block_size rows of block_size elements each, one matrix row apart.
 * They are written with non-temporal stores: a row of a block is a whole cache line or half
 * of one, and an ordinary store would first read the line it overwrites; with streaming
 * stores a scattered write of the pruned blocks runs at about the speed of one contiguous
 * memset of their bytes. Built by block_zero.py and called through ctypes.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
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
} share_t;

static void zero_bytes(char *p, int64_t n) {
#if defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    for (int64_t i = 0; i < n; i += 16) _mm_stream_si128((__m128i *)(p + i), zero);
#else
    memset(p, 0, (size_t)n);
#endif
}

static void zero_block(const matrix_t *m, int64_t k) {
    const int64_t *starts = (const int64_t *)(intptr_t)m->block_starts;
    char *corner = (char *)(intptr_t)m->data + starts[k] * m->element_bytes;
    int64_t block_bytes = m->block_size * m->element_bytes;
    for (int64_t r = 0; r < m->block_size; r++) zero_bytes(corner + r * m->row_bytes, block_bytes);
}

static void *zero_share(void *arg) {
    const share_t *share = arg;
    int64_t before = 0; /* blocks of the matrices before m */
    for (int64_t i = 0; i < share->num_matrices && before < share->last; i++) {
        const matrix_t *m = &share->matrices[i];
        int64_t start = share->first > before ? share->first - before : 0;
        int64_t stop = share->last - before < m->count ? share->last - before : m->count;
        for (int64_t k = start; k < stop; k++) zero_block(m, k);
        before += m->count;
    }
#if defined(__SSE2__)
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
    for (int t = 0; t < threads; t++) {
        shares[t] = (share_t){matrices, num_matrices, total * t / threads, total * (t + 1) / threads};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, zero_share, &shares[t]) == 0;
    zero_share(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else zero_share(&shares[t]);
    }
}
