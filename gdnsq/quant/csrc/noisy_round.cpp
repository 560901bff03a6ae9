// CPU kernels of GDNSQ's noisy rounding: the CPU implementation of the ops in gdnsq/quant/ops.py.
//
// forward: one pass, reads x and writes x̂. backward: one pass per piece of the tensor (two for adaptive EWGS,
// whose scale needs the whole group's statistics first): reads x and g, writes the input gradient and accumulates
// the per-group sums the step and clamp gradients need. weight_forward also finds each output channel's range
// (min, max and the first arg-extremes) in the pass that quantizes it; backward adds the range's gradient at the
// arg-extremes into the weight's gradient it writes.
//
// Layout: x (and g) dense, viewed in memory order as (C, K): C step groups (the output channels of a per-channel
// weight, or 1 for a per-tensor quantizer), K elements each. z, s and the clamp bounds are length-C float tensors
// computed by torch (ops.py), so they are the reference graph's values bit for bit.
//
// Dtypes: x, g and x̂ may be float32, bfloat16 or float16 (each its own); every piece is converted to float32
// tiles, computed in float32 and rounded once on store (round-to-nearest-even, as torch's .to()).
//
// Random draws: the counter-based hash of gdnsq/quant/dither.py, keyed per call: the dither r = ±1/2 of the step
// gradient and the optional rounding noise u, recomputed in backward from the same key.
//
// Exactness: every elementwise result repeats the torch reference's float operations in the same order
// (compiled with -ffp-contract=off, so no FMA contraction), hence x̂ and the input gradient are bit-identical
// (adaptive EWGS: up to its scale, itself computed from sums). Sums are accumulated in float SIMD lanes over fixed
// 4 Ki-element pieces and across pieces in double in piece order: deterministic whatever the thread count (the
// lane count is the build's vector width, fused.py: SSE4.1, AVX2 or AVX-512, as torch's own kernels use).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 12;
constexpr int64_t kKeyMask = (int64_t{1} << 62) - 1;
constexpr int64_t kKeyStep = static_cast<int64_t>(0x9E3779B97F4A7C15ull & 0x3FFFFFFFFFFFFFFFull);
constexpr uint32_t kNoiseStream = 0x68E31DA4u;
enum Mode : int64_t { kSte = 0, kLsq = 1, kEwgs = 2, kAewgs = 3 };

// ------------------------------------------------------------------ counter-based draws (dither.py)
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Key {
  uint32_t lo, hi;
};

Key split_key(int64_t k) {
  const auto u = static_cast<uint64_t>(k);
  return {static_cast<uint32_t>(u & 0xFFFFFFFFu), static_cast<uint32_t>(u >> 32)};
}

inline float sign_draw(uint32_t a, Key k) { return (mix32(a ^ k.hi) >> 31) ? 0.5f : -0.5f; }
inline float uniform_draw(uint32_t a, Key k) {
  return static_cast<float>(mix32(a ^ k.hi ^ kNoiseStream) >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// ------------------------------------------------------------------ groups and pieces
struct Group {
  float z, s, vlo, vhi, lo, hi;
};

// Work items: pieces of the flat range cut at every group boundary and every multiple of kChunk, in flat order;
// per-group sums add their pieces in this order.
struct Piece {
  int64_t c, begin, end;
};

std::vector<Piece> pieces(int64_t C, int64_t K) {
  std::vector<Piece> out;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = c * K; b < (c + 1) * K;) {
      const int64_t e = std::min((c + 1) * K, (b / kChunk + 1) * kChunk);
      out.push_back({c, b, e});
      b = e;
    }
  return out;
}

torch::Tensor params(const torch::Tensor& t) { return t.contiguous().to(torch::kFloat); }

// A piece as float32: the data itself for float tensors, else converted into ``buf`` (exact for bf16 / fp16).
template <typename T>
const float* load_tile(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Where a float tile is computed before it is stored as T: in place for float, else ``buf``.
template <typename T>
float* out_tile(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) return dst;
  else return buf;
}

template <typename T>
void store_tile(const float* src, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // round to nearest even, as torch's .to()
}

// Calls f(T{}) for a float32, bfloat16 or float16 dtype.
template <typename F>
void with_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "gdnsq noisy_round: float32, bfloat16 or float16 tensors only, got ", t);
  }
}

