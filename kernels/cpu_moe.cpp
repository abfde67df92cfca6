// Routed experts on the CPU straight from their stored codes: all (token, expert) pairs of a layer in one
// call, no full-precision copy of any weight. Built by cpu_moe.py at first use (g++ -O3 -march=native
// -fopenmp); its torch reference is cpu_moe.reference_moe.
//
// Formats (as ds4.engine.quant stores them):
//   0 int4: two codes per byte (even input in the low nibble), value (code - 8) * bf16 scale per 32 inputs
//   1 fp4:  two e2m1 codes per byte, likewise, times an e8m0 (power-of-two) scale per 32 inputs
//   2 fp8:  one e4m3 per byte, times a float32 scale per 128 x 128 block
//   3 fp32, 4 bf16: the weights as they are (float experts: no scales), read with rows_dot_float
// A group is 32 inputs. 4-bit groups are decoded as 16 even then 16 odd inputs (int4 rows of whole
// 128-input blocks: as 8 interleaved sets of 16, the `OCTETS` path), so the activations are laid out the
// same way once per call (`lay_out`); FP8 groups are in order. Where the CPU has AVX-512 VNNI and the caller
// asks (act8), int4 rows take their activations as int8 instead (`Q8`, rows_dot_q8): about 1% off float
// activations, and several times fewer instructions per weight, so a core keeps up with its memory.
//
// Threads: OpenMP, the same runtime torch uses (libgomp is loaded once per process), so the pool is
// shared. Work items are (expert, block of 16 output rows), one contiguous range of them per thread: each
// thread streams its own run of rows, which the hardware prefetcher follows (handed out one at a time,
// the items read 1.3-1.9x slower, docs/perf.md). Every sum runs in a fixed order, so results do not
// depend on the number of threads.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) && !defined(DS4_GENERIC)
#include <immintrin.h>
#define DS4_AVX512 1
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DS4_VNNI 1  // int4 experts take int8 activations and vpdpbusd (the `q8` path)
#endif
#elif defined(__AVX2__) && defined(__FMA__) && !defined(DS4_GENERIC)
#include <immintrin.h>
#define DS4_AVX2 1  // int4 experts take int8 activations: AVX-VNNI's vpdpbusd where built in, else vpmaddubsw
#endif
#if defined(DS4_VNNI) || defined(DS4_AVX2)
#define DS4_Q8 1
#endif

