/* dc_lightning native CPU decode (kernels/native.py compiles this file on first use; no Python headers needed).
 *
 * A code byte holds two 4-bit codes: the low nibble is the first weight, the high nibble the second (the byte order
 * of the tc layout, kernels/tc/layout.py). decode_bytes writes dst[2i] = table[src[i] & 15] and
 * dst[2i + 1] = table[src[i] >> 4]: with AVX-512 one permutexvar looks up 16 codes in the 16-entry table held in one
 * register; with AVX2 two permutevar8x32 and a blend do 8; other CPUs run the scalar loop (the compiler may
 * vectorize it). Bounds are checked by the caller (native.py). */
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static void decode_bytes(const uint8_t *src, int64_t n, const float *table, float *dst) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 t = _mm512_loadu_ps(table);
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; i + 16 <= n; i += 16) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, m15), t);
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
        _mm512_storeu_ps(dst + 2 * i, _mm512_permutex2var_ps(lo, first, hi));
        _mm512_storeu_ps(dst + 2 * i + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
#elif defined(__AVX2__)
    const __m256 t0 = _mm256_loadu_ps(table), t1 = _mm256_loadu_ps(table + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    for (; i + 8 <= n; i += 8) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
        __m256i l = _mm256_and_si256(b, m15), h = _mm256_srli_epi32(b, 4);
        __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, l), _mm256_permutevar8x32_ps(t1, l),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(l, 28)));
        __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, h), _mm256_permutevar8x32_ps(t1, h),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(h, 28)));
        __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi); /* pairs 0,1,4,5 and 2,3,6,7 */
        _mm256_storeu_ps(dst + 2 * i, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(dst + 2 * i + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
#endif
    for (; i < n; i++) {
        dst[2 * i] = table[src[i] & 15];
        dst[2 * i + 1] = table[src[i] >> 4];
    }
}

/* nseg segments of seg bytes, segment s at src + s * stride, decoded one after another into dst (2 * seg floats
 * each) */
void dc_decode_segments(const uint8_t *src, int64_t nseg, int64_t seg, int64_t stride, const float *table,
                        float *dst) {
    for (int64_t s = 0; s < nseg; s++) decode_bytes(src + s * stride, seg, table, dst + 2 * s * seg);
}

/* Rows [row0, row0 + nrows) of a tc-layout weight (kernels/tc/layout.py) in row order: out is float32
 * [nrows, k_tiles * 256]. Row r = 16 G + 8 b + rho takes, for tile t and quarter q = 2 qhi + qlo, byte b of word
 * qlo of the 32 word pairs kappa of storage row (G, qhi, rho) at bytes t * 128 + 4 kappa + 2 qlo + b: 64 columns
 * t * 256 + 64 q + 2 kappa + {0, 1}. Read as 32-bit words, those bytes are one shift away from the low bits. */
static void decode_quarter(const uint8_t *words, int shift, const float *table, float *dst) {
#if defined(__AVX512F__)
    const __m512 t = _mm512_loadu_ps(table);
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m128i lo_shift = _mm_cvtsi32_si128(shift), hi_shift = _mm_cvtsi32_si128(shift + 4);
    for (int h = 0; h < 2; h++) {
        __m512i w = _mm512_loadu_si512((const void *)(words + 64 * h));
        __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srl_epi32(w, lo_shift), m15), t);
        __m512 hi = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srl_epi32(w, hi_shift), m15), t);
        _mm512_storeu_ps(dst + 32 * h, _mm512_permutex2var_ps(lo, first, hi));
        _mm512_storeu_ps(dst + 32 * h + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
#elif defined(__AVX2__)
    const __m256 t0 = _mm256_loadu_ps(table), t1 = _mm256_loadu_ps(table + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m128i lo_shift = _mm_cvtsi32_si128(shift), hi_shift = _mm_cvtsi32_si128(shift + 4);
    for (int h = 0; h < 4; h++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(words + 32 * h));
        __m256i l = _mm256_and_si256(_mm256_srl_epi32(w, lo_shift), m15);
        __m256i g = _mm256_and_si256(_mm256_srl_epi32(w, hi_shift), m15);
        __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, l), _mm256_permutevar8x32_ps(t1, l),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(l, 28)));
        __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, g), _mm256_permutevar8x32_ps(t1, g),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(g, 28)));
        __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);
        _mm256_storeu_ps(dst + 16 * h, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(dst + 16 * h + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
#else
    for (int k = 0; k < 32; k++) {
        uint8_t b = words[4 * k + shift / 8];
        dst[2 * k] = table[b & 15];
        dst[2 * k + 1] = table[b >> 4];
    }
#endif
}

void dc_decode_tc_rows(const uint8_t *codes, int64_t row0, int64_t nrows, int64_t k_tiles, const float *table,
                       float *out) {
    const int64_t kb = k_tiles * 128, cols = k_tiles * 256; /* bytes of a storage row, columns of an output row */
    for (int64_t i = 0; i < nrows; i++) {
        const int64_t r = row0 + i, G = r / 16, b = (r / 8) % 2, rho = r % 8;
        for (int64_t qhi = 0; qhi < 2; qhi++) {
            const uint8_t *row = codes + ((G * 2 + qhi) * 8 + rho) * kb;
            for (int64_t t = 0; t < k_tiles; t++)
                for (int64_t qlo = 0; qlo < 2; qlo++)
                    decode_quarter(row + t * 128, (int)(8 * (2 * qlo + b)), table,
                                   out + i * cols + t * 256 + 64 * (2 * qhi + qlo));
        }
    }
}

/* The lut layout (kernels/lut/layout.py): int32 word j of group g of a row holds, at bits [s * cbits, (s + 1) *
 * cbits), the code of column g * 32 * PW + 32 s + j (PW = 32 / cbits codes per word); bit c % 32 of the row's mask
 * word c / 32 (if any) says whether column c is kept. A pruned position decodes as table[code] * 0.0 (the PyTorch
 * decode's value, a signed zero). decode_slice writes the 32 columns of slice s of one group. */
static void decode_slice(const uint32_t *w, const uint32_t *mword, int shift, uint32_t cmask, const float *table,
                         float *dst) {
#if defined(__AVX512F__)
    const __m512 t = _mm512_loadu_ps(table);
    const __m512i m = _mm512_set1_epi32((int)cmask);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    const __m128i sh = _mm_cvtsi32_si128(shift);
    for (int h = 0; h < 2; h++) {
        __m512i v = _mm512_loadu_si512((const void *)(w + 16 * h));
        __m512 f = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srl_epi32(v, sh), m), t);
        if (mword) {
            __mmask16 kept = (__mmask16)((*mword >> (16 * h)) & 0xFFFFu);
            f = _mm512_mask_blend_ps(kept, _mm512_and_ps(f, sign), f);
        }
        _mm512_storeu_ps(dst + 16 * h, f);
    }
