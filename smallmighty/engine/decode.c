/* One decode step of a Llama-family model for a batch of sequences, in plain C with OpenMP.
 *
 * Why C: decoding one token is reading every weight once (118 MB for SmolLM2-135M at int8, 3.5 ms
 * on a quiet 2-core Zen 4). Run as torch operators the same step makes ~1,700 operator calls
 * (~4 ms of overhead on top), and torch's weight-only int8 kernel reads weights at about half of
 * memory speed. Here the whole step (every layer and the vocabulary projection) is one call: one
 * OpenMP parallel region, every matrix split by rows between the threads, software prefetch
 * ahead of the rows, and the small operations (RMSNorm, rotary embedding, attention, SwiGLU,
 * residual adds) done between or inside the matmuls.
 *
 * The layout is the one `smallmighty.engine.model` builds: q/k/v fused into one matrix with q
 * pre-scaled by 1/sqrt(head_dim) and each head's rotary pairs interleaved (x0, y0, x1, y1, ...);
 * gate/up fused; the cache of each layer is [batch, 2 * kv_heads, slots, head_dim] with keys in
 * the first kv_heads channels. Weights are float32 [out, in], int8 [out, in] with one scale per
 * row, or int4 records (`int4_native_records` in quantize.py): for each 16 output rows and 32
 * inputs, the rows' codes q in [0, 15] interleaved lane by lane, then their float16 scale and
 * low: w = q * scale + low.
 *
 * Numerics: float32 weights, and int8 ones without AVX-512 VNNI, are widened to float in registers
 * and multiplied by float32 activations, so results equal the dequantized weights times the
 * activations up to summation order. int8 with VNNI turns each activation row into 16-bit
 * integer codes against its largest magnitude (relative error < 2^-15 of that) for the integer
 * dot-product instruction. int4 turns each block of 32 activations into 15-bit codes against the
 * block's largest magnitude (relative error < 2^-15 of that), held as two 8-bit limbs for the
 * byte dot-product instruction, multiplies them by the 4-bit codes in integers, and adds `low`
 * times the block's exact float sum. (One 8-bit code per activation, llama.cpp's Q8 for its Q4
 * weights, cost +3% wikitext-2 perplexity on SmolLM2-135M.) A row's result never depends on the
 * other rows of the batch.
 *
 * The vector code uses GCC vector extensions; built with -march=native they become AVX-512 (or
 * AVX2, or NEON) instructions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef int8_t i8x64 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

enum { KIND_F32 = 0, KIND_INT8 = 1, KIND_INT4 = 2 };
/* Rows of activations multiplied per pass over a weight row: each weight load serves them all. */
#define MAXB 8
/* Most weight rows per pass (with few activation rows: more independent FMA chains). */
#define MAXR 4
#ifndef PREFETCH
#define PREFETCH 4096
#endif
/* int4 records: 16 output rows by 32 inputs, 256 bytes of codes then 16 + 16 float16 values. */
#define INT4_ROWS 16
#define INT4_BLOCK 32
#define INT4_RECORD 320
/* int4 activations: codes of up to +-16192 per block of 32 inputs (15 bits), as two 8-bit limbs. */
#define INT4_CODES 16192.0f

typedef struct {
    int32_t kind, out, in;
    const void *weight;  /* f32 [out, in] | int8 [out, in] | int4 records [out / 16, in / 32, 320] */
    const float *scale;  /* int8: [out] */
    const float *bias;   /* [out] or NULL */
} Linear;

typedef struct {
    Linear qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;
} Layer;

typedef struct {
    int32_t hidden, inter, heads, kv_heads, head_dim, layers, vocab;
    float eps;
    const Layer *layer;
    const float *norm;
    Linear lm_head;
} Model;