// ------------------------------------------------------------------ elementwise maths (float tiles)
// Instantiated per case so each loop is branch-free, and marked ``omp simd`` so the compiler vectorizes it: the
// reductions may be reordered across SIMD lanes (the order is still fixed by the code, not the thread count);
// every elementwise float operation stays as written.
template <bool kClamp>
inline float grid_value(float x, const Group& p) {
  float v = (x - p.z) / p.s;
  if (kClamp) v = std::min(std::max(v, p.vlo), p.vhi);
  return v;
}

// e = round(v) - v, with part of it replaced by noise where ratio > 0: e + ratio·((u - 1/2) - e)
template <bool kNoise>
inline float rounding_error(float v, uint32_t index, Key key, float ratio) {
  float e = std::nearbyint(v) - v;
  if (kNoise) e = e + ratio * ((uniform_draw(mix32(index ^ key.lo), key) - 0.5f) - e);
  return e;
}

template <bool kClamp, bool kAddError, bool kNoise>
void forward_tile(const float* __restrict x, float* __restrict out, const Group p, int64_t n, uint32_t base, Key key,
                  float ratio) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = grid_value<kClamp>(x[i], p);
    float q;
    if (kAddError || kNoise) q = v + rounding_error<kNoise>(v, base + static_cast<uint32_t>(i), key, ratio);
    else q = std::nearbyint(v);
    out[i] = q * p.s + p.z;
  }
}

struct Sums {
  double below = 0, above = 0, ge = 0, gr = 0, sge = 0, ee = 0, es = 0;
};

// Per piece: Σ g·[x < lo], Σ g·[x > hi], Σ g·e, Σ g·r and (kStats, adaptive EWGS) Σ sign(g)·e, Σ e², Σ e.
template <bool kClamp, bool kDither, bool kNoise, bool kStats>
__attribute__((noinline)) Sums tile_sums(const float* __restrict x, const float* __restrict g, const Group p,
                                         int64_t n, uint32_t base, Key key, float ratio) {
  // float lanes within a piece (a double accumulation would take 3x as long), double across pieces
  float below = 0, above = 0, ge = 0, gr = 0, sge = 0, ee = 0, es = 0;
#pragma omp simd reduction(+ : below, above, ge, gr, sge, ee, es)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], gi = g[i];
    const uint32_t index = base + static_cast<uint32_t>(i);
    const float e = rounding_error<kNoise>(grid_value<kClamp>(xi, p), index, key, ratio);
    ge += gi * e;
    if (kDither) gr += gi * sign_draw(mix32(index ^ key.lo), key);
    if (kClamp) {
      below += xi < p.lo ? gi : 0.f;
      above += xi > p.hi ? gi : 0.f;
    }
    if (kStats) {
      sge += static_cast<float>((0.f < gi) - (gi < 0.f)) * e;
      ee += e * e;
      es += e;
    }
  }
  Sums s;
  s.below = below, s.above = above, s.ge = ge, s.gr = gr, s.sge = sge, s.ee = ee, s.es = es;
  return s;
}

// The input gradient: g (ste, lsq), g - δ·|g|·e (EWGS), g·(1 - min(d·sign(g)·e, 0.99)) (adaptive EWGS, d per
// group), zeroed outside [lo, hi]. A loop of its own: fused into the sums' loop it ran 2-3x slower.
template <int64_t kMode, bool kClamp, bool kNoise>
__attribute__((noinline)) void tile_grad(const float* __restrict x, const float* __restrict g, float* __restrict gx,
                                         const Group p, int64_t n, uint32_t base, Key key, float ratio, float delta,
                                         float d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], gi = g[i];
    float out = gi;
    if (kMode == kEwgs || kMode == kAewgs) {
      const float e = rounding_error<kNoise>(grid_value<kClamp>(xi, p), base + static_cast<uint32_t>(i), key, ratio);
      if (kMode == kEwgs) {
        out = gi - delta * std::fabs(gi) * e;
      } else {
        const float t = d * (static_cast<float>((0.f < gi) - (gi < 0.f)) * e);
        out = gi * (1.0f - (t > 0.99f ? 0.99f : t));
      }
    }
    if (kClamp) out = ((xi < p.lo) | (xi > p.hi)) ? 0.f : out;
    gx[i] = out;
  }
}

