// MLA decode attention on the CPU in the latent space (the absorbed form): each sequence's query heads
// [H, D] (D = latent C + rope R) against its cache rows [D], read where they sit in the pool, through the
// block table (paged) or a list of chosen rows (V3.2's selection). Out: [H, C], the softmax-weighted sum
// of the rows' latent parts. The torch path gathers the rows into a [B, S, D] copy first, then runs two
// batched products and a softmax; this reads each row once for all heads and keeps no [B, S] tensor.
//
// Work items are (sequence, chunk of keys). A chunk runs an online softmax over blocks of BLOCK keys and
// leaves its maximum, sum and weighted rows per head; the chunks of a sequence are then merged in order.
// Chunk sizes depend on the sequence's length alone, so the sums (and the bits) do not depend on the
// number of threads. With AVX2 or AVX-512 (and widths that are whole vectors) the scores are 4 x 4 tiles of
// dot products (heads x rows), the exponentials a vector polynomial (Cephes' expf, within 2 ulp) and the
// weighted sum runs over 4 vectors of a head's output at a time; elsewhere plain loops do the same.
// Included by cpu_ops.cpp (after cpu_moe.cpp, whose vector helpers it uses); its torch reference is MLA's
// torch path (engine/layers/mla.py).

namespace {

constexpr int64_t BLOCK = 32;       // keys scored at a time (their rows stay in L1/L2 for the weighted sum)
constexpr int64_t MAX_CHUNKS = 64;  // per sequence: the merge's scratch stays small at any length

// keys per chunk for a sequence of n keys: 64, doubled until at most MAX_CHUNKS chunks cover it
inline int64_t chunk_keys(int64_t n) {
    int64_t c = 64;
    while (c * MAX_CHUNKS < n) c *= 2;
    return c;
}

struct LatentQuery {
    const float* q;     // [B, H, D]
    const void* pool;   // [N, D] float32 or bfloat16 rows
    bool bf16;
    int64_t B, H, D, C;
    float scale;
};

inline void load_bf16_row(const LatentQuery& a, int64_t r, float* out) {  // row r of a bf16 pool, as floats
    const uint16_t* src = static_cast<const uint16_t*>(a.pool) + r * a.D;
#pragma omp simd
    for (int64_t d = 0; d < a.D; ++d) {
        uint32_t bits = uint32_t(src[d]) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        out[d] = f;
    }
}

#ifdef DS4_FLOAT_ROWS
#ifdef DS4_AVX512
constexpr int TILE_HEADS = 4;  // 16 accumulators, 4 query and 1 row vector: in 32 registers
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vset(float v) { return _mm512_set1_ps(v); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vround(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2(Vec n) {  // 2^n for whole n in [-127, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }

// the sums of 16 vectors' lanes at once (the pairs of _mm512_reduce_add_ps: lane i with i + 8, i + 4, i + 2,
// i + 1): 45 shuffles and adds instead of 16 x 8
inline void vsum16(const Vec* a, float* out) {
    Vec b[8], c[4], d[2];
    for (int p = 0; p < 8; ++p)  // [a[2p]: 8 lanes][a[2p + 1]: 8 lanes]
        b[p] = vadd(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44), _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
    for (int q = 0; q < 4; ++q)  // 128-bit lane k: a[4q + k], 4 lanes
        c[q] = vadd(_mm512_shuffle_f32x4(b[2 * q], b[2 * q + 1], 0x88), _mm512_shuffle_f32x4(b[2 * q], b[2 * q + 1], 0xDD));
    for (int m = 0; m < 2; ++m)  // lane k: a[8m + k], a[8m + 4 + k], 2 lanes each
        d[m] = vadd(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                    _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const Vec e = vadd(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
    alignas(64) float sums[16];  // element 4k + j: a[4j + k]
    _mm512_store_ps(sums, e);
    for (int r = 0; r < 16; ++r) out[r] = sums[4 * (r % 4) + r / 4];
}
#else
constexpr int TILE_HEADS = 2;  // 8 accumulators, 2 query and 1 row vector: in 16 registers
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vset(float v) { return _mm256_set1_ps(v); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vround(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2(Vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }
#endif
constexpr int TILE_ROWS = 4;

// e^x for x <= 0 (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, times 2^n); below -87, about 0
inline Vec vexp(Vec x) {
    x = vmax(x, vset(-87.3f));
    const Vec n = vround(vmul(x, vset(1.44269504088896341f)));
    Vec r = vfma(n, vset(-0.693359375f), x);
    r = vfma(n, vset(2.12194440e-4f), r);
    Vec y = vset(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        y = vfma(y, r, vset(c));
    y = vfma(y, vmul(r, r), vadd(r, vset(1.f)));
    return vmul(y, vpow2(n));
}

// s[i * BLOCK + k] = q_{h0 + i} . row_k for the tile's heads and rows (padded tiles repeat their last one)
inline void score_tile(const float* const* qs, const float* const* rs, int64_t D, float* s, int nh, int nk) {
    Vec acc[TILE_HEADS * TILE_ROWS];
    for (auto& a : acc) a = vzero();
    for (int64_t d = 0; d < D; d += LANES) {
        Vec qv[TILE_HEADS];
        for (int i = 0; i < TILE_HEADS; ++i) qv[i] = vload(qs[i] + d);
        for (int k = 0; k < TILE_ROWS; ++k) {
            const Vec rv = vload(rs[k] + d);
            for (int i = 0; i < TILE_HEADS; ++i) acc[i * TILE_ROWS + k] = vfma(qv[i], rv, acc[i * TILE_ROWS + k]);
        }
    }
    float dots[TILE_HEADS * TILE_ROWS];
#ifdef DS4_AVX512
    vsum16(acc, dots);
#else
    for (int i = 0; i < TILE_HEADS * TILE_ROWS; ++i) dots[i] = vsum(acc[i]);
#endif
    for (int i = 0; i < nh; ++i)
        for (int k = 0; k < nk; ++k) s[i * BLOCK + k] = dots[i * TILE_ROWS + k];
}

// one block of `kept` rows for every head: scores, online softmax, weighted sum (the vector path)
inline void attend_block(const LatentQuery& a, const float* q, const float* const* rows, int64_t kept, float* top,
                         float* total, float* acc, float* scores) {
    const int64_t H = a.H, D = a.D, C = a.C;
    for (int64_t h0 = 0; h0 < H; h0 += TILE_HEADS) {
        const float* qs[TILE_HEADS];
        for (int i = 0; i < TILE_HEADS; ++i) qs[i] = q + std::min(h0 + i, H - 1) * D;
        for (int64_t k0 = 0; k0 < kept; k0 += TILE_ROWS) {
            const float* rs[TILE_ROWS];
            for (int k = 0; k < TILE_ROWS; ++k) rs[k] = rows[std::min(k0 + k, kept - 1)];
            score_tile(qs, rs, D, scores + h0 * BLOCK + k0, int(std::min<int64_t>(TILE_HEADS, H - h0)),
                       int(std::min<int64_t>(TILE_ROWS, kept - k0)));
        }
    }
    for (int64_t h = 0; h < H; ++h) {
        float* s = scores + h * BLOCK;
        float best = top[h];
        for (int64_t j = 0; j < kept; ++j) best = std::max(best, s[j] *= a.scale);
        for (int64_t j = kept; j < BLOCK; ++j) s[j] = best;  // whole vectors below; zeroed after
        for (int64_t j = 0; j < BLOCK; j += LANES) vstore(s + j, vexp(vadd(vload(s + j), vset(-best))));
        const float rescale = top[h] == -INFINITY ? 0.f : std::exp(top[h] - best);
        float sum = total[h] * rescale;
        for (int64_t j = 0; j < kept; ++j) sum += s[j];
        top[h] = best, total[h] = sum;
        float* acc_h = acc + h * C;
        int64_t c = 0;
        for (; c + 4 * LANES <= C; c += 4 * LANES) {  // 4 vectors of the head's output stay in registers
            const Vec f = vset(rescale);
            Vec o[4];
            for (int v = 0; v < 4; ++v) o[v] = vmul(vload(acc_h + c + v * LANES), f);
            for (int64_t j = 0; j < kept; ++j) {
                const Vec p = vset(s[j]);
                for (int v = 0; v < 4; ++v) o[v] = vfma(p, vload(rows[j] + c + v * LANES), o[v]);
            }
            for (int v = 0; v < 4; ++v) vstore(acc_h + c + v * LANES, o[v]);
        }
        for (; c < C; c += LANES) {
            Vec o = vmul(vload(acc_h + c), vset(rescale));
            for (int64_t j = 0; j < kept; ++j) o = vfma(vset(s[j]), vload(rows[j] + c), o);
            vstore(acc_h + c, o);
        }
    }
}
#endif

// keys [k0, k1) of sequence b: top[h] (the scores' maximum, -inf where no key counts), total[h] (the sum of
// exp(score - top)) and acc[h, C] (the rows' latent parts weighted by the same), online over BLOCK keys
template <class RowOf>
void attend_chunk(const LatentQuery& a, int64_t b, int64_t k0, int64_t k1, RowOf row_of, float* top, float* total,
                  float* acc, float* rows, float* scores) {
    const int64_t H = a.H, D = a.D, C = a.C;
    for (int64_t h = 0; h < H; ++h) top[h] = -INFINITY, total[h] = 0.f;
    std::fill(acc, acc + H * C, 0.f);
    const float* q = a.q + b * H * D;
    // the rows sit anywhere in the pool, where the hardware prefetcher cannot guess them: each block's
    // rows are fetched while the block before it computes (the first block's all at once)
    const int64_t row_bytes = D * (a.bf16 ? 2 : 4);
    auto prefetch = [&](int64_t from, int64_t to) {
        for (int64_t j = from; j < std::min(to, k1); ++j) {
            const int64_t r = row_of(b, j);
            if (r < 0) continue;
            const char* p = static_cast<const char*>(a.pool) + r * row_bytes;
            for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
        }
    };
    prefetch(k0, k0 + BLOCK);
    for (int64_t j0 = k0; j0 < k1; j0 += BLOCK) {
        prefetch(j0 + BLOCK, j0 + 2 * BLOCK);
        const int64_t n = std::min(BLOCK, k1 - j0);
        int64_t kept = 0;  // the block's rows that count, in order: fp32 where they sit, bf16 converted
        const float* ptrs[BLOCK];
        for (int64_t j = 0; j < n; ++j) {
            const int64_t r = row_of(b, j0 + j);
            if (r < 0) continue;
            if (a.bf16) {
                load_bf16_row(a, r, rows + kept * D);
                ptrs[kept] = rows + kept * D;
            } else {
                ptrs[kept] = static_cast<const float*>(a.pool) + r * D;
            }
            ++kept;
        }
        if (kept == 0) continue;
#ifdef DS4_FLOAT_ROWS
        if (D % LANES == 0 && C % LANES == 0) {
            attend_block(a, q, ptrs, kept, top, total, acc, scores);
            continue;
        }
#endif
        for (int64_t h = 0; h < H; ++h) {
            const float* qh = q + h * D;
            float* s = scores + h * BLOCK;
            float best = top[h];
            for (int64_t j = 0; j < kept; ++j) {
                const float* row = ptrs[j];
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; ++d) dot += qh[d] * row[d];
                s[j] = dot * a.scale;
                best = std::max(best, s[j]);
            }
            const float rescale = std::exp(top[h] - best);  // 0 while nothing counted yet (-inf - finite)
            float sum = total[h] * rescale;
            float* acc_h = acc + h * C;
            if (rescale != 1.f) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) acc_h[c] *= rescale;
            }
            for (int64_t j = 0; j < kept; ++j) {
                const float p = std::exp(s[j] - best);
                sum += p;
                const float* row = ptrs[j];
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) acc_h[c] += p * row[c];
            }
            top[h] = best, total[h] = sum;
        }
    }
}

// out [B, H, C] = softmax over each sequence's keys (count(b) of them, row_of(b, j) < 0: skipped) of
// q . row * scale, times the rows' first C values; a sequence with no key gets zeros
template <class RowOf, class Count>
void latent_attention(const LatentQuery& a, Count count, RowOf row_of, float* out, int threads) {
    const int64_t H = a.H, C = a.C;
    std::vector<int64_t> first(a.B + 1, 0), chunk(a.B);  // each sequence's first work item, its chunk size
    int64_t keys = 0;
    for (int64_t b = 0; b < a.B; ++b) {
        const int64_t n = count(b);
        chunk[b] = chunk_keys(n);
        first[b + 1] = first[b] + std::max<int64_t>(1, (n + chunk[b] - 1) / chunk[b]);
        keys += n;
    }
    const int64_t items = first[a.B];
    std::vector<float> top(items * H), total(items * H), acc(items * H * C);
    // one thread for a small step (the parallel region would cost more than it saves)
    const int nthreads = int(std::max<int64_t>(1, std::min<int64_t>({threads, items, keys * H * a.D / (1 << 16)})));
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> rows(BLOCK * a.D), scores(H * BLOCK);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; ++i) {
            const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
            const int64_t k0 = (i - first[b]) * chunk[b], k1 = std::min(count(b), k0 + chunk[b]);
            attend_chunk(a, b, k0, k1, row_of, top.data() + i * H, total.data() + i * H, acc.data() + i * H * C,
                         rows.data(), scores.data());
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < a.B * H; ++bh) {  // the chunks of each (sequence, head), merged in order
            const int64_t b = bh / H, h = bh % H;
            float best = -INFINITY;
            for (int64_t i = first[b]; i < first[b + 1]; ++i) best = std::max(best, top[i * H + h]);
            float* o = out + bh * C;
            std::fill(o, o + C, 0.f);
            if (best == -INFINITY) continue;
            float sum = 0.f;
            for (int64_t i = first[b]; i < first[b + 1]; ++i) {
                const float w = std::exp(top[i * H + h] - best);
                sum += w * total[i * H + h];
                const float* part = acc.data() + (i * H + h) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) o[c] += w * part[c];
            }
            const float inv = 1.f / sum;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] *= inv;
        }
    }
}

}  // namespace