/* Per-step scratch, shared by the threads. */
typedef struct {
    float *xn;       /* normalised input of the next matmul [batch, max_in] */
    int16_t *xq;     /* int8 input for VNNI: 16-bit codes [batch, max_in] */
    float *xstep;    /* int8 input for VNNI: per row, the value of one 16-bit step [batch] */
    int8_t *xq8;     /* int4 input: per block of 32, 32 high then 32 low 8-bit limbs [batch, 2 * max_in] */
    float *xbstep;   /* int4 input: per block of 32, the value of one code step [batch, max_in / 32] */
    float *xbsum;    /* int4 input: per block of 32, the sum of the inputs [batch, max_in / 32] */
    float *qkv;      /* [batch, (heads + 2 * kv_heads) * head_dim] */
    float *att;      /* [batch, heads * head_dim] */
    float *act;      /* [batch, inter] */
    float *scores;   /* per thread [slots] */
} Scratch;

/* The input rows of one matmul, as its weight kind's kernel reads them. */
typedef struct {
    const float *x;        /* float rows */
    int ld;
    const int16_t *q;      /* int8 with VNNI: 16-bit codes of x */
    int ldq;
    const float *step;     /* int8 with VNNI: per row, the value of one code step */
    const int8_t *q8;      /* int4: per block of 32, the high then the low limbs of x's codes */
    const float *bstep;    /* int4: per block, the value of one code step */
    const float *bsum;     /* int4: per block, the sum of x */
    int ldblocks;
} Input;

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

/* Sum of the 16 lanes as a tree (4 dependent adds rather than 16). The halves are taken with
 * memcpy, which compilers turn into register extracts (GCC before 12 lacks __builtin_shufflevector). */
static inline float hsum(f32x16 v) {
    f32x8 a0, a1;
    memcpy(&a0, &v, 32);
    memcpy(&a1, (const char *)&v + 32, 32);
    const f32x8 a = a0 + a1;
    f32x4 b0, b1;
    memcpy(&b0, &a, 16);
    memcpy(&b1, (const char *)&a + 16, 16);
    const f32x4 b = b0 + b1;
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline f32x16 load_f32(const float *p) {
    f32x16 v;
    memcpy(&v, p, 64);
    return v;
}

/* int8/uint8 -> float widening: GCC lowers a generic vector conversion of these to scalar code,
 * so x86 gets the one-instruction widenings by hand. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline f32x16 load_i8(const int8_t *p) {
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline f32x16 load_f16(const uint16_t *p) {
    return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline f32x16 halves(__m256 lo, __m256 hi) {
    f32x16 v;
    memcpy(&v, &lo, 32);
    memcpy((char *)&v + 32, &hi, 32);
    return v;
}
static inline f32x16 load_i8(const int8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return halves(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
}
static inline f32x16 load_f16(const uint16_t *p) {  /* AVX2 machines all have F16C */
    return halves(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
}
#else
static inline f32x16 load_i8(const int8_t *p) {
    f32x16 v;
    for (int i = 0; i < 16; i++) v[i] = p[i];
    return v;
}
static inline float f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
    uint32_t bits;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        const float v = (float)mantissa * (1.0f / 16777216.0f);
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | mantissa << 13;
    } else {
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline f32x16 load_f16(const uint16_t *p) {
    f32x16 v;
    for (int i = 0; i < 16; i++) v[i] = f16(p[i]);
    return v;
}
#endif

/* acc[l] += the dot product of the 4 unsigned bytes w[4l..4l+3] with the 4 signed bytes x[4l..4l+3],
 * for the 16 lanes l: one instruction with AVX-512 VNNI. Products fit the 16-bit sums of the
 * other paths because w < 16. */
static inline i32x16 dot4(i32x16 acc, u8x64 w, i8x64 x) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, (__m512i)x);
#elif defined(__AVX512BW__)
    const __m512i pairs = _mm512_maddubs_epi16((__m512i)w, (__m512i)x);
    return acc + (i32x16)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#elif defined(__AVX2__)
    __m256i wh[2], xh[2], ah[2];
    memcpy(wh, &w, 64);
    memcpy(xh, &x, 64);
    memcpy(ah, &acc, 64);
    for (int h = 0; h < 2; h++)
        ah[h] = _mm256_add_epi32(ah[h], _mm256_madd_epi16(_mm256_maddubs_epi16(wh[h], xh[h]),
                                                          _mm256_set1_epi16(1)));
    memcpy(&acc, ah, 64);
    return acc;