namespace {

constexpr int GROUP = 32;
constexpr int ROWS = 16;   // output rows per work item
constexpr int TOKENS = 4;  // token rows sharing one decode of a group
// Software prefetch: PREFETCH bytes ahead in a row of codes (two pages ahead of the hardware prefetcher,
// which stops at page ends), into L2 (`_MM_HINT_T2`). Into L1 (T0, 4 KB ahead) the kernel read 1.4-1.7x
// slower: with a few tokens a row it ran as if each row's fetch waited for the previous row's products.
constexpr int PREFETCH = 8192;

const float E2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
const float INT4[16] = {-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};

struct Matrix {  // one expert's [out, in] matrix in its stored format
    const uint8_t* codes;
    const void* scales;
    int64_t out, in;
    int fmt;
    bool act8;  // int4 against int8 activations (the Q8 layout)
    int64_t code_bytes() const { return out * row_bytes(); }
    int64_t scale_count() const {
        if (fmt >= 3) return 0;
        return fmt == 2 ? ((out + 127) / 128) * ((in + 127) / 128) : out * (in / GROUP);
    }
    int64_t row_bytes() const { return fmt == 3 ? in * 4 : fmt == 4 ? in * 2 : fmt == 2 ? in : in / 2; }
    __attribute__((always_inline)) float scale(int64_t n, int64_t g) const {  // of output row n, input group g
        if (fmt == 0) {
            uint32_t bits = uint32_t(static_cast<const uint16_t*>(scales)[n * (in / GROUP) + g]) << 16;
            float f;
            std::memcpy(&f, &bits, 4);
            return f;
        }
        if (fmt == 1) return std::ldexp(1.f, int(static_cast<const uint8_t*>(scales)[n * (in / GROUP) + g]) - 127);
        int64_t cols = (in + 127) / 128;
        // e4m3 decoded through fp16 bits is the value times 2^-8: folded into the scale
        return static_cast<const float*>(scales)[(n / 128) * cols + (g * GROUP) / 128] * 256.f;
    }
};

enum Layout { PLAIN, EVEN_ODD, OCTETS, Q8 };

// How a matrix's activations are laid out: int4 rows take int8 activations where the CPU has VNNI (Q8),
// else rows of whole 128-input blocks take the octet path (AVX-512 only); other 4-bit rows decode group by
// group (even inputs, then odd), FP8 rows in order.
Layout layout_for(int fmt, int64_t in, bool act8) {
#ifdef DS4_Q8
    if (fmt == 0 && act8) return Q8;
#endif
#ifdef DS4_AVX512
    if (fmt == 0 && in % 128 == 0) return OCTETS;
#endif
    return fmt >= 2 ? PLAIN : EVEN_ODD;
}

float fp8_value(uint8_t b) {  // e4m3 -> float (the generic path; NaN codes never appear in weights)
    int sign = b >> 7, exp = (b >> 3) & 15, mant = b & 7;
    float v = exp ? std::ldexp(1.f + mant / 8.f, exp - 7) : std::ldexp(mant / 8.f, -6);
    return sign ? -v : v;
}

// Decodes group g of row n into 32 floats, scale applied: w0 = the group's first 16 (4-bit: even) inputs
#ifdef DS4_AVX512
// always inlined: as a call (g++ 12 stops inlining it once the int8 paths are in the file) FP8 ran 2.4x slower
__attribute__((always_inline)) inline void decode_group(const Matrix& m, const uint8_t* row, int64_t n, int64_t g,
                                                        __m512& w0, __m512& w1) {
    const __m512 s = _mm512_set1_ps(m.scale(n, g));
    if (m.fmt == 2) {
        const __m256i mask7 = _mm256_set1_epi16(0x7f), mask8 = _mm256_set1_epi16(0x80);
        __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32)));
        __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32 + 16)));
        a = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(a, mask8), 8),
                            _mm256_slli_epi16(_mm256_and_si256(a, mask7), 7));
        b = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, mask8), 8),
                            _mm256_slli_epi16(_mm256_and_si256(b, mask7), 7));
        w0 = _mm512_mul_ps(_mm512_cvtph_ps(a), s);
        w1 = _mm512_mul_ps(_mm512_cvtph_ps(b), s);
        return;
    }
    const __m512 lut = _mm512_loadu_ps(m.fmt == 0 ? INT4 : E2M1);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    const __m128i low = _mm_set1_epi8(0x0f);
    w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low)), lut), s);
    w1 = _mm512_mul_ps(
        _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low)), lut), s);
}
#else
inline void decode_group(const Matrix& m, const uint8_t* row, int64_t n, int64_t g, float* w) {
    if (m.fmt == 3) {
        std::memcpy(w, row + g * GROUP * 4, GROUP * 4);
        return;
    }
    if (m.fmt == 4) {
        for (int j = 0; j < GROUP; ++j) {
            uint16_t half;
            std::memcpy(&half, row + (g * GROUP + j) * 2, 2);
            const uint32_t bits = uint32_t(half) << 16;
            std::memcpy(w + j, &bits, 4);
        }
        return;
    }
    const float s = m.scale(n, g);
    if (m.fmt == 2) {
        for (int j = 0; j < GROUP; ++j) w[j] = fp8_value(row[g * 32 + j]) * (s / 256.f);
        return;
    }
    const float* lut = m.fmt == 0 ? INT4 : E2M1;
    for (int j = 0; j < 16; ++j) {
        uint8_t b = row[g * 16 + j];
        w[j] = lut[b & 15] * s;
        w[16 + j] = lut[b >> 4] * s;
    }
}
#endif