#elif defined(__AVX2__)
    const __m256 t0 = _mm256_loadu_ps(table), t1 = _mm256_loadu_ps(table + 8);
    const __m256i m = _mm256_set1_epi32((int)cmask);
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m128i sh = _mm_cvtsi32_si128(shift);
    for (int h = 0; h < 4; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + 8 * h));
        __m256i idx = _mm256_and_si256(_mm256_srl_epi32(v, sh), m);
        __m256 f = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        if (mword) {
            __m256i b = _mm256_set1_epi32((int)((*mword >> (8 * h)) & 0xFFu));
            __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(b, bit), bit);
            f = _mm256_blendv_ps(_mm256_and_ps(f, sign), f, _mm256_castsi256_ps(kept));
        }
        _mm256_storeu_ps(dst + 8 * h, f);
    }
#else
    for (int j = 0; j < 32; j++) {
        float v = table[(w[j] >> shift) & cmask];
        dst[j] = (mword && !((*mword >> j) & 1u)) ? v * 0.0f : v;
    }
#endif
}

/* rows [row0, row0 + nrows) of a lut layer of cbits in {2, 4} (a table of at most 16 values, padded to 16) in column
 * order: out is float32 [nrows, groups * 32 * PW]; mask is NULL without a bitmap */
void dc_decode_lut_rows(const uint32_t *codes, const uint32_t *mask, int64_t row0, int64_t nrows, int64_t groups,
                        int64_t cbits, const float *table, float *out) {
    const int64_t pw = 32 / cbits, cols = groups * 32 * pw;
    const uint32_t cmask = (1u << cbits) - 1u;
    for (int64_t i = 0; i < nrows; i++) {
        const int64_t r = row0 + i;
        for (int64_t g = 0; g < groups; g++)
            for (int64_t s = 0; s < pw; s++)
                decode_slice(codes + (r * groups + g) * 32, mask ? mask + r * groups * pw + g * pw + s : 0,
                             (int)(s * cbits), cmask, table, out + i * cols + g * 32 * pw + 32 * s);
    }
}