#else
    for (int l = 0; l < 16; l++)
        for (int i = 0; i < 4; i++) acc[l] += (int32_t)w[4 * l + i] * x[4 * l + i];
    return acc;
#endif
}

/* The 4 bytes at p repeated in every lane. */
static inline i8x64 broadcast4(const int8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    return (i8x64)((i32x16){0} + word);
}

enum { STORE = 0, ADD = 1, SWIGLU = 2 };

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
/* Inputs summed in int32 before the sums move to float: 4096 inputs put 256 products of a 16-bit
 * code and a weight in [-127, 127] in each of the 16 lanes, below 2^31. */
#define VNNI_CHUNK 4096

/* int8 rows with the CPU's 16-bit dot-product instruction (32 multiply-adds per instruction into
 * int32, where float32 needs a widening, a conversion and an FMA per 16): each input value is a
 * 16-bit integer code against its row's largest magnitude, each weight widened to 16 bits. */
static inline __attribute__((always_inline)) void dot_rows_vnni(const Linear *L, const int *n,
                                                                  int R, int B, const Input *in,
                                                                  float *out) {
    const int K = L->in, K32 = K & ~31;
    const int8_t *w[MAXR];
    float total[MAXR][MAXB];
    for (int r = 0; r < R; r++) {
        w[r] = (const int8_t *)L->weight + (size_t)n[r] * K;
        for (int b = 0; b < B; b++) total[r][b] = 0.0f;
    }
    const char *ahead = (const char *)w[0] + PREFETCH; /* see dot_rows */
    for (int k0 = 0; k0 < K32; k0 += VNNI_CHUNK) {
        const int k1 = k0 + VNNI_CHUNK < K32 ? k0 + VNNI_CHUNK : K32;
        __m512i acc[MAXR][MAXB];
        for (int r = 0; r < R; r++)
            for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_si512();
        for (int k = k0; k < k1; k += 32) {
            if ((k & 63) == 0)
                for (int line = 0; line < R * 64; line += 64) __builtin_prefetch(ahead + k * R + line);
            __m512i wv[MAXR];
            for (int r = 0; r < R; r++)
                wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w[r] + k)));
            for (int b = 0; b < B; b++) {
                const __m512i q = _mm512_loadu_si512(in->q + (size_t)b * in->ldq + k);
                for (int r = 0; r < R; r++) acc[r][b] = _mm512_dpwssd_epi32(acc[r][b], q, wv[r]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int b = 0; b < B; b++) total[r][b] += (float)_mm512_reduce_add_epi32(acc[r][b]);
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            const int16_t *q = in->q + (size_t)b * in->ldq;
            int32_t tail = 0;
            for (int k = K32; k < K; k++) tail += q[k] * w[r][k];
            const float v = (total[r][b] + (float)tail) * in->step[b] * L->scale[n[r]];
            out[r * B + b] = L->bias ? v + L->bias[n[r]] : v;
        }
}
#endif

/* Dot products of R float32 or int8 weight rows n[0..R) with B input rows: out[r * B + b]. Several weight rows per
 * pass give independent FMA chains even at B = 1; rows may repeat (a matrix's leftover rows are
 * padded with its last row). */
