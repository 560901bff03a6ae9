// Fused CPU kernels for GDNSQ's noisy rounding (gdnsq/quant/functional.py, ``_NoisyRound``).
//
// The pure-torch path makes ~6 passes over the tensor in forward and ~18 in backward (masks, the
// recomputed rounding error, products, reductions), each allocating. These kernels make one pass each:
// forward reads x and writes x̂; backward reads x and g, writes the masked input gradient and
// accumulates the four per-group sums the step and clamp gradients need. The weight quantizer's pair
// (weight_forward / weight_backward) also does the per-channel range in the forward's pass and writes the
// weight's gradient, the range's included, in the backward's.
//
// Layout: x (and g) contiguous, viewed as (C, K): C step groups (output channels of a per-channel
// weight, or 1 for a per-tensor quantizer), K elements each. z, s and the clamp bounds are length-C
// float tensors.
//
// Exactness: every elementwise result repeats the torch path's float operations in the same order
// (compiled with -ffp-contract=off, so no FMA contraction), hence x̂ and the input gradient are
// bit-identical. The sums are accumulated in float SIMD lanes over fixed 4 Ki-element pieces, and the
// pieces' sums in double in piece order, so they are deterministic whatever the thread count (torch's
// float sums are not), and agree with the torch path's float sums to float rounding.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 12;  // divides the sign table's window (2^21)

struct Group {
  float z, s, vlo, vhi, lo, hi;
};

Group group(const float* z, const float* s, const float* vlo, const float* vhi, const float* lo,
            const float* hi, int64_t c, bool clamp) {
  Group g{z[c], s[c], 0.f, 0.f, 0.f, 0.f};
  if (clamp) {
    g.vlo = vlo[c];
    g.vhi = vhi[c];
    g.lo = lo[c];
    g.hi = hi[c];
  }
  return g;
}

inline float grid_value(float x, const Group& p, bool clamp) {
  float v = (x - p.z) / p.s;
  if (clamp) v = std::min(std::max(v, p.vlo), p.vhi);
  return v;
}

// Work items: (group, first element, last element) pieces of the flat range, cut at every group boundary
// and every multiple of kChunk (so no piece straddles two windows of the sign table), in flat order.
// Per-group sums add their pieces in this order.
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

// The loops below are instantiated per case (clamp, dither, ...) so each is branch-free, and marked
// ``omp simd`` so the compiler vectorizes them: the reductions may be reordered across SIMD lanes (all the
// pragma allows: the order is still fixed by the code, not by the thread count); every elementwise float
// operation stays as written.
template <bool kClamp, bool kAddError>
void forward_piece(const float* __restrict px, float* __restrict po, const Group& p, const Piece& piece) {
#pragma omp simd
  for (int64_t i = piece.begin; i < piece.end; ++i) {
    const float v = grid_value(px[i], p, kClamp);
    const float r = std::nearbyint(v);
    const float q = kAddError ? v + (r - v) : r;
    po[i] = q * p.s + p.z;
  }
}

struct Sums {
  double below = 0, above = 0, ge = 0, gr = 0;
};

template <bool kClamp, bool kDither>
__attribute__((noinline)) Sums backward_sums(const float* __restrict px, const float* __restrict pg,
                                             const float* __restrict r, const Group p, const Piece piece) {
  // float lanes within a piece (a double accumulation would take 3x as long), double across pieces
  float below = 0, above = 0, ge = 0, gr = 0;
#pragma omp simd reduction(+ : below, above, ge, gr)
  for (int64_t i = piece.begin; i < piece.end; ++i) {
    const float xi = px[i], gi = pg[i];
    const float v = grid_value(xi, p, kClamp);
    ge += gi * (std::nearbyint(v) - v);
    if (kDither) gr += gi * r[i];
    if (kClamp) {
      below += xi < p.lo ? gi : 0.f;
      above += xi > p.hi ? gi : 0.f;
    }
  }
  return {below, above, ge, gr};
}

// g with the elements outside [lo, hi] zeroed. A loop of its own (noinline, values not references): fused
// into the sums' loop, or with the bounds behind a reference the stores might alias, it ran 2-3x slower.
__attribute__((noinline)) void masked_grad(const float* __restrict px, const float* __restrict pg,
                                           float* __restrict pgx, const float lo, const float hi, const Piece piece) {
#pragma omp simd
  for (int64_t i = piece.begin; i < piece.end; ++i) {
    const float xi = px[i], gi = pg[i];
    pgx[i] = ((xi < lo) | (xi > hi)) ? 0.f : gi;
  }
}