template <bool kClamp, bool kNoise>
Sums sums_for(const float* x, const float* g, const Group& p, int64_t n, uint32_t base, Key key, float ratio,
              bool dither, bool stats) {
  if (dither) {
    return stats ? tile_sums<kClamp, true, kNoise, true>(x, g, p, n, base, key, ratio)
                 : tile_sums<kClamp, true, kNoise, false>(x, g, p, n, base, key, ratio);
  }
  return stats ? tile_sums<kClamp, false, kNoise, true>(x, g, p, n, base, key, ratio)
               : tile_sums<kClamp, false, kNoise, false>(x, g, p, n, base, key, ratio);
}

template <bool kClamp, bool kNoise>
void grad_for(int64_t mode, const float* x, const float* g, float* gx, const Group& p, int64_t n, uint32_t base,
              Key key, float ratio, float delta, float d) {
  switch (mode) {
    case kEwgs: tile_grad<kEwgs, kClamp, kNoise>(x, g, gx, p, n, base, key, ratio, delta, d); break;
    case kAewgs: tile_grad<kAewgs, kClamp, kNoise>(x, g, gx, p, n, base, key, ratio, delta, d); break;
    default: tile_grad<kSte, kClamp, kNoise>(x, g, gx, p, n, base, key, ratio, delta, d);
  }
}

// (min, max) of row[0, K) and their first indices (as torch.min / torch.max along a dim choose). An element-wise
// min / max is exact, so SIMD lanes may reorder it; a NaN anywhere gives NaN for both, as torch's do.
template <typename T>
void row_range(const T* __restrict row, int64_t K, float& lo, float& hi, int64_t& ilo, int64_t& ihi) {
  float mn = static_cast<float>(row[0]), mx = mn;
  int nan = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nan)
  for (int64_t i = 0; i < K; ++i) {
    const float x = static_cast<float>(row[i]);
    mn = mn < x ? mn : x;
    mx = mx > x ? mx : x;
    nan |= x != x;
  }
  lo = nan ? NAN : mn;
  hi = nan ? NAN : mx;
  ilo = ihi = 0;
  for (int64_t i = 0; i < K; ++i)
    if (static_cast<float>(row[i]) == mn) { ilo = i; break; }
  for (int64_t i = 0; i < K; ++i)
    if (static_cast<float>(row[i]) == mx) { ihi = i; break; }
}

Group group_at(const float* z, const float* s, const float* vlo, const float* vhi, const float* lo, const float* hi,
               int64_t c, bool clamp) {
  Group g{z[c], s[c], 0.f, 0.f, 0.f, 0.f};
  if (clamp) g.vlo = vlo[c], g.vhi = vhi[c], g.lo = lo[c], g.hi = hi[c];
  return g;
}

template <typename TX, typename TO>
void forward_piece(const TX* px, TO* po, const Group& p, const Piece& piece, bool clamp, bool add_error, bool noise,
                   Key key, float ratio) {
  float xb[kChunk], ob[kChunk];
  const int64_t n = piece.end - piece.begin;
  const float* x = load_tile(px + piece.begin, n, xb);
  float* out = out_tile(po + piece.begin, ob);
  const auto base = static_cast<uint32_t>(piece.begin);
  const bool add = add_error || noise;
  if (clamp) {
    if (noise) forward_tile<true, true, true>(x, out, p, n, base, key, ratio);
    else if (add) forward_tile<true, true, false>(x, out, p, n, base, key, ratio);
    else forward_tile<true, false, false>(x, out, p, n, base, key, ratio);
  } else {
    if (noise) forward_tile<false, true, true>(x, out, p, n, base, key, ratio);
    else if (add) forward_tile<false, true, false>(x, out, p, n, base, key, ratio);
    else forward_tile<false, false, false>(x, out, p, n, base, key, ratio);
  }
  store_tile(out, po + piece.begin, n);
}

int64_t key_of(const torch::Tensor& key) { return key.defined() && key.numel() ? key.item<int64_t>() : 0; }

}  // namespace

// The key for this call (a new 0-dim int64 tensor) and ``state`` advanced in place, as dither.next_key_.
torch::Tensor take_key(torch::Tensor state) {
  TORCH_CHECK(state.scalar_type() == torch::kLong && state.numel() == 1, "gdnsq noisy_round: int64 key state");
  auto key = state.clone();
  int64_t* p = state.data_ptr<int64_t>();
  *p = (*p + kKeyStep) & kKeyMask;
  return key;
}