static inline __attribute__((always_inline)) void dot_rows(const Linear *L, int kind, const int *n,
                                                             int R, int B, const Input *in,
                                                             float *out) {
#ifdef VNNI
    if (kind == KIND_INT8) {
        dot_rows_vnni(L, n, R, B, in, out);
        return;
    }
#endif
    const int K = L->in, ldx = in->ld;
    const float *x = in->x;
    /* Fixed-size arrays (not VLAs), so that after inlining with constant R and B the compiler
     * keeps them in registers. */
    f32x16 acc[MAXR][MAXB];
    float tail[MAXR][MAXB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            acc[r][b] = (f32x16){0};
            tail[r][b] = 0.0f;
        }
    const int wide = kind == KIND_F32;
    const char *w[MAXR];
    for (int r = 0; r < R; r++) w[r] = (const char *)L->weight + (size_t)n[r] * K * (wide ? 4 : 1);
    /* The R rows are one contiguous block (rows n[0]..n[0]+R-1) read 16 inputs at a time, so
     * each step reads R * 16 weights of it: prefetch that much memory PREFETCH bytes ahead.
     * Rows are short (576 inputs: 9 to 36 cache lines), too short for the hardware prefetcher
     * to follow; without this a core waits on memory at about half its streaming speed. */
    const int step = R * 16 * (wide ? 4 : 1);
    const char *ahead = w[0] + PREFETCH;
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int line = 0; line < step; line += 64) __builtin_prefetch(ahead + k / 16 * step + line);
        f32x16 wv[MAXR];
        for (int r = 0; r < R; r++)
            wv[r] = wide ? load_f32((const float *)w[r] + k) : load_i8((const int8_t *)w[r] + k);
        for (int b = 0; b < B; b++) {
            f32x16 xv = load_f32(x + (size_t)b * ldx + k);
            for (int r = 0; r < R; r++) acc[r][b] += wv[r] * xv;
        }
    }
    for (; k < K; k++)
        for (int r = 0; r < R; r++) {
            const float wk = wide ? ((const float *)w[r])[k] : ((const int8_t *)w[r])[k];
            for (int b = 0; b < B; b++) tail[r][b] += wk * x[(size_t)b * ldx + k];
        }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float v = hsum(acc[r][b]) + tail[r][b];
            if (kind == KIND_INT8) v *= L->scale[n[r]];
            out[r * B + b] = L->bias ? v + L->bias[n[r]] : v;
        }
}

/* Rows per pass by weight kind and batch, measured on a 2-core AMD EPYC (Zen 4) with SmolLM2-135M:
 * float32 streams best two rows at a time (batch 1: 57 tokens/s, 30 GB/s of weights, against 47
 * with one row and 47 with four) and int8 four at a time below batch 4 (fewer accumulator chains
 * leave it compute-bound). */
static inline int rows_per_pass(int kind, int nb) {
    return kind == KIND_F32 || nb >= 4 ? 2 : 4;
}

/* The rows of one matmul shared out between the threads, R at a time, for nb <= MAXB inputs. */
static inline __attribute__((always_inline)) void rows_pass(const Linear *L, int kind, int nb,
                                                              int rows, const Input *in, float *y,
                                                              int ldy, int mode) {
    const int R = rows_per_pass(kind, nb);
#pragma omp for schedule(static)
    for (int block = 0; block < (rows + R - 1) / R; block++) {
        int n[MAXR], up[MAXR];
        const int n0 = block * R, count = rows - n0 < R ? rows - n0 : R;
        for (int r = 0; r < R; r++) {
            n[r] = n0 + (r < count ? r : count - 1);
            up[r] = rows + n[r];
        }
        float out[MAXR * MAXB];
        dot_rows(L, kind, n, R, nb, in, out);
        if (mode == SWIGLU) {
            float u[MAXR * MAXB];
            dot_rows(L, kind, up, R, nb, in, u);
            for (int i = 0; i < R * nb; i++) out[i] = out[i] / (1.0f + expf(-out[i])) * u[i];
        }
        for (int r = 0; r < count; r++)
            for (int b = 0; b < nb; b++) {
                float *dst = y + (size_t)b * ldy + n0 + r;
                *dst = mode == ADD ? *dst + out[r * nb + b] : out[r * nb + b];
            }
    }
}

/* int4: the 16 output rows of record row r (lane l: row 16 r + l) for B input rows: out[b].
 *
 * Per block of 32 inputs, the 256 bytes of codes are split into 8 vectors of nibbles (each lane
 * holding 4 codes of its row), then for each input row 8 integer dot-product instructions per
 * limb, each with 4 activation limbs broadcast to every lane, give the 16 rows' integer dot
 * products at once; one multiply-add by the rows' scales (times the block's code step) and one by
 * their lows (times the block's sum) move them to float. */