// Index of the first element of row[0, K) equal to ``value`` (-1 if none: a NaN extreme). Blocks of 64
// are tested with a vectorized OR, so the scan runs at vector speed and stops at the block that holds it.
int64_t first_equal(const float* __restrict row, int64_t K, float value) {
  for (int64_t b = 0; b < K; b += 64) {
    const int64_t e = std::min(K, b + 64);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = b; i < e; ++i) hit |= row[i] == value;
    if (hit)
      for (int64_t i = b; i < e; ++i)
        if (row[i] == value) return i;
  }
  return -1;
}

// (min, max) of row[0, K): an element-wise min / max is exact, so the order (SIMD lanes) does not matter.
// A NaN anywhere gives NaN for both, as torch's min / max do. (Written with comparisons, not std::min /
// std::max, which GCC left scalar here: 4x slower on a 512 x 4608 weight.)
void row_range(const float* __restrict row, int64_t K, float& lo, float& hi) {
  float mn = row[0], mx = row[0];
  int nan = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nan)
  for (int64_t i = 0; i < K; ++i) {
    const float x = row[i];
    mn = mn < x ? mn : x;
    mx = mx > x ? mx : x;
    nan |= x != x;
  }
  lo = nan ? NAN : mn;
  hi = nan ? NAN : mx;
}

}  // namespace

// x̂ = (round(clamp((x - z) / s, vlo, vhi)) * s + z; with ``add_error`` the torch path's v + (round(v) - v)
// is repeated instead of round(v) (the lsq estimator's forward), which can differ in the last bit.
torch::Tensor noisy_round_forward(torch::Tensor x, torch::Tensor z, torch::Tensor s, torch::Tensor vlo,
                                  torch::Tensor vhi, bool clamp, bool add_error) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "fused noisy_round: contiguous float32 x");
  const int64_t C = z.numel(), N = x.numel();
  TORCH_CHECK(C > 0 && N % C == 0, "fused noisy_round: groups do not divide x");
  const int64_t K = N / C;
  auto zc = params(z), sc = params(s), lc = clamp ? params(vlo) : zc, hc = clamp ? params(vhi) : zc;
  auto out = torch::empty_like(x);
  const float *px = x.data_ptr<float>(), *pz = zc.data_ptr<float>(), *ps = sc.data_ptr<float>();
  const float *pl = lc.data_ptr<float>(), *ph = hc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const auto work = pieces(C, K);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) {
      const Piece& piece = work[w];
      const Group p = group(pz, ps, pl, ph, pl, ph, piece.c, clamp);
      if (clamp) {
        if (add_error) forward_piece<true, true>(px, po, p, piece);
        else forward_piece<true, false>(px, po, p, piece);
      } else {
        if (add_error) forward_piece<false, true>(px, po, p, piece);
        else forward_piece<false, false>(px, po, p, piece);
      }
    }
  });
  return out;
}

