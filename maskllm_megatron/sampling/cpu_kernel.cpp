// Fused Gumbel-softmax N:M mask sampling for CPU (OpenMP). Same function as the Triton kernel
// and the PyTorch path in this package; see noise.py for the noise layout and __init__.py for
// the math. Built on first use by cpu_kernel.py and called through ctypes on raw pointers.
//
// Forward:  y = softmax((kappa * logits + g) / tau)   (hard: one-hot of argmax, straight-through)
//           mask = y @ candidates, out = W * mask, reg_tiles[t] = sum over tile t of (W * mask)^2
// Backward: recomputes y from the same keys; writes d(logits) (or adds it to a gradient buffer
//           of any float dtype: megatron's gradient-accumulation fusion) and optionally d(W).
// Numerics: everything in fp32 (the regulariser summed in double per tile), each output rounded
// once, to nearest even, to its dtype; within one ulp of a float64 reference for bf16/fp16 (see
// cpu_kernel.py). Compiled with -ffast-math for glibc's vector logf/expf but linked without it,
// so that crtfastmath.o does not set flush-to-zero for the whole process.
#include <cmath>
#include <cstdint>

namespace {

constexpr int kTile = 64;       // groups processed together (vectorised over this axis)
constexpr int kMaxC = 128;      // candidates
constexpr int kMaxM = 16;       // group size

// ---- element types: 0 = float32, 1 = bfloat16, 2 = float16
struct BF16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(BF16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline float to_float(_Float16 x) { return static_cast<float>(x); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }
template <> inline BF16 from_float<BF16>(float x) {  // round to nearest even, like torch
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}

// ---- Random123 Philox4x32-10, bit-identical to triton.language.philox (scalar state so that
// the loop over groups vectorises)
inline void philox(uint32_t k0, uint32_t k1, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                   uint32_t& c3) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct Params {
  int64_t rows, gpr;                     // local shard: rows x groups-per-row
  int C, N, M;
  int64_t row_offset, gcol_offset, groups_per_row;  // global group index layout
  uint32_t k0, k1;
  float kappa, tau;
  int hard;
  const int64_t* positions;              // [C, N] kept positions of each candidate
};

// z = (kappa * logits + g) / tau for the nt groups starting at local flat group g0, then the soft
// index y (softmax over candidates) and the argmax. y is laid out [C][kTile]. Every loop runs the
// full kTile lanes (lanes past nt repeat the last group) so each group takes the same vector code
// path wherever it sits: results are bitwise independent of the shard layout.
inline void soft_index(const Params& p, const float* logits, int64_t g0, int nt,
                       float (*y)[kTile], int* argmax) {
  int64_t q[kTile], local[kTile];
  int64_t r = g0 / p.gpr, j = g0 % p.gpr;
  for (int i = 0; i < kTile; ++i) {
    if (i < nt) {
      q[i] = (p.row_offset + r) * p.groups_per_row + p.gcol_offset + j;
      local[i] = g0 + i;
      if (++j == p.gpr) { j = 0; ++r; }
    } else {
      q[i] = q[nt - 1];
      local[i] = local[nt - 1];
    }
  }
  const float inv_tau = 1.0f / p.tau;
  for (int block = 0; 4 * block < p.C; ++block) {
    uint32_t words[4][kTile];
#pragma omp simd
    for (int i = 0; i < kTile; ++i) {
      const uint64_t qi = static_cast<uint64_t>(q[i]);
      uint32_t c0 = static_cast<uint32_t>(qi), c1 = static_cast<uint32_t>(qi >> 32);
      uint32_t c2 = static_cast<uint32_t>(block), c3 = 0u;
      philox(p.k0, p.k1, c0, c1, c2, c3);
      words[0][i] = c0; words[1][i] = c1; words[2][i] = c2; words[3][i] = c3;
    }
    for (int lane = 0; lane < 4 && 4 * block + lane < p.C; ++lane) {
      const int cand = 4 * block + lane;
#pragma omp simd
      for (int i = 0; i < kTile; ++i) {
        const float u = (static_cast<float>(words[lane][i] >> 9) + 0.5f) * 1.1920928955078125e-07f;
        const float g = -logf(-logf(u));
        y[cand][i] = (p.kappa * logits[local[i] * p.C + cand] + g) * inv_tau;
      }
    }
  }
  float zmax[kTile], total[kTile];
  for (int i = 0; i < kTile; ++i) { zmax[i] = y[0][i]; argmax[i] = 0; total[i] = 0.f; }
  for (int c = 1; c < p.C; ++c)
    for (int i = 0; i < kTile; ++i)
      if (y[c][i] > zmax[i]) { zmax[i] = y[c][i]; argmax[i] = c; }
  for (int c = 0; c < p.C; ++c) {
#pragma omp simd
    for (int i = 0; i < kTile; ++i) {
      y[c][i] = expf(y[c][i] - zmax[i]);
      total[i] += y[c][i];
    }
  }
  for (int c = 0; c < p.C; ++c)
#pragma omp simd
    for (int i = 0; i < kTile; ++i) y[c][i] /= total[i];
}

// masks of the tile, [M][kTile] (soft: y @ candidates; hard: the argmax candidate)
inline void tile_mask(const Params& p, float (*y)[kTile], const int* argmax,
                      float (*m)[kTile]) {
  for (int k = 0; k < p.M; ++k)
    for (int i = 0; i < kTile; ++i) m[k][i] = 0.f;
  if (p.hard) {
    for (int i = 0; i < kTile; ++i)
      for (int n = 0; n < p.N; ++n) m[p.positions[argmax[i] * p.N + n]][i] = 1.f;
    return;
  }
  for (int c = 0; c < p.C; ++c)
    for (int n = 0; n < p.N; ++n) {
      float* mk = m[p.positions[c * p.N + n]];
#pragma omp simd
      for (int i = 0; i < kTile; ++i) mk[i] += y[c][i];
    }
}

// Soft index and masks of tile t; returns how many of its kTile lanes are real groups.
inline int prepare_tile(const Params& p, const float* logits, int64_t t, float (*y)[kTile],
                        int* argmax, float (*m)[kTile]) {
  const int64_t n_groups = p.rows * p.gpr, g0 = t * kTile;
  const int nt = static_cast<int>(n_groups - g0 < kTile ? n_groups - g0 : kTile);
  soft_index(p, logits, g0, nt, y, argmax);
  tile_mask(p, y, argmax, m);
  return nt;
}

template <typename T>
void forward(const Params& p, const T* w, const float* logits, T* out, double* reg_tiles,
             int nthreads) {
  const int64_t n_tiles = (p.rows * p.gpr + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    float y[kMaxC][kTile];
    float m[kMaxM][kTile];
    int argmax[kTile];
    double reg = 0.0;
    const int nt = prepare_tile(p, logits, t, y, argmax, m);
    for (int i = 0; i < nt; ++i) {
      const int64_t base = (t * kTile + i) * p.M;
      for (int k = 0; k < p.M; ++k) {
        const float o = to_float(w[base + k]) * m[k][i];
        out[base + k] = from_float<T>(o);
        reg += static_cast<double>(o) * o;
      }
    }
    reg_tiles[t] = reg;
  }
}

// d(logits) of one tile into the destination: written, or added with one rounding to the
// destination's dtype exactly like torch's ``dst.add_(fp32 gradient)``. Out of line so that the
// compiler cannot contract the addition with the product that made ``values`` (FMA).
__attribute__((noinline)) void store_logit_grads(void* dst, int dtype, int accumulate,
                                                 int64_t offset, const float* values, int count) {
  switch (dtype) {
    case 0: {
      float* d = static_cast<float*>(dst) + offset;
      for (int i = 0; i < count; ++i) d[i] = accumulate ? d[i] + values[i] : values[i];
      return;
    }
    case 1: {
      BF16* d = static_cast<BF16*>(dst) + offset;
      for (int i = 0; i < count; ++i)
        d[i] = from_float<BF16>(accumulate ? to_float(d[i]) + values[i] : values[i]);
      return;
    }
    default: {
      _Float16* d = static_cast<_Float16*>(dst) + offset;
      for (int i = 0; i < count; ++i)
        d[i] = from_float<_Float16>(accumulate ? to_float(d[i]) + values[i] : values[i]);
      return;
    }
  }
}

template <typename T>
void backward(const Params& p, const T* grad_out, const T* w, const float* logits,
              float grad_reg, void* grad_logits, int grad_dtype, int accumulate, T* grad_w,
              int nthreads) {
  const float scale = p.kappa / p.tau;
  const int64_t n_tiles = (p.rows * p.gpr + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    float y[kMaxC][kTile], dy[kMaxC][kTile];
    float m[kMaxM][kTile], dm[kMaxM][kTile];
    int argmax[kTile];
    const int nt = prepare_tile(p, logits, t, y, argmax, m);
    const int64_t g0 = t * kTile;
    for (int i = 0; i < nt; ++i) {
      const int64_t base = (g0 + i) * p.M;
      for (int k = 0; k < p.M; ++k) {
        const float wk = to_float(w[base + k]), gk = to_float(grad_out[base + k]);
        const float mk = m[k][i];
        dm[k][i] = gk * wk + 2.f * grad_reg * wk * wk * mk;
        // the regulariser acts on W.detach() (the paper's): it adds nothing to dW
        if (grad_w) grad_w[base + k] = from_float<T>(gk * mk);
      }
    }
    for (int i = nt; i < kTile; ++i)  // padding lanes: defined values, never stored
      for (int k = 0; k < p.M; ++k) dm[k][i] = 0.f;
    float s[kTile];
    for (int i = 0; i < kTile; ++i) s[i] = 0.f;
    for (int c = 0; c < p.C; ++c) {
      float* dyc = dy[c];
      for (int i = 0; i < kTile; ++i) dyc[i] = 0.f;
      for (int n = 0; n < p.N; ++n) {
        const float* dmk = dm[p.positions[c * p.N + n]];
#pragma omp simd
        for (int i = 0; i < kTile; ++i) dyc[i] += dmk[i];
      }
#pragma omp simd
      for (int i = 0; i < kTile; ++i) s[i] += y[c][i] * dyc[i];
    }
    float dl[kTile * kMaxC];
    for (int i = 0; i < nt; ++i)
      for (int c = 0; c < p.C; ++c) dl[i * p.C + c] = scale * y[c][i] * (dy[c][i] - s[i]);
    store_logit_grads(grad_logits, grad_dtype, accumulate, g0 * p.C, dl, nt * p.C);
  }
}

Params make_params(int64_t rows, int64_t gpr, int C, int N, int M, int64_t row_offset,
                   int64_t gcol_offset, int64_t groups_per_row, uint64_t key, float kappa,
                   float tau, int hard, const int64_t* positions) {
  return Params{rows, gpr, C, N, M, row_offset, gcol_offset, groups_per_row,
                static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), kappa, tau, hard,
                positions};
}

}  // namespace