static inline __attribute__((always_inline)) void int4_rows(const Linear *L, int r, int B,
                                                              const Input *in, f32x16 *out) {
    const int blocks = L->in / INT4_BLOCK;
    const uint8_t *record = (const uint8_t *)L->weight + (size_t)r * blocks * INT4_RECORD;
    f32x16 scaled[MAXB], lows[MAXB];
    for (int b = 0; b < B; b++) scaled[b] = lows[b] = (f32x16){0};
    for (int g = 0; g < blocks; g++, record += INT4_RECORD) {
        for (int line = 0; line < INT4_RECORD; line += 64) __builtin_prefetch(record + PREFETCH + line);
        u8x64 codes[8];
        for (int j = 0; j < 4; j++) {
            u8x64 v;
            memcpy(&v, record + 64 * j, 64);
            codes[2 * j] = v & 15;      /* inputs 8j..8j+3 of the block */
            codes[2 * j + 1] = v >> 4;  /* inputs 8j+4..8j+7 */
        }
        const f32x16 scale = load_f16((const uint16_t *)(record + 256));
        const f32x16 low = load_f16((const uint16_t *)(record + 288));
        for (int b = 0; b < B; b++) {
            const int8_t *x = in->q8 + (size_t)b * in->ld + g * 2 * INT4_BLOCK;
            i32x16 high = {0}, low_limb = {0};
            for (int c = 0; c < 8; c++) {
                high = dot4(high, codes[c], broadcast4(x + 4 * c));
                low_limb = dot4(low_limb, codes[c], broadcast4(x + INT4_BLOCK + 4 * c));
            }
            const size_t at = (size_t)b * in->ldblocks + g;
            /* At most 32 * 15 * 16192 in magnitude: exact in int32 and in float. */
            scaled[b] += __builtin_convertvector(high * 128 + low_limb, f32x16) * (scale * in->bstep[at]);
            lows[b] += low * in->bsum[at];
        }
    }
    for (int b = 0; b < B; b++) {
        out[b] = scaled[b] + lows[b];
        if (L->bias)
            for (int l = 0; l < INT4_ROWS && INT4_ROWS * r + l < L->out; l++) out[b][l] += L->bias[INT4_ROWS * r + l];
    }
}

/* The int4 rows of one matmul shared out between the threads, 16 at a time, for nb <= MAXB
 * inputs. With SWIGLU the up rows start a whole record row after the gate rows (the engine
 * uses int4 gate/up layers only when the intermediate size is a multiple of 16). */
static inline __attribute__((always_inline)) void int4_pass(const Linear *L, int nb, int rows,
                                                              const Input *in, float *y, int ldy,
                                                              int mode) {
#pragma omp for schedule(static)
    for (int r = 0; r < (rows + INT4_ROWS - 1) / INT4_ROWS; r++) {
        f32x16 out[MAXB];
        int4_rows(L, r, nb, in, out);
        if (mode == SWIGLU) {
            f32x16 up[MAXB];
            int4_rows(L, r + rows / INT4_ROWS, nb, in, up);
            for (int b = 0; b < nb; b++)
                for (int l = 0; l < INT4_ROWS; l++) out[b][l] = out[b][l] / (1.0f + expf(-out[b][l])) * up[b][l];
        }
        const int n0 = INT4_ROWS * r, count = rows - n0 < INT4_ROWS ? rows - n0 : INT4_ROWS;
        for (int b = 0; b < nb; b++)
            for (int l = 0; l < count; l++) {
                float *dst = y + (size_t)b * ldy + n0 + l;
                *dst = mode == ADD ? *dst + out[b][l] : out[b][l];
            }
    }
}

/* One function per weight kind and number of input rows, so that each keeps its accumulators in
 * registers (constants R and nb) and holds only its own kernel. */