// x̂ = round(clamp((x - z) / s, vlo, vhi)) * s + z, as ``out_dtype``; with ``add_error`` (estimators other than
// ste) or noise the reference's v + e is repeated instead of round(v), which can differ in the last bit.
torch::Tensor noisy_round_forward(torch::Tensor x, torch::Tensor z, torch::Tensor s, torch::Tensor vlo,
                                  torch::Tensor vhi, bool clamp, bool add_error, torch::Tensor key, double noise_ratio,
                                  at::ScalarType out_dtype) {
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "gdnsq noisy_round: dense x");
  const int64_t C = z.numel(), N = x.numel();
  TORCH_CHECK(C > 0 && N % C == 0, "gdnsq noisy_round: groups do not divide x");
  const int64_t K = N / C;
  auto zc = params(z), sc = params(s), lc = clamp ? params(vlo) : zc, hc = clamp ? params(vhi) : zc;
  auto out = torch::empty_like(x, x.options().dtype(out_dtype));
  const float *pz = zc.data_ptr<float>(), *ps = sc.data_ptr<float>();
  const float *pl = lc.data_ptr<float>(), *ph = hc.data_ptr<float>();
  const Key k = split_key(key_of(key));
  const bool noise = noise_ratio > 0;
  const auto ratio = static_cast<float>(noise_ratio);
  const auto work = pieces(C, K);
  with_dtype(x.scalar_type(), [&](auto tx) {
    with_dtype(out_dtype, [&](auto to) {
      using TX = decltype(tx);
      using TO = decltype(to);
      const TX* px = reinterpret_cast<const TX*>(x.data_ptr());
      TO* po = reinterpret_cast<TO*>(out.data_ptr());
      at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w) {
          const Group p = group_at(pz, ps, pl, ph, pl, ph, work[w].c, clamp);
          forward_piece(px, po, p, work[w], clamp, add_error, noise, k, ratio);
        }
      });
    });
  });
  return out;
}