extern "C" {

int maskllm_limits(int which) { return which == 0 ? kMaxC : which == 1 ? kMaxM : kTile; }

// The generator the kernel draws its noise from, for known-answer tests: counters[4] in place.
void maskllm_philox(uint32_t k0, uint32_t k1, uint32_t* counters) {
  philox(k0, k1, counters[0], counters[1], counters[2], counters[3]);
}

int maskllm_gumbel_forward(const void* w, int dtype, const float* logits, const int64_t* positions,
                           int64_t rows, int64_t gpr, int C, int N, int M, int64_t row_offset,
                           int64_t gcol_offset, int64_t groups_per_row, uint64_t key, float kappa,
                           float tau, int hard, void* out, double* reg_tiles, int nthreads) {
  if (C > kMaxC || M > kMaxM) return 1;
  const Params p = make_params(rows, gpr, C, N, M, row_offset, gcol_offset, groups_per_row, key,
                               kappa, tau, hard, positions);
  switch (dtype) {
    case 0: forward(p, static_cast<const float*>(w), logits, static_cast<float*>(out), reg_tiles, nthreads); return 0;
    case 1: forward(p, static_cast<const BF16*>(w), logits, static_cast<BF16*>(out), reg_tiles, nthreads); return 0;
    case 2: forward(p, static_cast<const _Float16*>(w), logits, static_cast<_Float16*>(out), reg_tiles, nthreads); return 0;
    default: return 2;
  }
}

int maskllm_gumbel_backward(const void* grad_out, const void* w, int dtype, const float* logits,
                            const int64_t* positions, int64_t rows, int64_t gpr, int C, int N,
                            int M, int64_t row_offset, int64_t gcol_offset, int64_t groups_per_row,
                            uint64_t key, float kappa, float tau, int hard, float grad_reg,
                            void* grad_logits, int grad_dtype, int accumulate, void* grad_w,
                            int nthreads) {
  if (C > kMaxC || M > kMaxM) return 1;
  if (grad_dtype < 0 || grad_dtype > 2) return 2;
  const Params p = make_params(rows, gpr, C, N, M, row_offset, gcol_offset, groups_per_row, key,
                               kappa, tau, hard, positions);
  switch (dtype) {
    case 0: backward(p, static_cast<const float*>(grad_out), static_cast<const float*>(w), logits, grad_reg, grad_logits, grad_dtype, accumulate, static_cast<float*>(grad_w), nthreads); return 0;
    case 1: backward(p, static_cast<const BF16*>(grad_out), static_cast<const BF16*>(w), logits, grad_reg, grad_logits, grad_dtype, accumulate, static_cast<BF16*>(grad_w), nthreads); return 0;
    case 2: backward(p, static_cast<const _Float16*>(grad_out), static_cast<const _Float16*>(w), logits, grad_reg, grad_logits, grad_dtype, accumulate, static_cast<_Float16*>(grad_w), nthreads); return 0;
    default: return 2;
  }
}

}  // extern "C"