// out[r][t] = dot(row n0 + r of m, xs[t]) for NR rows and NT token rows: constant trip counts keep the
// accumulators in registers, and NR * NT * 2 independent chains hide the FMA latency
template <int NR, int NT>
void rows_dot(const Matrix& m, int64_t n0, const float* const* xs, float (*out)[TOKENS]) {
    const int64_t groups = m.in / GROUP;
#ifdef DS4_AVX512
    __m512 acc[NR][NT][2];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        for (int r = 0; r < NR; ++r) {
            __m512 w0, w1;
            decode_group(m, m.codes + (n0 + r) * m.row_bytes(), n0 + r, g, w0, w1);
            for (int t = 0; t < NT; ++t) {
                acc[r][t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[t] + g * GROUP), acc[r][t][0]);
                acc[r][t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[t] + g * GROUP + 16), acc[r][t][1]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
#else
    float acc[NR][NT][GROUP] = {};
    float w[GROUP];
    for (int64_t g = 0; g < groups; ++g)
        for (int r = 0; r < NR; ++r) {
            decode_group(m, m.codes + (n0 + r) * m.row_bytes(), n0 + r, g, w);
            for (int t = 0; t < NT; ++t) {
                const float* x = xs[t] + g * GROUP;
                for (int j = 0; j < GROUP; ++j) acc[r][t][j] += w[j] * x[j];
            }
        }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) {
            float sum = 0.f;
            for (int j = 0; j < GROUP; ++j) sum += acc[r][t][j];
            out[r][t] = sum;
        }
#endif
}

#ifdef DS4_AVX512
// int4 rows of whole 128-input blocks, without shuffles in the inner loop: the 64 bytes of a block are 16
// 32-bit words of 8 codes; shifting out nibble k of every word gives inputs 8 i + k, turned into floats
// exactly by the 2^23 trick ((2^23 + code) - (2^23 + 8) = code - 8). The block's four group scales are
// applied once per block, spread over the words of their groups.
template <int NR, int NT>
void rows_dot_octets(const Matrix& m, int64_t n0, const float* const* xs, float (*out)[TOKENS]) {
    const int64_t blocks = m.in / 128, groups = m.in / GROUP;
    const __m512i nibble = _mm512_set1_epi32(0xF), exponent = _mm512_set1_epi32(0x4B000000);
    const __m512 offset = _mm512_set1_ps(8388608.f + 8.f);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
    __m512 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        for (int r = 0; r < NR; ++r) {
            const __m512i words = _mm512_loadu_si512(m.codes + (n0 + r) * m.row_bytes() + b * 64);
            const __m128i four = _mm_cvtepu16_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + (n0 + r) * groups + 4 * b)));
            const __m512 s = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(four)), 16));
            __m512 block[NT];
            for (int t = 0; t < NT; ++t) block[t] = _mm512_setzero_ps();
            for (int k = 0; k < 8; ++k) {
                const __m512i codes = _mm512_and_si512(_mm512_srli_epi32(words, 4 * k), nibble);
                const __m512 w = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(codes, exponent)), offset);
                for (int t = 0; t < NT; ++t)
                    block[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + b * 128 + k * 16), block[t]);
            }
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(block[t], s, acc[r][t]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}
#endif


