// Native CPU matmul on GGUF quantized weights: y f32[M, N] = x f32[M, K] @ W^T, W[N, K] kept in its blocks.
//
// Formats (parts as the XLA FFI call passes them, all row-major):
//   q4_1  q u8[N, K/2], d f16[N, K/32], m f16[N, K/32]. Block b of row n covers k = 32b..32b+31; byte j
//         (0..15) of its 16 bytes holds element 32b+j in the low nibble and 32b+j+16 in the high nibble
//         (GGUF's order). w = fl32(fl32(d * code) + m): a separate multiply then add (no FMA), exactly what
//         gguf-py computes in numpy float32.
//   q8_0  q i8[N, K], d f16[N, K/32]; w = fl32(q * d).
//
// Built with -ffp-contract=off; the dequantization uses explicit mul/add intrinsics, the x.w accumulation
// uses FMA (its order differs from any reference anyway).
//
// Small M (decode, M <= 8): each weight row block is read once, its 32 codes decoded to f32 in registers and
// multiplied against all M rows of x (which stay in L1); accumulators per (weight row, x row) live in
// registers, R weight rows at a time, horizontally reduced at the end of each row.
// Larger M: for each group of R weight rows, the rows are dequantized once into a small f32 scratch (L1) and
// then multiplied against x in tiles of 8 rows, so the decode cost does not grow with M.
//
// Threads: the N rows are cut into chunks handed out through an atomic counter; nthreads-1 tasks go to
// XLA's intra-op pool and the calling thread works too, then waits only for chunks already taken (the shared
// state is reference-counted, so a task the pool starts late finds no work and touches nothing freed).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

// ------------------------------------------------------------------------------------------ f16 -> f32

inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  // exact IEEE binary16 -> binary32 (subnormals, inf, NaN)
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      man &= 0x3FFu;
      bits = sign | (uint32_t(127 - 15 - e) << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// ------------------------------------------------------------------------------------------ weights

struct Q41 {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;
  int64_t K;
};

struct Q80 {
  const int8_t* q;
  const uint16_t* d;
  int64_t K;
};

// Scalar dequantization of row n into out[K] (reference semantics; also the scratch fill for large M).
inline void DequantRowScalar(const Q41& w, int64_t n, float* out) {
  const int64_t nb = w.K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = w.q + n * (w.K / 2) + b * 16;
    const float d = HalfToFloat(w.d[n * nb + b]);
    const float m = HalfToFloat(w.m[n * nb + b]);
    for (int j = 0; j < 16; ++j) {
      volatile float lo = d * float(qb[j] & 0xF);  // volatile: keep the product rounded on its own
      volatile float hi = d * float(qb[j] >> 4);
      out[b * kBlock + j] = lo + m;
      out[b * kBlock + j + 16] = hi + m;
    }
  }
}

inline void DequantRowScalar(const Q80& w, int64_t n, float* out) {
  const int64_t nb = w.K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* qb = w.q + n * w.K + b * kBlock;
    const float d = HalfToFloat(w.d[n * nb + b]);
    for (int j = 0; j < 32; ++j) out[b * kBlock + j] = float(qb[j]) * d;
  }
}

#if defined(__AVX512F__)

// Decoders: block b of weight row n -> (lo = elements 0..15, hi = elements 16..31) as f32.
#ifndef LLMC_PREFETCH
#define LLMC_PREFETCH 768  // bytes ahead in each weight row's code stream
#endif

// Converts the f16 scales of blocks b0..b0+count-1 (count <= 16) of one row into 16 floats.
inline void HalvesToFloats(const uint16_t* p, int64_t count, float* out) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  _mm512_store_ps(out, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)));
}

inline __m512 Iota16() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