// Returns (grad_x or an empty tensor, sums[4, C]) with, per group c:
//   sums[0] = Σ g·[x < lo]   sums[1] = Σ g·[x > hi]   sums[2] = Σ g·n   sums[3] = Σ g·r
// n = round(v) - v on the clamped v; r = ±1/2 read from ``table`` at ``offsets[i / window] + i % window``
// (the torch path's dither_signs, same table and offsets). grad_x = g outside-masked (only with a clamp).
std::vector<torch::Tensor> noisy_round_backward(torch::Tensor x, torch::Tensor g, torch::Tensor z, torch::Tensor s,
                                                torch::Tensor vlo, torch::Tensor vhi, torch::Tensor lo,
                                                torch::Tensor hi, bool clamp, bool need_grad_x,
                                                torch::Tensor table, torch::Tensor offsets, int64_t window,
                                                bool dither) {
  TORCH_CHECK(x.is_contiguous() && g.is_contiguous() && x.scalar_type() == torch::kFloat &&
                  g.scalar_type() == torch::kFloat && x.sizes() == g.sizes(),
              "fused noisy_round: contiguous float32 x and g of one shape");
  const int64_t C = z.numel(), N = x.numel();
  TORCH_CHECK(C > 0 && N % C == 0, "fused noisy_round: groups do not divide x");
  TORCH_CHECK(window % kChunk == 0, "fused noisy_round: the sign window must be a multiple of the chunk");
  const int64_t K = N / C;
  auto zc = params(z), sc = params(s);
  auto lvc = clamp ? params(vlo) : zc, hvc = clamp ? params(vhi) : zc;
  auto lc = clamp ? params(lo) : zc, hc = clamp ? params(hi) : zc;
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>(), *pz = zc.data_ptr<float>();
  const float *ps = sc.data_ptr<float>(), *plv = lvc.data_ptr<float>(), *phv = hvc.data_ptr<float>();
  const float *plo = lc.data_ptr<float>(), *phi = hc.data_ptr<float>();
  const bool write_grad = clamp && need_grad_x;
  auto grad_x = write_grad ? torch::empty_like(g) : torch::Tensor();
  float* pgx = write_grad ? grad_x.data_ptr<float>() : nullptr;
  const float* sign = nullptr;
  const int64_t* off = nullptr;
  auto table_c = table.contiguous(), offsets_c = offsets.contiguous().to(torch::kLong);
  if (dither) {
    TORCH_CHECK(table_c.scalar_type() == torch::kFloat, "fused noisy_round: float32 sign table");
    sign = table_c.data_ptr<float>();
    off = offsets_c.data_ptr<int64_t>();
  }

  const auto work = pieces(C, K);
  std::vector<double> partial(work.size() * 4, 0.0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) {
      const Piece& piece = work[w];
      const Group p = group(pz, ps, plv, phv, plo, phi, piece.c, clamp);
      // The piece lies inside one window of the sign table (pieces are cut at multiples of kChunk).
      const float* r = dither ? sign + off[piece.begin / window] + piece.begin % window - piece.begin : nullptr;
      Sums t;
      if (clamp) {
        t = dither ? backward_sums<true, true>(px, pg, r, p, piece) : backward_sums<true, false>(px, pg, r, p, piece);
        if (pgx != nullptr) masked_grad(px, pg, pgx, p.lo, p.hi, piece);
      } else {
        t = dither ? backward_sums<false, true>(px, pg, r, p, piece) : backward_sums<false, false>(px, pg, r, p, piece);
      }
      const double below = t.below, above = t.above, ge = t.ge, gr = t.gr;
      double* out = partial.data() + 4 * w;
      out[0] = below;
      out[1] = above;
      out[2] = ge;
      out[3] = gr;
    }
  });
  std::vector<double> total(4 * C, 0.0);
  for (size_t w = 0; w < work.size(); ++w)
    for (int k = 0; k < 4; ++k) total[k * C + work[w].c] += partial[4 * w + k];
  auto sums = torch::empty({4, C}, torch::kFloat);
  float* pt = sums.data_ptr<float>();
  for (int64_t k = 0; k < 4 * C; ++k) pt[k] = static_cast<float>(total[k]);
  return {grad_x, sums};
}

// The weight quantizer in one pass per row (output channel): the row's min and max (its grid's z = min and the
// bit-width's range), the first arg-extremes (where the range's gradient goes, as torch.min / torch.max along a
// dim choose), then x̂ with z = min; the row is read from memory once and stays in cache for the later loops.
// Returns (x̂, lo[C], hi[C], index[2, C]: first argmin and argmax within each row).
std::vector<torch::Tensor> weight_forward(torch::Tensor w, torch::Tensor s, bool add_error) {
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == torch::kFloat, "fused weight quantizer: contiguous float32 w");
  const int64_t C = s.numel(), N = w.numel();
  TORCH_CHECK(C > 0 && N > 0 && N % C == 0, "fused weight quantizer: channels do not divide w");
  const int64_t K = N / C;
  auto sc = params(s);
  auto out = torch::empty_like(w);
  auto lo = torch::empty({C}, torch::kFloat), hi = torch::empty({C}, torch::kFloat);
  auto index = torch::empty({2, C}, torch::kLong);
  const float *pw = w.data_ptr<float>(), *ps = sc.data_ptr<float>();
  float *po = out.data_ptr<float>(), *plo = lo.data_ptr<float>(), *phi = hi.data_ptr<float>();
  int64_t* pi = index.data_ptr<int64_t>();
  at::parallel_for(0, C, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const float* row = pw + c * K;
      float mn, mx;
      row_range(row, K, mn, mx);
      plo[c] = mn;
      phi[c] = mx;
      pi[c] = std::max<int64_t>(first_equal(row, K, mn), 0);
      pi[C + c] = std::max<int64_t>(first_equal(row, K, mx), 0);
      const Group p{mn, ps[c], 0.f, 0.f, 0.f, 0.f};
      const Piece piece{c, c * K, (c + 1) * K};
      if (add_error) forward_piece<false, true>(pw, po, p, piece);
      else forward_piece<false, false>(pw, po, p, piece);
    }
  });
  return {out, lo, hi, index};
}

// g copied, for the weight's gradient (the range's gradient is added at the arg-extremes afterwards).
__attribute__((noinline)) void copy_piece(const float* __restrict pg, float* __restrict pgw, const Piece piece) {
#pragma omp simd
  for (int64_t i = piece.begin; i < piece.end; ++i) pgw[i] = pg[i];
}