#if defined(DS4_AVX512) || defined(DS4_AVX2)
// Float experts (fp32, bf16): plain multiply-adds, a vector of inputs per step and row, each (row, token)
// summed in the same order whatever else is in the call. bf16 widens to f32 by a 16-bit shift.
#ifdef DS4_AVX512
using Vec = __m512;
constexpr int LANES = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload_bf16(const uint8_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
#else
using Vec = __m256;
constexpr int LANES = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload_bf16(const uint8_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

template <bool BF16>
__attribute__((always_inline)) inline Vec load_weights(const uint8_t* row, int64_t i) {
    if constexpr (BF16) return vload_bf16(row + i * 2);
    else return vload(reinterpret_cast<const float*>(row) + i);
}

template <int NR, int NT, bool BF16>
void rows_dot_float(const Matrix& m, int64_t n0, const float* const* xs, float (*out)[TOKENS]) {
    const int64_t stride = m.row_bytes();
    const uint8_t* row0 = m.codes + n0 * stride;
    Vec acc[NR][NT];  // one vector per (row, token): NR * NT chains (at least 4) hide the FMA latency
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = vzero();
    for (int64_t i = 0; i < m.in; i += LANES) {
        Vec x[NT];
        for (int t = 0; t < NT; ++t) x[t] = vload(xs[t] + i);
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = row0 + r * stride;
            _mm_prefetch(reinterpret_cast<const char*>(row + i * (BF16 ? 2 : 4) + PREFETCH), _MM_HINT_T2);
            const Vec w = load_weights<BF16>(row, i);
            for (int t = 0; t < NT; ++t) acc[r][t] = vfma(w, x[t], acc[r][t]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r][t] = vsum(acc[r][t]);
}

// rows per call for nt token rows: NR * NT accumulators, NT inputs and a weight vector fit the registers
constexpr int float_rows(int nt) { return nt <= 2 ? 4 : nt == 3 ? 3 : 2; }

template <bool BF16>
void rows_dot_float_tokens(const Matrix& m, int64_t n0, int nr, int nt, const float* const* xs,
                           float (*out)[TOKENS]) {
#define DS4_ROWS(NT)                                                         \
    switch (nr) {                                                            \
        case 4: rows_dot_float<4, NT, BF16>(m, n0, xs, out); break;          \
        case 3: rows_dot_float<3, NT, BF16>(m, n0, xs, out); break;          \
        case 2: rows_dot_float<2, NT, BF16>(m, n0, xs, out); break;          \
        default: rows_dot_float<1, NT, BF16>(m, n0, xs, out); break;         \
    }
    switch (nt) {
        case 1: DS4_ROWS(1) break;
        case 2: DS4_ROWS(2) break;
        case 3: DS4_ROWS(3) break;
        default: DS4_ROWS(4) break;
    }
#undef DS4_ROWS
}
#define DS4_FLOAT_ROWS 1
#endif

#ifdef DS4_Q8
// int4 rows against int8 activations (`Q8` layout, quantize_q8): vpdpbusd multiplies the unsigned codes
// (0..15) by the signed int8 inputs, four products per 32-bit lane, 64 per instruction; the codes' offset
// of 8 is folded into each lane's starting value (`corr`: -8 times the sum of its eight inputs). A chunk
// is 4 groups (64 code bytes), lane i holds group i / 4, so the lanes convert to floats once per chunk and
// take their group's two scales (weight, bf16; activation, float) in one multiply-add.
struct Q8Row {  // one activation row laid out for rows_dot_q8 (see quantize_q8)
    const int8_t* q;
    const int32_t* corr;
    const float* scale;
};

// group g of a row (a trailing group, not in a whole chunk) against x: 16 bytes of codes, 4 lanes
inline float group_dot_q8(const Matrix& m, const uint8_t* row, int64_t n, int64_t g, const Q8Row& x) {
    const __m128i low = _mm_set1_epi8(0x0f), ones = _mm_set1_epi16(1);
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    const __m128i lo = _mm_and_si128(codes, low), hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low);
    const __m128i xlo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.q + g * 32));
    const __m128i xhi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.q + g * 32 + 16));
    __m128i dot = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.corr + g * 4));
    dot = _mm_add_epi32(dot, _mm_madd_epi16(_mm_maddubs_epi16(lo, xlo), ones));
    dot = _mm_add_epi32(dot, _mm_madd_epi16(_mm_maddubs_epi16(hi, xhi), ones));
    const int32_t* d = reinterpret_cast<const int32_t*>(&dot);
    return float(d[0] + d[1] + d[2] + d[3]) * (m.scale(n, g) * x.scale[g * 4]);
}

#ifdef DS4_VNNI
// the 4 bf16 scales of a chunk, spread to the 16 lanes as floats (lane i: scale i / 4)
inline __m512 chunk_scales(const uint16_t* s) {
    const __m512i idx = _mm512_set_epi16(3, 0, 3, 0, 3, 0, 3, 0, 2, 0, 2, 0, 2, 0, 2, 0,
                                         1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i four = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, four));
}

template <int NR, int NT>
void rows_dot_q8(const Matrix& m, int64_t n0, const Q8Row* xs, float (*out)[TOKENS]) {
    const int64_t groups = m.in / GROUP, chunks = groups / 4;
    const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = m.codes + (n0 + r) * m.row_bytes();
            _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + PREFETCH), _MM_HINT_T2);
            const __m512i codes = _mm512_loadu_si512(row + c * 64);
            const __m512i lo = _mm512_and_si512(codes, low), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
            const __m512 sw = chunk_scales(scales + (n0 + r) * groups + 4 * c);
            for (int t = 0; t < NT; ++t) {
                __m512i dot = _mm512_loadu_si512(xs[t].corr + c * 16);
                dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(xs[t].q + c * 128));
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xs[t].q + c * 128 + 64));
                const __m512 s = _mm512_mul_ps(sw, _mm512_loadu_ps(xs[t].scale + c * 16));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) {
            float sum = _mm512_reduce_add_ps(acc[r][t]);
            for (int64_t g = chunks * 4; g < groups; ++g)  // trailing groups, one at a time
                sum += group_dot_q8(m, m.codes + (n0 + r) * m.row_bytes(), n0 + r, g, xs[t]);
            out[r][t] = sum;
        }
}
#else
// AVX2: a chunk in two halves of 2 groups (32 code bytes, 8 lanes: lanes 0-3 one group, 4-7 the next)
inline __m256i dot_u8s8(__m256i acc, __m256i codes, __m256i x) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, codes, x);
#else  // pairs of u8 * s8 products as int16 (at most 2 * 15 * 127: no saturation), then pairs of those
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
#endif
}