struct DecodeQ41 {
  static constexpr int kScales = 2;  // d, m
  const Q41& w;
  int64_t nb;
  explicit DecodeQ41(const Q41& w_) : w(w_), nb(w_.K / kBlock) {}
  // scales[0..15] = d, scales[16..31] = m of blocks b0.. of row n
  inline void Scales(int64_t n, int64_t b0, int64_t count, float* scales) const {
    HalvesToFloats(w.d + n * nb + b0, count, scales);
    HalvesToFloats(w.m + n * nb + b0, count, scales + 16);
  }
  inline void operator()(int64_t n, int64_t b, const float* s, __m512& lo, __m512& hi) const {
    const uint8_t* p = w.q + n * (w.K / 2) + b * 16;
    if (LLMC_PREFETCH > 0 && (b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + LLMC_PREFETCH, _MM_HINT_T0);
    // The block's 16 possible weights, table[c] = fl32(fl32(d * c) + m): the same separate multiply and add
    // gguf-py does per element, so every looked-up weight is bit-identical to it.
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(s[0]), Iota16()), _mm512_set1_ps(s[16]));
    // one zero-extension of the 16 bytes to dwords; vpermps reads only an index's low 4 bits, so the dword
    // itself indexes the low nibble and dword >> 4 the high nibble
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(bytes, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
  }
};

struct DecodeQ80 {
  static constexpr int kScales = 1;
  const Q80& w;
  int64_t nb;
  explicit DecodeQ80(const Q80& w_) : w(w_), nb(w_.K / kBlock) {}
  inline void Scales(int64_t n, int64_t b0, int64_t count, float* scales) const {
    HalvesToFloats(w.d + n * nb + b0, count, scales);
  }
  inline void operator()(int64_t n, int64_t b, const float* s, __m512& lo, __m512& hi) const {
    const int8_t* p = w.q + n * w.K + b * kBlock;
    if (LLMC_PREFETCH > 0 && (b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + LLMC_PREFETCH, _MM_HINT_T0);
    const __m512 d = _mm512_set1_ps(s[0]);
    // sign extension straight from memory (no 256 -> 128 extract)
    const __m512 f_lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 f_hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    lo = _mm512_mul_ps(f_lo, d);
    hi = _mm512_mul_ps(f_hi, d);
  }
};

// Already-dequantized rows in a scratch buffer: row r (0..R-1) of the current group at buf + r * K.
struct DecodeF32 {
  static constexpr int kScales = 0;
  const float* buf;
  int64_t K;
  int64_t n0;
  inline void Scales(int64_t, int64_t, int64_t, float*) const {}
  inline void operator()(int64_t n, int64_t b, const float*, __m512& lo, __m512& hi) const {
    const float* p = buf + (n - n0) * K + b * kBlock;
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  }
};

// Reduce 4 vectors to 4 sums in one __m128 (fewer shuffles than four _mm512_reduce_add_ps).
inline __m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // fold 512 -> 256
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
  __m256 ab = _mm256_hadd_ps(a8, b8);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 cd = _mm256_hadd_ps(c8, d8);
  __m256 abcd = _mm256_hadd_ps(ab, cd);  // a b c d | a b c d (partial)
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[m, n0 + r] for r < R, m < MT: rows n0..n0+R-1 of W against x rows x[0..MT-1] (stride ldx), y stride ldy.
// Two accumulator sets (lo/hi halves) when registers allow, for more independent FMA chains at small M.
template <int MT, int R, class Dec>
inline void TileKernel(const Dec& dec, int64_t nb, int64_t n0, const float* x, int64_t ldx, float* y,
                       int64_t ldy) {
  constexpr bool kSplit = (2 * MT * R <= 16);
  constexpr int kSets = kSplit ? 2 : 1;
  __m512 acc[kSets][R][MT];
  for (int s = 0; s < kSets; ++s)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) acc[s][r][i] = _mm512_setzero_ps();
  // per 16 blocks: the rows' f16 scales converted at once, then broadcast from memory per block
  alignas(64) float scales[R][Dec::kScales > 0 ? Dec::kScales * 16 : 1];
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t count = std::min<int64_t>(16, nb - b0);
    for (int r = 0; r < R; ++r) dec.Scales(n0 + r, b0, count, scales[r]);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t b = b0 + j;
      __m512 lo[R], hi[R];
      for (int r = 0; r < R; ++r) dec(n0 + r, b, scales[r] + j, lo[r], hi[r]);
      const float* xb = x + b * kBlock;
      for (int i = 0; i < MT; ++i) {
        const __m512 x_lo = _mm512_loadu_ps(xb + i * ldx);
        const __m512 x_hi = _mm512_loadu_ps(xb + i * ldx + 16);
        for (int r = 0; r < R; ++r) {
          acc[0][r][i] = _mm512_fmadd_ps(x_lo, lo[r], acc[0][r][i]);
          acc[kSets - 1][r][i] = _mm512_fmadd_ps(x_hi, hi[r], acc[kSets - 1][r][i]);
        }
      }
    }
  }
  if (kSplit)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) acc[0][r][i] = _mm512_add_ps(acc[0][r][i], acc[kSets - 1][r][i]);
  // results: (i, r) -> y[i * ldy + n0 + r]
  if constexpr (R == 4) {
    for (int i = 0; i < MT; ++i)
      _mm_storeu_ps(y + i * ldy + n0, Reduce4(acc[0][0][i], acc[0][1][i], acc[0][2][i], acc[0][3][i]));
  } else {  // 4 x rows at a time for one weight row: 4 sums in one vector, then stored to 4 rows of y
    for (int r = 0; r < R; ++r) {
      int i = 0;
      for (; i + 4 <= MT; i += 4) {
        alignas(16) float sums[4];
        _mm_store_ps(sums, Reduce4(acc[0][r][i], acc[0][r][i + 1], acc[0][r][i + 2], acc[0][r][i + 3]));
        for (int t = 0; t < 4; ++t) y[(i + t) * ldy + n0 + r] = sums[t];
      }
      for (; i < MT; ++i) y[i * ldy + n0 + r] = _mm512_reduce_add_ps(acc[0][r][i]);
    }
  }
}