/* Rows of an ell row table (kernels/rows/layout.py): entries [2, V, L] (plane 0 the column, plane 1 the code of
 * each kept entry; a row's padding repeats its last entry) of uint8, int16 or int32 (esize 1, 2, 4). Writes the n
 * rows idx[i] of the dense float32 table into out [n, cols]. Returns -1, or i when idx[i] is not a row, or -2 - i
 * when row idx[i] holds an entry outside [0, cols) x [0, ncb) (a damaged table: nothing is written out of range). */
static inline int64_t ell_entry(const void *e, int64_t esize, int64_t i) {
    return esize == 1 ? (int64_t)((const uint8_t *)e)[i]
                      : esize == 2 ? (int64_t)((const int16_t *)e)[i] : (int64_t)((const int32_t *)e)[i];
}

int64_t dc_ell_rows(const void *entries, int64_t esize, int64_t V, int64_t L, const int64_t *idx, int64_t n,
                    const float *codebook, int64_t ncb, int64_t cols, float *out) {
    for (int64_t i = 0; i < n * cols; i++) out[i] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = idx[i];
        if (r < 0 || r >= V) return i;
        for (int64_t j = 0; j < L; j++) {
            const int64_t c = ell_entry(entries, esize, r * L + j), k = ell_entry(entries, esize, (V + r) * L + j);
            if (c < 0 || c >= cols || k < 0 || k >= ncb) return -2 - i;
            out[i * cols + c] = codebook[k];
        }
    }
    return -1;
}

/* y = x @ W.T straight from the sparse layout's sliced-ELL entries (kernels/sparse/layout.py): block
 * t * n_chunks + c holds entries [block_ptr[i], block_ptr[i + 1]) in ELL steps of rt, entry e of the block on lane
 * (e - block start) % rt (row t * rt + lane); its word is (local column << code_shift) | code (int16 words read as
 * uint16), the column c * chunk + local column. xt is x transposed, float32 [K, B]; yt is float32 [n_out, B]
 * (overwritten). Padding entries (rows past n_out, or the codebook's 0.0 slot) add nothing. Returns -1, or the first
 * entry whose column or code falls outside [0, K) x [0, ncb) (a damaged layer: nothing is read out of range). */
int64_t dc_sparse_product(const void *entries, int64_t esize, const int32_t *block_ptr, int64_t n_tiles,
                          int64_t n_chunks, int64_t rt, int64_t chunk, int64_t code_shift, const float *codebook,
                          int64_t ncb, const float *xt, int64_t B, int64_t K, float *yt, int64_t n_out) {
    const uint32_t cmask = (1u << code_shift) - 1u;
    const uint16_t *e16 = (const uint16_t *)entries;
    const uint32_t *e32 = (const uint32_t *)entries;
    for (int64_t i = 0; i < B * n_out; i++) yt[i] = 0.0f;
    for (int64_t t = 0; t < n_tiles; t++)
        for (int64_t c = 0; c < n_chunks; c++) {
            const int64_t blk = t * n_chunks + c, e0 = block_ptr[blk], e1 = block_ptr[blk + 1], col0 = c * chunk;
            int64_t lane = 0;
            for (int64_t e = e0; e < e1; e++, lane = lane + 1 == rt ? 0 : lane + 1) {
                const uint32_t w = esize == 2 ? (uint32_t)e16[e] : e32[e];
                const int64_t col = col0 + (int64_t)(w >> code_shift), code = (int64_t)(w & cmask);
                if (col >= K || code >= ncb) return e;
                const int64_t row = t * rt + lane;
                if (row >= n_out) continue;
                const float v = codebook[code];
                const float *xr = xt + col * B;
                float *yr = yt + row * B;
                if (B == 1)
                    yr[0] += xr[0] * v;
                else
                    for (int64_t b = 0; b < B; b++) yr[b] += xr[b] * v;
            }
        }
    return -1;
}

/* which vector path this build took: 512, 256 or 0 (scalar) */
int dc_decode_width(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}