// the 2 bf16 scales of a half chunk, spread to the 8 lanes as floats (lanes 0-3: the first)
inline __m256 half_chunk_scales(const uint16_t* s) {
    uint32_t two;
    std::memcpy(&two, s, 4);
    const __m256i both = _mm256_set1_epi32(int(two));
    const __m256i first = _mm256_slli_epi32(both, 16), second = _mm256_and_si256(both, _mm256_set1_epi32(int(0xFFFF0000u)));
    return _mm256_castsi256_ps(_mm256_blend_epi32(first, second, 0xF0));
}

template <int NR, int NT>
void rows_dot_q8(const Matrix& m, int64_t n0, const Q8Row* xs, float (*out)[TOKENS]) {
    const int64_t groups = m.in / GROUP, chunks = groups / 4;
    const uint16_t* scales = static_cast<const uint16_t*>(m.scales);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = m.codes + (n0 + r) * m.row_bytes();
            _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + PREFETCH), _MM_HINT_T2);
            for (int h = 0; h < 2; ++h) {
                const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 64 + h * 32));
                const __m256i lo = _mm256_and_si256(codes, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
                const __m256 sw = half_chunk_scales(scales + (n0 + r) * groups + 4 * c + 2 * h);
                for (int t = 0; t < NT; ++t) {
                    const int8_t* q = xs[t].q + c * 128 + h * 32;
                    __m256i dot = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[t].corr + c * 16 + h * 8));
                    dot = dot_u8s8(dot, lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
                    dot = dot_u8s8(dot, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64)));
                    const __m256 s = _mm256_mul_ps(sw, _mm256_loadu_ps(xs[t].scale + c * 16 + h * 8));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) {
            const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            float sum = _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
            for (int64_t g = chunks * 4; g < groups; ++g)  // trailing groups, one at a time
                sum += group_dot_q8(m, m.codes + (n0 + r) * m.row_bytes(), n0 + r, g, xs[t]);
            out[r][t] = sum;
        }
}
#endif

// a row of n inputs quantized by quantize_q8 (n / 2 floats of scratch): n int8 codes, then n / 8 lane
// offsets, then n / 8 lane scales
Q8Row q8_row(const float* buf, int64_t n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(buf);
    return {q, reinterpret_cast<const int32_t*>(q + n), reinterpret_cast<const float*>(q + n + n / 2)};
}

void rows_dot_q8_tokens(const Matrix& m, int64_t n0, int nr, int nt, const Q8Row* xs, float (*out)[TOKENS]) {
    switch (nt * 8 + nr) {
        case 8 + 4: rows_dot_q8<4, 1>(m, n0, xs, out); break;
        case 8 + 3: rows_dot_q8<3, 1>(m, n0, xs, out); break;
        case 8 + 2: rows_dot_q8<2, 1>(m, n0, xs, out); break;
        case 8 + 1: rows_dot_q8<1, 1>(m, n0, xs, out); break;
        case 16 + 2: rows_dot_q8<2, 2>(m, n0, xs, out); break;
        case 16 + 1: rows_dot_q8<1, 2>(m, n0, xs, out); break;
        case 24 + 2: rows_dot_q8<2, 3>(m, n0, xs, out); break;
        case 24 + 1: rows_dot_q8<1, 3>(m, n0, xs, out); break;
        case 32 + 2: rows_dot_q8<2, 4>(m, n0, xs, out); break;
        default: rows_dot_q8<1, 4>(m, n0, xs, out); break;
    }
}