// Returns (grad_x as x's dtype, or an empty tensor; sums[4, C]) with, per group c:
//   sums[0] = Σ g·[x < lo]   sums[1] = Σ g·[x > hi]   sums[2] = Σ g·e   sums[3] = Σ g·r
// e = round(v) - v on the clamped v (with the forward's noise); r = the ±1/2 dither of ``key`` (``dither`` on).
// The input gradient follows ``mode`` (ste, lsq, ewgs with ``delta``, aewgs); with index[2, C], g_lo[C] and
// g_hi[C] (a weight's range gradient) g_lo is added at element index[0, c] of row c, then g_hi at index[1, c].
std::vector<torch::Tensor> noisy_round_backward(torch::Tensor x, torch::Tensor g, torch::Tensor z, torch::Tensor s,
                                                torch::Tensor vlo, torch::Tensor vhi, torch::Tensor lo,
                                                torch::Tensor hi, bool clamp, int64_t mode, double delta,
                                                torch::Tensor key, double noise_ratio, bool dither, bool need_grad_x,
                                                torch::Tensor index, torch::Tensor g_lo, torch::Tensor g_hi) {
  TORCH_CHECK(x.is_non_overlapping_and_dense() && x.sizes() == g.sizes() && x.strides() == g.strides(),
              "gdnsq noisy_round: dense x and g of one shape and layout");
  const int64_t C = z.numel(), N = x.numel();
  TORCH_CHECK(C > 0 && N % C == 0, "gdnsq noisy_round: groups do not divide x");
  const int64_t K = N / C;
  auto zc = params(z), sc = params(s);
  auto lvc = clamp ? params(vlo) : zc, hvc = clamp ? params(vhi) : zc;
  auto lc = clamp ? params(lo) : zc, hc = clamp ? params(hi) : zc;
  const float *pz = zc.data_ptr<float>(), *ps = sc.data_ptr<float>(), *plv = lvc.data_ptr<float>();
  const float *phv = hvc.data_ptr<float>(), *plo = lc.data_ptr<float>(), *phi = hc.data_ptr<float>();
  const Key k = split_key(key_of(key));
  const bool noise = noise_ratio > 0, stats = mode == kAewgs;
  const auto ratio = static_cast<float>(noise_ratio), fdelta = static_cast<float>(delta);
  auto grad_x = need_grad_x ? torch::empty_like(x) : torch::Tensor();
  const auto work = pieces(C, K);
  std::vector<Sums> partial(work.size());
  std::vector<float> scale(C, 0.f);  // adaptive EWGS's d per group

  with_dtype(x.scalar_type(), [&](auto tx) {
    with_dtype(g.scalar_type(), [&](auto tg) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      const TX* px = reinterpret_cast<const TX*>(x.data_ptr());
      const TG* pg = reinterpret_cast<const TG*>(g.data_ptr());
      TX* pgx = need_grad_x ? reinterpret_cast<TX*>(grad_x.data_ptr()) : nullptr;
      // Adaptive EWGS needs its groups' statistics before any input gradient: sums first, gradients second.
      const bool grad_in_first_pass = need_grad_x && !stats;
      at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
        float xb[kChunk], gb[kChunk], ob[kChunk];
        for (int64_t w = a; w < b; ++w) {
          const Piece& pc = work[w];
          const int64_t n = pc.end - pc.begin;
          const auto base = static_cast<uint32_t>(pc.begin);
          const Group p = group_at(pz, ps, plv, phv, plo, phi, pc.c, clamp);
          const float* xt = load_tile(px + pc.begin, n, xb);
          const float* gt = load_tile(pg + pc.begin, n, gb);
          if (clamp) partial[w] = noise ? sums_for<true, true>(xt, gt, p, n, base, k, ratio, dither, stats)
                                        : sums_for<true, false>(xt, gt, p, n, base, k, ratio, dither, stats);
          else partial[w] = noise ? sums_for<false, true>(xt, gt, p, n, base, k, ratio, dither, stats)
                                  : sums_for<false, false>(xt, gt, p, n, base, k, ratio, dither, stats);
          if (grad_in_first_pass) {
            float* out = out_tile(pgx + pc.begin, ob);
            if (clamp) noise ? grad_for<true, true>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, 0.f)
                             : grad_for<true, false>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, 0.f);
            else noise ? grad_for<false, true>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, 0.f)
                       : grad_for<false, false>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, 0.f);
            store_tile(out, pgx + pc.begin, n);
          }
        }
      });
      std::vector<Sums> total(C);
      for (size_t w = 0; w < work.size(); ++w) {
        Sums& t = total[work[w].c];
        const Sums& q = partial[w];
        t.below += q.below, t.above += q.above, t.ge += q.ge, t.gr += q.gr, t.sge += q.sge, t.ee += q.ee,
            t.es += q.es;
      }
      partial.swap(total);  // partial now holds the per-group totals
      if (stats) {
        // As functional.aewgs_scale: means (float sums times 1/K), var = E[e²] - E[e]², d = mean(sign(g)·e) / var
        const auto inv = static_cast<float>(1.0 / static_cast<double>(K));
        for (int64_t c = 0; c < C; ++c) {
          const float num = static_cast<float>(partial[c].sge) * inv, e2 = static_cast<float>(partial[c].ee) * inv;
          const float me = static_cast<float>(partial[c].es) * inv;
          const float var = e2 - me * me;
          scale[c] = num / (var < 1e-3f ? 1e-3f : var);
        }
        if (need_grad_x)
          at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
            float xb[kChunk], gb[kChunk], ob[kChunk];
            for (int64_t w = a; w < b; ++w) {
              const Piece& pc = work[w];
              const int64_t n = pc.end - pc.begin;
              const auto base = static_cast<uint32_t>(pc.begin);
              const Group p = group_at(pz, ps, plv, phv, plo, phi, pc.c, clamp);
              const float* xt = load_tile(px + pc.begin, n, xb);
              const float* gt = load_tile(pg + pc.begin, n, gb);
              float* out = out_tile(pgx + pc.begin, ob);
              const float d = scale[pc.c];
              if (clamp) noise ? grad_for<true, true>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, d)
                               : grad_for<true, false>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, d);
              else noise ? grad_for<false, true>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, d)
                         : grad_for<false, false>(mode, xt, gt, out, p, n, base, k, ratio, fdelta, d);
              store_tile(out, pgx + pc.begin, n);
            }
          });
      }
      if (need_grad_x && index.defined() && index.numel() == 2 * C && g_lo.numel() == C && g_hi.numel() == C) {
        // min's, then max's: where both are one element (a constant row) the same adds as autograd's sparse add
        auto idx = index.contiguous().to(torch::kLong);
        auto gl = params(g_lo), gh = params(g_hi);
        const int64_t* pi = idx.data_ptr<int64_t>();
        const float *pgl = gl.data_ptr<float>(), *pgh = gh.data_ptr<float>();
        for (int64_t c = 0; c < C; ++c) {
          TX& a = pgx[c * K + std::clamp<int64_t>(pi[c], 0, K - 1)];
          a = static_cast<TX>(static_cast<float>(a) + pgl[c]);
          TX& b = pgx[c * K + std::clamp<int64_t>(pi[C + c], 0, K - 1)];
          b = static_cast<TX>(static_cast<float>(b) + pgh[c]);
        }
      }
    });
  });
  auto sums = torch::empty({4, C}, torch::kFloat);
  float* pt = sums.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    pt[c] = static_cast<float>(partial[c].below);
    pt[C + c] = static_cast<float>(partial[c].above);
    pt[2 * C + c] = static_cast<float>(partial[c].ge);
    pt[3 * C + c] = static_cast<float>(partial[c].gr);
  }
  return {grad_x, sums};
}