typedef void (*Pass)(const Linear *, int, const Input *, float *, int, int);
#define PASS(kind, b)                                                                          \
    static void pass_##kind##_##b(const Linear *L, int rows, const Input *in, float *y, int ldy, \
                                  int mode) {                                                  \
        if (kind == KIND_INT4)                                                                 \
            int4_pass(L, b, rows, in, y, ldy, mode);                                           \
        else                                                                                   \
            rows_pass(L, kind, b, rows, in, y, ldy, mode);                                     \
    }
#define PASSES(kind) PASS(kind, 1) PASS(kind, 2) PASS(kind, 3) PASS(kind, 4) PASS(kind, 5) \
                     PASS(kind, 6) PASS(kind, 7) PASS(kind, 8)
PASSES(KIND_F32)
PASSES(KIND_INT8)
PASSES(KIND_INT4)
#define ROW(kind) {pass_##kind##_1, pass_##kind##_2, pass_##kind##_3, pass_##kind##_4, \
                   pass_##kind##_5, pass_##kind##_6, pass_##kind##_7, pass_##kind##_8}
static const Pass PASS_TABLE[3][MAXB] = {ROW(KIND_F32), ROW(KIND_INT8), ROW(KIND_INT4)};
#undef ROW
#undef PASSES
#undef PASS

/* Prepare the input x [B, K] (row stride ldx) the way the kernel of L's weight kind reads it. */
static Input prepare(const Linear *L, int B, const float *x, int ldx, Scratch *s) {
    const int K = L->in;
    Input in = {x, ldx, s->xq, K, s->xstep, s->xq8, s->xbstep, s->xbsum, K / INT4_BLOCK};
    if (L->kind == KIND_INT4) {
        in.ld = 2 * K;
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++)
            for (int g = 0; g < K / INT4_BLOCK; g++) {
                const float *block = x + (size_t)b * ldx + g * INT4_BLOCK;
                int8_t *q = s->xq8 + (size_t)b * 2 * K + g * 2 * INT4_BLOCK;
                float top = 0.0f, sum = 0.0f;
                for (int k = 0; k < INT4_BLOCK; k++) {
                    top = fabsf(block[k]) > top ? fabsf(block[k]) : top;
                    sum += block[k];
                }
                /* c = 128 * high + low with low in [-64, 63]: |c| <= 16192 keeps high in [-127, 127]. */
                const float to_code = top > 0.0f ? INT4_CODES / top : 0.0f;
                for (int k = 0; k < INT4_BLOCK; k++) {
                    const int c = (int)rintf(block[k] * to_code), high = (c + 64) >> 7;
                    q[k] = (int8_t)high;
                    q[INT4_BLOCK + k] = (int8_t)(c - 128 * high);
                }
                s->xbstep[(size_t)b * in.ldblocks + g] = top / INT4_CODES;
                s->xbsum[(size_t)b * in.ldblocks + g] = sum;
            }
    }
#ifdef VNNI
    if (L->kind == KIND_INT8) {
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            const float *row = x + (size_t)b * ldx;
            int16_t *q = s->xq + (size_t)b * K;
            float top = 0.0f;
            for (int k = 0; k < K; k++) top = fabsf(row[k]) > top ? fabsf(row[k]) : top;
            const float to_code = top > 0.0f ? 32767.0f / top : 0.0f;
            s->xstep[b] = top / 32767.0f;
            for (int k = 0; k < K; k++) q[k] = (int16_t)rintf(row[k] * to_code); /* vectorises */
        }
    }
#endif
    return in;
}

/* y = x W^T for B rows of x [B, in] (row stride ldx), called by every thread of the region.
 * mode STORE: y[b, n] = result; ADD: y[b, n] += result (residual); SWIGLU: W holds gate rows then
 * up rows, y[b, n] = silu(gate_n) * up_n for n < out / 2. */