// Backward of weight_forward: sums[2, C] = (Σ g·n, Σ g·r) per row, as noisy_round_backward's sums[2:4] with
// z = lo, and the weight's gradient g + (g_lo at the first argmin, g_hi at the first argmax) written in the same
// pass over g (autograd would otherwise add the range's gradient into a second weight-sized tensor).
// g_lo / g_hi: length C, or empty when the range received no gradient.
std::vector<torch::Tensor> weight_backward(torch::Tensor w, torch::Tensor g, torch::Tensor lo, torch::Tensor s,
                                           torch::Tensor index, torch::Tensor g_lo, torch::Tensor g_hi,
                                           torch::Tensor table, torch::Tensor offsets, int64_t window, bool dither) {
  TORCH_CHECK(w.is_contiguous() && g.is_contiguous() && w.scalar_type() == torch::kFloat &&
                  g.scalar_type() == torch::kFloat && w.sizes() == g.sizes(),
              "fused weight quantizer: contiguous float32 w and g of one shape");
  const int64_t C = s.numel(), N = w.numel();
  TORCH_CHECK(C > 0 && N % C == 0 && lo.numel() == C && index.numel() == 2 * C,
              "fused weight quantizer: channels do not divide w");
  TORCH_CHECK(window % kChunk == 0, "fused weight quantizer: the sign window must be a multiple of the chunk");
  const int64_t K = N / C;
  const bool range_grad = g_lo.numel() == C && g_hi.numel() == C;
  auto zc = params(lo), sc = params(s), idx = index.contiguous().to(torch::kLong);
  auto glc = range_grad ? params(g_lo) : zc, ghc = range_grad ? params(g_hi) : zc;
  auto grad_w = torch::empty_like(g);
  const float *pw = w.data_ptr<float>(), *pg = g.data_ptr<float>(), *pz = zc.data_ptr<float>();
  const float* ps = sc.data_ptr<float>();
  float* pgw = grad_w.data_ptr<float>();
  const float* sign = nullptr;
  const int64_t* off = nullptr;
  auto table_c = table.contiguous(), offsets_c = offsets.contiguous().to(torch::kLong);
  if (dither) {
    TORCH_CHECK(table_c.scalar_type() == torch::kFloat, "fused weight quantizer: float32 sign table");
    sign = table_c.data_ptr<float>();
    off = offsets_c.data_ptr<int64_t>();
  }
  const auto work = pieces(C, K);
  std::vector<double> partial(work.size() * 2, 0.0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t w_ = a; w_ < b; ++w_) {
      const Piece& piece = work[w_];
      const Group p{pz[piece.c], ps[piece.c], 0.f, 0.f, 0.f, 0.f};
      const float* r = dither ? sign + off[piece.begin / window] + piece.begin % window - piece.begin : nullptr;
      const Sums t = dither ? backward_sums<false, true>(pw, pg, r, p, piece)
                            : backward_sums<false, false>(pw, pg, r, p, piece);
      copy_piece(pg, pgw, piece);
      partial[2 * w_] = t.ge;
      partial[2 * w_ + 1] = t.gr;
    }
  });
  if (range_grad) {
    const int64_t* pi = idx.data_ptr<int64_t>();
    const float *pgl = glc.data_ptr<float>(), *pgh = ghc.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ilo = c * K + std::min(std::max<int64_t>(pi[c], 0), K - 1);
      const int64_t ihi = c * K + std::min(std::max<int64_t>(pi[C + c], 0), K - 1);
      // min's, then max's: where both are one element (a constant row) the same adds as autograd's sparse add
      pgw[ilo] += pgl[c];
      pgw[ihi] += pgh[c];
    }
  }
  std::vector<double> total(2 * C, 0.0);
  for (size_t k = 0; k < work.size(); ++k) {
    total[work[k].c] += partial[2 * k];
    total[C + work[k].c] += partial[2 * k + 1];
  }
  auto sums = torch::empty({2, C}, torch::kFloat);
  float* pt = sums.data_ptr<float>();
  for (int64_t k = 0; k < 2 * C; ++k) pt[k] = static_cast<float>(total[k]);
  return {grad_w, sums};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &noisy_round_forward, "fused noisy rounding, forward (CPU, float32)");
  m.def("backward", &noisy_round_backward, "fused noisy rounding, backward (CPU, float32)");
  m.def("weight_forward", &weight_forward, "fused weight quantizer (range and noisy rounding), forward");
  m.def("weight_backward", &weight_backward, "fused weight quantizer, backward (step sums and weight gradient)");
}