// x [n] as int8 for rows_dot_q8, into out (n / 2 floats): each group of 32 scaled so its largest magnitude
// maps to 127, rounded to nearest. Chunks of 4 groups (128 inputs; a trailing group alone) hold their
// groups' even inputs, then their odd ones, byte for byte as the code nibbles sit.
void quantize_q8(const float* x, float* out, int64_t n) {
    int8_t* q = reinterpret_cast<int8_t*>(out);
    int32_t* corr = reinterpret_cast<int32_t*>(q + n);
    float* scale = reinterpret_cast<float*>(q + n + n / 2);
    const int64_t groups = n / GROUP, full = groups / 4 * 4;
    for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + g * GROUP;
        float amax = 0.f;
        for (int j = 0; j < GROUP; ++j) amax = std::max(amax, std::fabs(xg[j]));
        const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        const int64_t k = g < full ? 4 : 1, first = g < full ? g / 4 * 4 : g;  // the chunk: k groups
        int8_t* lo = q + first * GROUP + (g - first) * 16;  // even inputs; odd ones 16 k bytes on
        int sums[4] = {0, 0, 0, 0};
        for (int j = 0; j < 16; ++j) {
            const int a = int(std::nearbyint(xg[2 * j] * inv)), b = int(std::nearbyint(xg[2 * j + 1] * inv));
            lo[j] = int8_t(a);
            lo[16 * k + j] = int8_t(b);
            sums[j / 4] += a + b;
        }
        for (int l = 0; l < 4; ++l) {
            corr[g * 4 + l] = -8 * sums[l];
            scale[g * 4 + l] = s;
        }
    }
}
#endif

template <int NT>
void rows_dot_tokens(const Matrix& m, int64_t n0, int nr, const float* const* xs, float (*out)[TOKENS]) {
#ifdef DS4_AVX512
    if (layout_for(m.fmt, m.in, m.act8) == OCTETS) {
        if (nr == 2) rows_dot_octets<2, NT>(m, n0, xs, out);
        else rows_dot_octets<1, NT>(m, n0, xs, out);
        return;
    }
#endif
    if (nr == 2) rows_dot<2, NT>(m, n0, xs, out);
    else rows_dot<1, NT>(m, n0, xs, out);
}

// rows [n0, n1) of y[t] = m @ xs[t] for every token row of one expert, TOKENS at a time
void matmul_rows(const Matrix& m, int64_t n0, int64_t n1, const float* xs, int64_t x_stride, int64_t nrows,
                 float* ys, int64_t y_stride) {
#ifdef DS4_Q8
    const bool q8 = layout_for(m.fmt, m.in, m.act8) == Q8;
#endif
    for (int64_t r0 = 0; r0 < nrows; r0 += TOKENS) {
        int nt = int(std::min<int64_t>(TOKENS, nrows - r0));
        const float* rows[TOKENS];
        for (int t = 0; t < nt; ++t) rows[t] = xs + (r0 + t) * x_stride;
        float out[4][TOKENS];
        for (int64_t n = n0; n < n1;) {
            int nr = int(std::min<int64_t>(2, n1 - n));
#ifdef DS4_FLOAT_ROWS
            if (m.fmt >= 3) {
                nr = int(std::min<int64_t>(float_rows(nt), n1 - n));
                if (m.fmt == 3) rows_dot_float_tokens<false>(m, n, nr, nt, rows, out);
                else rows_dot_float_tokens<true>(m, n, nr, nt, rows, out);
            } else
#endif
#ifdef DS4_Q8
            if (q8) {
                Q8Row qs[TOKENS];
                for (int t = 0; t < nt; ++t) qs[t] = q8_row(rows[t], m.in);
                nr = int(std::min<int64_t>(nt == 1 ? 4 : 2, n1 - n));
                rows_dot_q8_tokens(m, n, nr, nt, qs, out);
            } else
#endif
            switch (nt) {
                case 1: rows_dot_tokens<1>(m, n, nr, rows, out); break;
                case 2: rows_dot_tokens<2>(m, n, nr, rows, out); break;
                case 3: rows_dot_tokens<3>(m, n, nr, rows, out); break;
                default: rows_dot_tokens<4>(m, n, nr, rows, out); break;
            }
            for (int r = 0; r < nr; ++r)
                for (int t = 0; t < nt; ++t) ys[(r0 + t) * y_stride + n + r] = out[r][t];
            n += nr;
        }
    }
}