static void linear(const Linear *L, int B, const float *x, int ldx, float *y, int ldy, int mode,
                   Scratch *s) {
    const Input all = prepare(L, B, x, ldx, s);
    const int rows = mode == SWIGLU ? L->out / 2 : L->out;
    for (int b0 = 0; b0 < B; b0 += MAXB) {
        const int nb = B - b0 < MAXB ? B - b0 : MAXB;
        Input in = all;
        in.x += (size_t)b0 * in.ld;
        in.q += (size_t)b0 * in.ldq;
        in.step += b0;
        in.q8 += (size_t)b0 * in.ld;
        in.bstep += (size_t)b0 * in.ldblocks;
        in.bsum += (size_t)b0 * in.ldblocks;
        PASS_TABLE[L->kind][nb - 1](L, rows, &in, y + (size_t)b0 * ldy, ldy, mode);
    }
}

static void rms_norm(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* Rotate interleaved (x, y) pairs by the complex rotations rope [pairs] (cos, sin). */
static void rotate(float *v, const float *rope, int pairs) {
    for (int i = 0; i < pairs; i++) {
        const float a = v[2 * i], b = v[2 * i + 1], c = rope[2 * i], s = rope[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
    }
}

/* q . k for one head (head sizes that are multiples of 16 in vector registers). */
static inline float head_dot(const float *q, const float *k, int d) {
    if (d % 16 == 0) {
        f32x16 acc = {0};
        for (int i = 0; i < d; i += 16) acc += load_f32(q + i) * load_f32(k + i);
        return hsum(acc);
    }
    float dot = 0.0f;
    for (int i = 0; i < d; i++) dot += q[i] * k[i];
    return dot;
}

/* out = norm * sum_t p[t] v[t] for head size D (a constant after inlining): all D / 16 partial sums
 * stay in registers while t advances, so the additions form D / 16 independent chains rather than
 * one chain per 16 outputs (which waited on the FMA latency at every slot). */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, const float *values,
                                                                 int first, int slot, int D,
                                                                 float norm, float *out) {
    f32x16 acc[8];
    for (int c = 0; c < D / 16; c++) acc[c] = (f32x16){0};
    for (int t = first; t <= slot; t++)
        for (int c = 0; c < D / 16; c++) acc[c] += p[t] * load_f32(values + (size_t)t * D + 16 * c);
    for (int c = 0; c < D / 16; c++) {
        const f32x16 v = acc[c] * norm;
        memcpy(out + 16 * c, &v, 64);
    }
}

/* One query head attending over cache slots [first, slot] of its key/value head. */
static void attend(const float *q, const float *keys, const float *values, int first, int slot,
                   int d, float *scores, float *out) {
    float top = -INFINITY;
    for (int t = first; t <= slot; t++) {
        scores[t] = head_dot(q, keys + (size_t)t * d, d);
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
    for (int t = first; t <= slot; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    const float norm = 1.0f / total;
    if (d == 64) {
        weighted_sum(scores, values, first, slot, 64, norm, out);
        return;
    }
    if (d == 128) {
        weighted_sum(scores, values, first, slot, 128, norm, out);
        return;
    }
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (int t = first; t <= slot; t++) {
        const float p = scores[t] * norm, *v = values + (size_t)t * d;
        for (int i = 0; i < d; i++) out[i] += p * v[i];
    }
}

/* Decode one token for each of `batch` sequences, each at its own position.
 *
 * h [batch, hidden]: the new tokens' embeddings (overwritten: it is the residual stream).
 * kv: per layer, the cache [capacity, 2 * kv_heads, slots, head_dim] (capacity >= batch rows).
 * rows [batch]: the cache row of each sequence (distinct, < capacity).
 * slot [batch]: where each sequence's new key and value go (< slots).
 * first [batch]: the first cache slot each sequence may attend to (left padding comes before it);
 *   sequence b attends to slots [first[b], slot[b]] of its row.
 * rope [batch, head_dim / 2, 2]: (cos, sin) of each sequence's position.
 * logits [batch, vocab]: output. Returns 0, or -1 when scratch memory cannot be allocated.
 * The caller checks every index (smallmighty.engine.native): nothing is checked here. */
int slm_decode(const Model *m, int batch, float *h, float *const *kv, int slots, const int64_t *rows,
               const int64_t *slot, const int64_t *first, const float *rope, float *logits,
               int threads) {
    const int hq = m->heads, hk = m->kv_heads, d = m->head_dim, hidden = m->hidden;
    const int qkv_width = (hq + 2 * hk) * d;
    Scratch s;
    /* The widest input of any matmul: hidden, intermediate or the attention output. */
    int max_in = hidden > m->inter ? hidden : m->inter;
    if (hq * d > max_in) max_in = hq * d;
    const size_t n_xn = (size_t)batch * max_in, n_blocks = (size_t)batch * (max_in / INT4_BLOCK + 1),
                 n_qkv = (size_t)batch * qkv_width, n_att = (size_t)batch * hq * d,
                 n_act = (size_t)batch * m->inter, n_scores = (size_t)threads * slots;
    const size_t n_floats = n_xn + batch + 2 * n_blocks + n_qkv + n_att + n_act + n_scores;
    /* The 16- and 8-bit codes go after the floats. */
    float *buffer = malloc(sizeof(float) * n_floats + 4 * n_xn + 64);
    if (!buffer) return -1;
    s.xn = buffer;
    s.xstep = s.xn + n_xn;
    s.xbstep = s.xstep + batch;
    s.xbsum = s.xbstep + n_blocks;
    s.qkv = s.xbsum + n_blocks;
    s.att = s.qkv + n_qkv;
    s.act = s.att + n_att;
    s.scores = s.act + n_act;
    s.xq = (int16_t *)(buffer + n_floats);
    s.xq8 = (int8_t *)(s.xq + n_xn);

#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            float *cache = kv[l];
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++)
                rms_norm(h + (size_t)b * hidden, L->attn_norm, hidden, m->eps, s.xn + (size_t)b * hidden);
            linear(&L->qkv, batch, s.xn, hidden, s.qkv, qkv_width, STORE, &s);
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++) {
                float *row = s.qkv + (size_t)b * qkv_width;
                const float *r = rope + (size_t)b * d;
                for (int head = 0; head < hq + hk; head++) rotate(row + head * d, r, d / 2);
                for (int c = 0; c < 2 * hk; c++)
                    memcpy(cache + (((size_t)rows[b] * 2 * hk + c) * slots + slot[b]) * d,
                           row + (hq + c) * d, sizeof(float) * d);
            }
#pragma omp for collapse(2) schedule(static)
            for (int b = 0; b < batch; b++)
                for (int head = 0; head < hq; head++) {
                    const int g = head / (hq / hk);
                    const float *keys = cache + ((size_t)rows[b] * 2 * hk + g) * slots * d;
                    const float *values = cache + ((size_t)rows[b] * 2 * hk + hk + g) * slots * d;
                    float *scores = s.scores;
#ifdef _OPENMP
                    scores += (size_t)omp_get_thread_num() * slots;
#endif
                    attend(s.qkv + (size_t)b * qkv_width + head * d, keys, values, (int)first[b],
                           (int)slot[b], d, scores, s.att + ((size_t)b * hq + head) * d);
                }
            linear(&L->o, batch, s.att, hq * d, h, hidden, ADD, &s);
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++)
                rms_norm(h + (size_t)b * hidden, L->mlp_norm, hidden, m->eps, s.xn + (size_t)b * hidden);
            linear(&L->gate_up, batch, s.xn, hidden, s.act, m->inter, SWIGLU, &s);
            linear(&L->down, batch, s.act, m->inter, h, hidden, ADD, &s);
        }
#pragma omp for schedule(static)
        for (int b = 0; b < batch; b++)
            rms_norm(h + (size_t)b * hidden, m->norm, hidden, m->eps, s.xn + (size_t)b * hidden);
        linear(&m->lm_head, batch, s.xn, hidden, logits, m->vocab, STORE, &s);
    }
    free(buffer);
    return 0;
}