// Rows n0..n0+R-1 of W against all M rows of x, for M <= 8 straight from the quantized blocks.
template <int R, class Dec>
inline void SmallM(const Dec& dec, int64_t nb, int64_t n0, const float* x, int64_t M, int64_t K, float* y,
                   int64_t N) {
  switch (M) {
    case 1: TileKernel<1, R>(dec, nb, n0, x, K, y, N); break;
    case 2: TileKernel<2, R>(dec, nb, n0, x, K, y, N); break;
    case 3: TileKernel<3, R>(dec, nb, n0, x, K, y, N); break;
    case 4: TileKernel<4, R>(dec, nb, n0, x, K, y, N); break;
    case 5: TileKernel<5, R>(dec, nb, n0, x, K, y, N); break;
    case 6: TileKernel<6, R>(dec, nb, n0, x, K, y, N); break;
    case 7: TileKernel<7, R>(dec, nb, n0, x, K, y, N); break;
    case 8: TileKernel<8, R>(dec, nb, n0, x, K, y, N); break;
  }
}

template <class W, class Dec>
void RowRange(const W& w, int64_t n_begin, int64_t n_end, const float* x, int64_t M, float* y, int64_t N,
              std::vector<float>& scratch) {
  const int64_t K = w.K, nb = K / kBlock;
  if (M <= 8) {  // 4 weight rows at a time for M <= 2, else 2 (registers: R * M accumulators + 2R weights)
    Dec dec(w);
    int64_t n = n_begin;
    if (M == 1)
      for (; n + 4 <= n_end; n += 4) TileKernel<1, 4>(dec, nb, n, x, K, y, N);
    if (M == 2)
      for (; n + 4 <= n_end; n += 4) TileKernel<2, 4>(dec, nb, n, x, K, y, N);
    for (; n + 2 <= n_end; n += 2) SmallM<2>(dec, nb, n, x, M, K, y, N);
    for (; n < n_end; ++n) SmallM<1>(dec, nb, n, x, M, K, y, N);
    return;
  }
  // M > 8: dequantize 2 rows once into scratch, then tiles of 8 x rows (and one remainder tile).
  constexpr int R = 2;
  scratch.resize(size_t(R * K));
  Dec dec(w);
  for (int64_t n = n_begin; n < n_end; n += R) {
    const int64_t rows = std::min<int64_t>(R, n_end - n);
    alignas(64) float scales[Dec::kScales * 16];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int64_t count = std::min<int64_t>(16, nb - b0);
        dec.Scales(n + r, b0, count, scales);
        for (int64_t j = 0; j < count; ++j) {
          __m512 lo, hi;
          dec(n + r, b0 + j, scales + j, lo, hi);
          _mm512_storeu_ps(scratch.data() + r * K + (b0 + j) * kBlock, lo);
          _mm512_storeu_ps(scratch.data() + r * K + (b0 + j) * kBlock + 16, hi);
        }
      }
    DecodeF32 f{scratch.data(), K, n};
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mt = std::min<int64_t>(8, M - m0);
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      if (rows == 2) {
        switch (mt) {
          case 8: TileKernel<8, 2>(f, nb, n, xm, K, ym, N); break;
          default: SmallM<2>(f, nb, n, xm, mt, K, ym, N); break;
        }
      } else {
        SmallM<1>(f, nb, n, xm, mt, K, ym, N);
      }
    }
  }
}