// x [n] laid out for `layout`: EVEN_ODD per group of 32 the 16 even inputs then the 16 odd ones; OCTETS
// per block of 128, entry k * 16 + i holds input 8 i + k (nibble k of the block's 32-bit word i)
void lay_out(const float* x, float* out, int64_t n, Layout layout) {
#ifdef DS4_Q8
    if (layout == Q8) return quantize_q8(x, out, n);
#endif
    if (layout == PLAIN) {
        std::memcpy(out, x, n * sizeof(float));
    } else if (layout == EVEN_ODD) {
        for (int64_t g = 0; g < n; g += GROUP)
            for (int j = 0; j < 16; ++j) {
                out[g + j] = x[g + 2 * j];
                out[g + 16 + j] = x[g + 2 * j + 1];
            }
    } else {
        for (int64_t b = 0; b < n; b += 128)
            for (int k = 0; k < 8; ++k)
                for (int i = 0; i < 16; ++i) out[b + k * 16 + i] = x[b + 8 * i + k];
    }
}

float silu(float v) { return v / (1.f + std::exp(-v)); }

}  // namespace

extern "C" {

int ds4_moe_act8(int fmt) {  // whether `fmt` can run against int8 activations (int4 with AVX2 or AVX-512 VNNI)
#ifdef DS4_Q8
    return fmt == 0;
#else
    (void)fmt;
    return 0;
#endif
}

// out[T, D] = sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), experts summed in ascending id order
// (pairs with id < 0 are skipped: computed elsewhere). w13: [E, 2I, D], w2: [E, D, I] in `fmt`, with
// their scales; limit: V4's swiglu clamp (NaN: none). work: T*K*(D + 3I + D) floats of scratch. seconds[0]
// adds the call's time (what `bench hybrid` reports as the expert products' time).
int ds4_moe(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t K, int64_t E,
            int64_t D, int64_t I, const uint8_t* w13, const void* s13, const uint8_t* w2, const void* s2,
            int fmt, int act8, float limit, float* out, float* work, int threads, double* seconds) {
    const double start = omp_get_wtime();
    if (D % GROUP || I % GROUP || fmt < 0 || fmt > 4) return 1;
    if (act8 && !ds4_moe_act8(fmt)) return 2;
    const Layout x_layout = layout_for(fmt, D, act8), act_layout = layout_for(fmt, I, act8);
    Matrix m13{nullptr, nullptr, 2 * I, D, fmt, bool(act8)}, m2{nullptr, nullptr, D, I, fmt, bool(act8)};
    const int scale_size = fmt == 0 ? 2 : (fmt == 1 ? 1 : fmt == 2 ? 4 : 0);
    // the pairs grouped by expert, ascending, tokens in order within an expert
    std::vector<int64_t> counts(E + 1, 0), pair_token(T * K), pair_slot(T * K);
    for (int64_t p = 0; p < T * K; ++p)
        if (ids[p] >= 0) counts[ids[p] + 1]++;
    for (int64_t e = 0; e < E; ++e) counts[e + 1] += counts[e];
    const int64_t P = counts[E];
    std::vector<int64_t> fill(counts.begin(), counts.end() - 1), slot_of(T * K, -1);
    for (int64_t p = 0; p < T * K; ++p)
        if (ids[p] >= 0) {
            int64_t s = fill[ids[p]]++;
            pair_token[s] = p / K;
            slot_of[p] = s;
        }
    float* xs = work;             // [P, D] inputs, laid out for the format
    float* h = xs + P * D;        // [P, 2I] gate and up
    float* act = h + P * 2 * I;   // [P, I] swiglu, laid out for the format
    float* ys = act + P * I;      // [P, D] each pair's expert output
    std::vector<int64_t> items;   // (expert, row block) work items of both phases
    for (int64_t e = 0; e < E; ++e)
        if (counts[e + 1] > counts[e]) items.push_back(e);
    const int64_t blocks13 = (2 * I + ROWS - 1) / ROWS, blocks2 = (D + ROWS - 1) / ROWS;
    const int64_t n_items = int64_t(items.size());
    auto expert_matrix = [&](Matrix m, const uint8_t* base, const void* scales, int64_t e) {
        m.codes = base + e * m.code_bytes();
        m.scales = static_cast<const uint8_t*>(scales) + e * m.scale_count() * scale_size;
        return m;
    };
    auto swiglu = [&](int64_t s) {  // pair s's gate and up -> its laid-out activation
        float* gate = h + s * 2 * I;
        float* up = gate + I;
        for (int64_t i = 0; i < I; ++i) {
            float g = gate[i], u = up[i];
            if (!std::isnan(limit)) {
                g = std::min(g, limit);
                u = std::max(std::min(u, limit), -limit);
            }
            gate[i] = silu(g) * u;  // in place, then laid out into act
        }
        lay_out(gate, act + s * I, I, act_layout);
    };
    // Few experts, as many as a whole number per thread (decode): each thread runs its experts start to
    // finish, then the sum: two barriers in all. Otherwise every phase splits the experts' row blocks over
    // the threads. Each output row is the same sum either way.
    const bool by_expert = n_items >= threads && n_items % threads == 0 && P <= 2 * n_items;
#pragma omp parallel num_threads(threads)
    {
        if (by_expert) {
#pragma omp for schedule(static)
            for (int64_t w = 0; w < n_items; ++w) {
                const int64_t e = items[w], s0 = counts[e], n = counts[e + 1] - counts[e];
                for (int64_t s = s0; s < s0 + n; ++s) lay_out(x + pair_token[s] * D, xs + s * D, D, x_layout);
                matmul_rows(expert_matrix(m13, w13, s13, e), 0, 2 * I, xs + s0 * D, D, n, h + s0 * 2 * I, 2 * I);
                for (int64_t s = s0; s < s0 + n; ++s) swiglu(s);
                matmul_rows(expert_matrix(m2, w2, s2, e), 0, D, act + s0 * I, I, n, ys + s0 * D, D);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t s = 0; s < P; ++s) lay_out(x + pair_token[s] * D, xs + s * D, D, x_layout);
#pragma omp for schedule(static)
            for (int64_t w = 0; w < n_items * blocks13; ++w) {
                int64_t e = items[w / blocks13], b = w % blocks13;
                Matrix m = expert_matrix(m13, w13, s13, e);
                int64_t n0 = b * ROWS, n1 = std::min(2 * I, n0 + ROWS);
                matmul_rows(m, n0, n1, xs + counts[e] * D, D, counts[e + 1] - counts[e], h + counts[e] * 2 * I,
                            2 * I);
            }
#pragma omp for schedule(static)
            for (int64_t s = 0; s < P; ++s) swiglu(s);
#pragma omp for schedule(static)
            for (int64_t w = 0; w < n_items * blocks2; ++w) {
                int64_t e = items[w / blocks2], b = w % blocks2;
                Matrix m = expert_matrix(m2, w2, s2, e);
                int64_t n0 = b * ROWS, n1 = std::min(D, n0 + ROWS);
                matmul_rows(m, n0, n1, act + counts[e] * I, I, counts[e + 1] - counts[e], ys + counts[e] * D, D);
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            float* o = out + t * D;
            for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
            for (int64_t e = 0; e < E; ++e)  // ascending expert id, the order the torch path sums in
                for (int64_t k = 0; k < K; ++k) {
                    int64_t p = t * K + k;
                    if (ids[p] != e) continue;
                    const float* y = ys + slot_of[p] * D;
                    for (int64_t d = 0; d < D; ++d) o[d] += weights[p] * y[d];
                }
        }
    }
    seconds[0] += omp_get_wtime() - start;
    return 0;
}

// y[T, out] = x[T, in] @ W^T for a float matrix W [out, in] (fmt 3 fp32 or 4 bf16, rows contiguous):
// the dense layers' products at decode shapes (a few rows of x), each thread one contiguous range of
// blocks of 16 output rows, every sum in the same order as the expert products'.
int ds4_linear(const float* x, int64_t T, int64_t in, int64_t out, const uint8_t* w, int fmt, float* y,
               int threads) {
    if (in % GROUP || (fmt != 3 && fmt != 4)) return 1;
    const Matrix m{w, nullptr, out, in, fmt, false};
    const int64_t blocks = (out + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b)
        matmul_rows(m, b * ROWS, std::min(out, (b + 1) * ROWS), x, in, T, y, out);
    return 0;
}

int ds4_moe_isa() {  // 4: AVX-VNNI (256-bit); 3: AVX2; 2: AVX-512 with VNNI; 1: AVX-512; 0: the generic path
#ifdef DS4_VNNI
    return 2;
#elif defined(DS4_AVX512)
    return 1;
#elif defined(DS4_AVX2) && defined(__AVXVNNI__)
    return 4;
#elif defined(DS4_AVX2)
    return 3;
#else
    return 0;
#endif
}
}