// The weight quantizer in one pass per row (output channel): the row's min and max (its grid's z = min and the
// bit-width's range) and their first indices, then x̂ with z = min; the row is read from memory once and stays in
// cache for the second loop. Returns (x̂ as out_dtype, lo[C], hi[C] as w's dtype, index[2, C]).
std::vector<torch::Tensor> weight_forward(torch::Tensor w, torch::Tensor s, bool add_error, torch::Tensor key,
                                          double noise_ratio, at::ScalarType out_dtype) {
  TORCH_CHECK(w.is_contiguous(), "gdnsq weight quantizer: contiguous w");
  const int64_t C = s.numel(), N = w.numel();
  TORCH_CHECK(C > 0 && N > 0 && N % C == 0, "gdnsq weight quantizer: channels do not divide w");
  const int64_t K = N / C;
  auto sc = params(s);
  auto out = torch::empty_like(w, w.options().dtype(out_dtype));
  auto lo = torch::empty({C}, torch::kFloat), hi = torch::empty({C}, torch::kFloat);
  auto index = torch::empty({2, C}, torch::kLong);
  const float* ps = sc.data_ptr<float>();
  float *plo = lo.data_ptr<float>(), *phi = hi.data_ptr<float>();
  int64_t* pi = index.data_ptr<int64_t>();
  const Key k = split_key(key_of(key));
  const bool noise = noise_ratio > 0;
  const auto ratio = static_cast<float>(noise_ratio);
  const auto work = pieces(C, K);
  std::vector<int64_t> first(C + 1, 0);  // each row's first piece
  for (size_t i = 0; i < work.size(); ++i)
    if (i == 0 || work[i].c != work[i - 1].c) first[work[i].c] = static_cast<int64_t>(i);
  first[C] = static_cast<int64_t>(work.size());
  with_dtype(w.scalar_type(), [&](auto tw) {
    with_dtype(out_dtype, [&](auto to) {
      using TW = decltype(tw);
      using TO = decltype(to);
      const TW* pw = reinterpret_cast<const TW*>(w.data_ptr());
      TO* po = reinterpret_cast<TO*>(out.data_ptr());
      at::parallel_for(0, C, 1, [&](int64_t a, int64_t b) {
        for (int64_t c = a; c < b; ++c) {
          row_range(pw + c * K, K, plo[c], phi[c], pi[c], pi[C + c]);
          const Group p{plo[c], ps[c], 0.f, 0.f, 0.f, 0.f};
          for (int64_t i = first[c]; i < first[c + 1]; ++i)
            forward_piece(pw, po, p, work[i], false, add_error, noise, k, ratio);
        }
      });
    });
  });
  return {out, lo.to(w.scalar_type()), hi.to(w.scalar_type()), index};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("take_key", &take_key, "the key for this call; advances the state in place");
  m.def("forward", &noisy_round_forward, "noisy rounding, forward (CPU)");
  m.def("backward", &noisy_round_backward, "noisy rounding, backward: input gradient and per-group sums (CPU)");
  m.def("weight_forward", &weight_forward, "weight quantizer (range and noisy rounding), forward (CPU)");
}