template <class W>
void RowRangeFor(const W& w, int64_t n_begin, int64_t n_end, const float* x, int64_t M, float* y, int64_t N,
                 std::vector<float>& scratch);

template <>
void RowRangeFor(const Q41& w, int64_t a, int64_t b, const float* x, int64_t M, float* y, int64_t N,
                 std::vector<float>& s) {
  RowRange<Q41, DecodeQ41>(w, a, b, x, M, y, N, s);
}
template <>
void RowRangeFor(const Q80& w, int64_t a, int64_t b, const float* x, int64_t M, float* y, int64_t N,
                 std::vector<float>& s) {
  RowRange<Q80, DecodeQ80>(w, a, b, x, M, y, N, s);
}

#else  // scalar fallback

template <class W>
void RowRangeFor(const W& w, int64_t n_begin, int64_t n_end, const float* x, int64_t M, float* y, int64_t N,
                 std::vector<float>& scratch) {
  const int64_t K = w.K;
  scratch.resize(size_t(K));
  for (int64_t n = n_begin; n < n_end; ++n) {
    DequantRowScalar(w, n, scratch.data());
    for (int64_t i = 0; i < M; ++i) {
      const float* xi = x + i * K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += xi[k + j] * scratch[k + j];
      y[i * N + n] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

#endif

// ------------------------------------------------------------------------------------------ threading

std::atomic<int64_t> g_last_pool_threads{-1};  // what the last call's pool reported (diagnostics)

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <class W>
void RunParallel(ffi::ThreadPool& pool, const W& w, int64_t N, const float* x, int64_t M, float* y) {
  // Chunks of whole row groups (multiple of 4 rows), ~4 per thread for balance, >= 16 rows each.
  // LLMC_NATIVE_THREADS=n caps the threads used (read once; unset or 0: the whole pool)
  static const int64_t cap = [] {
    const char* v = std::getenv("LLMC_NATIVE_THREADS");
    return v ? std::max<int64_t>(0, std::atoll(v)) : int64_t(0);
  }();
  int64_t nthreads = pool.num_threads();
  g_last_pool_threads.store(nthreads, std::memory_order_relaxed);
  if (cap > 0) nthreads = std::min(nthreads, cap);
  const int64_t work = N * w.K * std::max<int64_t>(M, 1);
  if (work < (int64_t(1) << 16)) nthreads = 1;  // tiny: not worth a task
  if (nthreads <= 1) {
    std::vector<float> scratch;
    RowRangeFor(w, 0, N, x, M, y, N, scratch);
    return;
  }
  int64_t chunk = (N + nthreads * 4 - 1) / (nthreads * 4);
  chunk = std::max<int64_t>(16, (chunk + 3) / 4 * 4);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  if (nchunks <= 1) {
    std::vector<float> scratch;
    RowRangeFor(w, 0, N, x, M, y, N, scratch);
    return;
  }
  auto shared = std::make_shared<Shared>();
  // Copies of everything a late task needs; it only reads them after taking a chunk, which it cannot once
  // all are taken (then the caller may already have returned: nothing else is touched).
  auto work_fn = [shared, w, N, x, M, y, chunk, nchunks]() {
    std::vector<float> scratch;
    for (;;) {
      const int64_t c = shared->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) break;
      const int64_t a = c * chunk, b = std::min(N, a + chunk);
      RowRangeFor(w, a, b, x, M, y, N, scratch);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t tasks = std::min<int64_t>(nthreads, nchunks) - 1;
  for (int64_t t = 0; t < tasks; ++t) {
    auto task = work_fn;  // Schedule takes its callable by value (an rvalue)
    pool.Schedule(std::move(task));
  }
  work_fn();
  // Chunks taken by pool threads may still be running: wait for them (they never wait on us).
  while (shared->done.load(std::memory_order_acquire) < nchunks) std::this_thread::yield();
}

// ------------------------------------------------------------------------------------------ FFI handlers

ffi::Error CheckX(const ffi::Buffer<ffi::F32>& x, int64_t& M, int64_t& K) {
  auto dx = x.dimensions();
  if (dx.size() != 2) return ffi::Error::InvalidArgument("gguf_matmul: x must be 2-D [M, K]");
  M = dx[0];
  K = dx[1];
  if (K % kBlock) return ffi::Error::InvalidArgument("gguf_matmul: K must be a multiple of 32");
  return ffi::Error::Success();
}

ffi::Error Q41Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q, ffi::Buffer<ffi::F16> d,
                   ffi::Buffer<ffi::F16> m, ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K;
  if (auto e = CheckX(x, M, K); e.failure()) return e;
  auto dq = q.dimensions(), dd = d.dimensions(), dm = m.dimensions(), dy = y->dimensions();
  if (dq.size() != 2 || dd.size() != 2 || dm.size() != 2 || dy.size() != 2)
    return ffi::Error::InvalidArgument("gguf_matmul q4_1: parts must be 2-D");
  const int64_t N = dq[0];
  if (dq[1] != K / 2 || dd[0] != N || dd[1] != K / kBlock || dm[0] != N || dm[1] != K / kBlock || dy[0] != M ||
      dy[1] != N)
    return ffi::Error::InvalidArgument("gguf_matmul q4_1: part shapes do not match x [M, K]");
  if (M == 0 || N == 0) return ffi::Error::Success();
  Q41 w{q.typed_data(), d.typed_data(), m.typed_data(), K};
  RunParallel(pool, w, N, x.typed_data(), M, y->typed_data());
  return ffi::Error::Success();
}

ffi::Error Q80Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F16> d,
                   ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K;
  if (auto e = CheckX(x, M, K); e.failure()) return e;
  auto dq = q.dimensions(), dd = d.dimensions(), dy = y->dimensions();
  if (dq.size() != 2 || dd.size() != 2 || dy.size() != 2)
    return ffi::Error::InvalidArgument("gguf_matmul q8_0: parts must be 2-D");
  const int64_t N = dq[0];
  if (dq[1] != K || dd[0] != N || dd[1] != K / kBlock || dy[0] != M || dy[1] != N)
    return ffi::Error::InvalidArgument("gguf_matmul q8_0: part shapes do not match x [M, K]");
  if (M == 0 || N == 0) return ffi::Error::Success();
  Q80 w{q.typed_data(), d.typed_data(), K};
  RunParallel(pool, w, N, x.typed_data(), M, y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmcGgufMatmulQ4_1, Q41Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmcGgufMatmulQ8_0, Q80Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Threads XLA's intra-op pool reported to the last call (-1: no call yet), for diagnostics.
extern "C" int64_t LlmcGgufMatmulPoolThreads() { return g_last_pool_threads.load(std::memory_order_relaxed); }

// Which code path this build has (for tests and reports): 1 = AVX-512, 0 = scalar.
extern "C" int LlmcGgufMatmulIsa() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}
