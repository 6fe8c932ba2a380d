// Fused elementwise ops of the decoder layer for CPUs (see elementwise_cpu.h).
//
// Why: in a float32 CPU step of SmolLM2 at 64 sequences the torch twins of RMSNorm, SiLU-and-mul
// and RoPE took ~12 % of the step (7.8 of 64.6 s on the mixed offline workload), each a chain of
// small ATen ops with a temporary per op. Here each is one pass per token row.
//
// Arithmetic follows the twins: RMSNorm in float32 as x * rsqrt(mean(x^2) + eps), then times the
// weight; SiLU as g * sigmoid(g); RoPE as x1 * cos - x2 * sin, x2 * cos + x1 * sin. The sum of
// squares and the exponential round differently from ATen's (another summation order; a
// polynomial 2^x), so results may differ from the twins in the last bits.
#include "elementwise_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace kvmesh {
namespace {

// Below this many elements a call runs on one thread: waking the others costs more.
constexpr int64_t kMinParallelElems = 1 << 15;
constexpr float kLog2e = 1.4426950408889634f;

int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(row_elems, 1));
}

void check_rows(const torch::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device().is_cpu() &&
                  (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              op, ": ", what, " must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", what, " must be [T, H] with dense rows");
}

// sigmoid(g) from 2^-|g| log2(e), which is <= 1: the exponential never overflows.
inline float sigmoid(float g) {
  const float e = exp2_nonpos(-std::fabs(g) * kLog2e);
  const float inv = 1.f / (1.f + e);
  return g >= 0.f ? inv : e * inv;
}

// The bfloat16 kernels round wherever the twins' bfloat16 ops round (the residual sum, the
// normalised row before the weight, SiLU before the product), so they give the twins' values
// but for the last bits of the float32 steps between.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }


// Element stores for the kernels that take either dtype (loads: load_elem in cpu_math.h):
// float32 as is, bfloat16 (uint16_t storage) rounded; as_stored rounds a float32 value the way a
// bfloat16 twin op would store it.
inline void store_elem(float& p, float v) { p = v; }
inline void store_elem(uint16_t& p, float v) { p = float_to_bf16(v); }
template <class E>
inline float as_stored(float v) {
  if constexpr (std::is_same_v<E, uint16_t>) return round_bf16(v);
  return v;
}

// sigmoid on 16 lanes, as the scalar one computes it.
inline vec16 sigmoid16(vec16 g) {
  const vec16 neg_abs = g < 0.f ? g : -g;
  const vec16 e = exp2_nonpos16(neg_abs * kLog2e);
  const vec16 inv = 1.f / (1.f + e);
  return g >= 0.f ? inv : e * inv;
}

template <class E>
inline vec16 as_stored16(vec16 v) {
  if constexpr (std::is_same_v<E, uint16_t>) {
    uint16_t h[kLanes];
    store16(h, v);
    return load16(h);
  }
  return v;
}

template <class E>
void silu_and_mul_rows(const E* xp, E* op, int64_t T, int64_t I, int64_t xs) {
  at::parallel_for(0, T, grain(2 * I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const E* g = xp + t * xs;
      const E* u = g + I;
      E* o = op + t * I;
      int64_t i = 0;
      // Explicit vectors: the compiler did not vectorise the scalar loop below for bfloat16.
      for (; i + kLanes <= I; i += kLanes) {
        const vec16 gf = load16(g + i);
        store16(o + i, as_stored16<E>(gf * sigmoid16(gf)) * load16(u + i));
      }
      for (; i < I; ++i) {
        const float gf = load_elem(g[i]);
        store_elem(o[i], as_stored<E>(gf * sigmoid(gf)) * load_elem(u[i]));
      }
    }
  });
}

void rms_norm_bf16(const torch::Tensor& x, const std::optional<torch::Tensor>& residual,
                   const torch::Tensor& weight, double eps, torch::Tensor& sum,
                   torch::Tensor& out) {
  const int64_t T = x.size(0), H = x.size(1);
  const bool add = residual.has_value();
  const uint16_t* xp = bf16_data(x);
  const uint16_t* rp = add ? bf16_data(*residual) : nullptr;
  const uint16_t* wp = bf16_data(weight);
  uint16_t* sp = add ? bf16_data_mut(sum) : nullptr;
  uint16_t* op = bf16_data_mut(out);
  const int64_t xs = x.stride(0), rs = add ? residual->stride(0) : 0;
  const float inv_h = 1.f / static_cast<float>(H), feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain(H), [&](int64_t t0, int64_t t1) {
    std::vector<float> row(H);
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* xr = xp + t * xs;
      float* v = row.data();
      // Explicit vectors for the bulk: the compiler did not vectorise bfloat16 rounding.
      vec16 acc16 = {};
      float acc = 0.f;
      int64_t body = H / kLanes * kLanes;
      if (add) {
        const uint16_t* rr = rp + t * rs;
        uint16_t* sr = sp + t * H;
        for (int64_t i = 0; i < body; i += kLanes) {
          store16(sr + i, load16(xr + i) + load16(rr + i));
          const vec16 s = load16(sr + i);
          store16(v + i, s);
          acc16 += s * s;
        }
        for (int64_t i = body; i < H; ++i) {
          const uint16_t b = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(rr[i]));
          sr[i] = b;
          v[i] = bf16_to_float(b);
          acc += v[i] * v[i];
        }
      } else {
        for (int64_t i = 0; i < body; i += kLanes) {
          const vec16 s = load16(xr + i);
          store16(v + i, s);
          acc16 += s * s;
        }
        for (int64_t i = body; i < H; ++i) {
          v[i] = bf16_to_float(xr[i]);
          acc += v[i] * v[i];
        }
      }
      const float r = 1.f / std::sqrt((hsum(acc16) + acc) * inv_h + feps);
      uint16_t* orow = op + t * H;
      for (int64_t i = 0; i < body; i += kLanes)
        store16(orow + i, load16(wp + i) * as_stored16<uint16_t>(load16(v + i) * r));
      for (int64_t i = body; i < H; ++i)
        orow[i] = float_to_bf16(bf16_to_float(wp[i]) * round_bf16(v[i] * r));
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x,
                                                   const std::optional<torch::Tensor>& residual,
                                                   const torch::Tensor& weight, double eps) {
  check_rows(x, "rms_norm", "x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.numel() == H,
              "rms_norm: weight must be [H], of x's dtype");
  const bool add = residual.has_value();
  if (add) {
    check_rows(*residual, "rms_norm", "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must have x's shape and dtype");
  }
  // The sum goes to a new tensor, as in the twins: neither input is written.
  torch::Tensor sum = add ? torch::empty({T, H}, x.options()) : x;
  torch::Tensor out = torch::empty({T, H}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_bf16(x, residual, weight, eps, sum, out);
    return {out, sum};
  }
  const float* xp = x.data_ptr<float>();
  const float* rp = add ? residual->data_ptr<float>() : nullptr;
  float* sp = sum.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = add ? residual->stride(0) : 0, ss = sum.stride(0);
  const float inv_h = 1.f / static_cast<float>(H), feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = xp + t * xs;
      float* sr = sp + t * ss;
      float* orow = op + t * H;
      vec16 acc = {};
      int64_t i = 0;
      for (; i + kLanes <= H; i += kLanes) {
        vec16 v = load16(xr + i);
        if (add) {
          v += load16(rp + t * rs + i);
          store16(sr + i, v);
        }
        acc += v * v;
      }
      float tail = 0.f;
      for (; i < H; ++i) {
        const float v = add ? xr[i] + rp[t * rs + i] : xr[i];
        if (add) sr[i] = v;
        tail += v * v;
      }
      const float r = 1.f / std::sqrt((hsum(acc) + tail) * inv_h + feps);
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) orow[j] = wp[j] * (sr[j] * r);
    }
  });
  return {out, sum};
}

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  check_rows(x, "silu_and_mul", "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: x's last dimension must be even");
  const int64_t T = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  torch::Tensor out = torch::empty({T, I}, x.options());
  if (x.scalar_type() == torch::kBFloat16)
    silu_and_mul_rows(bf16_data(x), bf16_data_mut(out), T, I, xs);
  else
    silu_and_mul_rows(x.data_ptr<float>(), out.data_ptr<float>(), T, I, xs);
  return out;
}

void rotary_embedding(const torch::Tensor& positions, const torch::Tensor& q,
                      const torch::Tensor& k, const torch::Tensor& cos_sin) {
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1 &&
                  positions.is_contiguous(),
              "rotary_embedding: positions must be int64 [T], contiguous");
  TORCH_CHECK(cos_sin.scalar_type() == torch::kFloat32 && cos_sin.dim() == 2 &&
                  cos_sin.is_contiguous(),
              "rotary_embedding: cos_sin must be float32 [P, D], contiguous");
  const int64_t T = positions.size(0), D = cos_sin.size(1), half = D / 2;
  for (const torch::Tensor* x : {&q, &k}) {
    TORCH_CHECK(x->scalar_type() == torch::kFloat32 && x->dim() == 3 && x->size(0) == T &&
                    x->size(2) == D && x->stride(2) == 1 && x->stride(1) == D,
                "rotary_embedding: q and k must be float32 [T, heads, D] with dense heads");
  }
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t P = cos_sin.size(0);
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const int64_t qs = q.stride(0), ks = k.stride(0), QH = q.size(1), KH = k.size(1);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rotary_embedding: position ", pos[t],
                " is outside the table of ", P);
  at::parallel_for(0, T, grain((QH + KH) * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* cos = cs + pos[t] * D;
      const float* sin = cos + half;
      for (int64_t which = 0; which < 2; ++which) {
        float* row = which == 0 ? qp + t * qs : kp + t * ks;
        const int64_t heads = which == 0 ? QH : KH;
        for (int64_t h = 0; h < heads; ++h, row += D) {
          float* x1 = row;
          float* x2 = row + half;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
          }
        }
      }
    }
  });
}

namespace {

// One head row: rotated (NeoX halves) into `qo` (float32) or, for k, rounded into the cache row.
template <class E, class C>
inline void rotate_row(const E* x, C* dst, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
  for (; i + kLanes <= half; i += kLanes) {
    const vec16 a = load16(x + i), b = load16(x + i + half);
    const vec16 c = load16(cos + i), s = load16(sin + i);
    store16(dst + i, a * c - b * s);
    store16(dst + i + half, b * c + a * s);
  }
  for (; i < half; ++i) {
    const float a = load_elem(x[i]), b = load_elem(x[i + half]);
    store_elem(dst[i], a * cos[i] - b * sin[i]);
    store_elem(dst[i + half], b * cos[i] + a * sin[i]);
  }
}

template <class E, class C>
void rotary_and_cache_t(const int64_t* pos, const int64_t* slots, const E* qp, const E* kp,
                        const E* vp, int64_t qs, int64_t ks, int64_t vs, int64_t T, int64_t H,
                        int64_t KVH, int64_t D, const float* cs, float* qo, C* kc, C* vc) {
  const int64_t half = D / 2;
  at::parallel_for(0, T, grain((H + 2 * KVH) * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* cos = cs + pos[t] * D;
      const float* sin = cos + half;
      for (int64_t h = 0; h < H; ++h)
        rotate_row(qp + t * qs + h * D, qo + (t * H + h) * D, cos, sin, half);
      if (slots[t] < 0) continue;
      C* krow = kc + slots[t] * KVH * D;
      C* vrow = vc + slots[t] * KVH * D;
      for (int64_t h = 0; h < KVH; ++h) rotate_row(kp + t * ks + h * D, krow + h * D, cos, sin, half);
      const E* vr = vp + t * vs;
      if constexpr (std::is_same_v<E, C>) {
        std::memcpy(vrow, vr, KVH * D * sizeof(E));
      } else {
        for (int64_t i = 0; i < KVH * D; ++i) store_elem(vrow[i], load_elem(vr[i]));
      }
    }
  });
}

}  // namespace

torch::Tensor rotary_and_cache(const torch::Tensor& positions, const torch::Tensor& q,
                               const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos_sin, torch::Tensor& k_cache,
                               torch::Tensor& v_cache, const torch::Tensor& slot_mapping) {
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1 &&
                  positions.is_contiguous() && slot_mapping.scalar_type() == torch::kInt64 &&
                  slot_mapping.is_contiguous() && slot_mapping.sizes() == positions.sizes(),
              "rotary_and_cache: positions and slot_mapping must be int64 [T], contiguous");
  TORCH_CHECK(cos_sin.scalar_type() == torch::kFloat32 && cos_sin.dim() == 2 &&
                  cos_sin.is_contiguous(),
              "rotary_and_cache: cos_sin must be float32 [P, D], contiguous");
  const int64_t T = positions.size(0), D = cos_sin.size(1);
  for (const torch::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type() &&
                    (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16) &&
                    x->dim() == 3 && x->size(0) == T && x->size(2) == D && x->stride(2) == 1 &&
                    x->stride(1) == D,
                "rotary_and_cache: q, k, v must be [T, heads, D] of one dtype (float32 or "
                "bfloat16) with dense heads");
  }
  TORCH_CHECK(D % 2 == 0 && k.size(1) == v.size(1), "rotary_and_cache: head shapes do not match");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == torch::kFloat32 ||
                   k_cache.scalar_type() == torch::kBFloat16) &&
                  k_cache.size(2) == k.size(1) && k_cache.size(3) == D,
              "rotary_and_cache: caches [NB, BS, KVH, D], contiguous, both float32 or bfloat16");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t P = cos_sin.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rotary_and_cache: position ", pos[t],
                " is outside the table of ", P);
    TORCH_CHECK(slots[t] < num_slots, "rotary_and_cache: slot ", slots[t],
                " is outside the cache of ", num_slots);
  }
  const int64_t H = q.size(1), KVH = k.size(1);
  torch::Tensor qo = torch::empty({T, H, D}, q.options().dtype(torch::kFloat32));
  const float* cs = cos_sin.data_ptr<float>();
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* kc, auto* vc) {
    rotary_and_cache_t(pos, slots, qp, kp, vp, q.stride(0), k.stride(0), v.stride(0), T, H, KVH,
                       D, cs, qo.data_ptr<float>(), kc, vc);
  };
  const bool bf16_in = q.scalar_type() == torch::kBFloat16;
  const bool bf16_cache = k_cache.scalar_type() == torch::kBFloat16;
  if (bf16_in && bf16_cache)
    run(bf16_data(q), bf16_data(k), bf16_data(v), bf16_data_mut(k_cache), bf16_data_mut(v_cache));
  else if (bf16_in)
    run(bf16_data(q), bf16_data(k), bf16_data(v), k_cache.data_ptr<float>(),
        v_cache.data_ptr<float>());
  else if (bf16_cache)
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), bf16_data_mut(k_cache),
        bf16_data_mut(v_cache));
  else
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), k_cache.data_ptr<float>(),
        v_cache.data_ptr<float>());
  return qo;
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1 &&
                  x.size(1) >= 1,
              "argmax_rows: float32 [B, V] with dense rows");
  const int64_t B = x.size(0), V = x.size(1), xs = x.stride(0);
  torch::Tensor out = torch::empty({B}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  typedef int32_t ivec16 __attribute__((vector_size(kLanes * sizeof(int32_t))));
  at::parallel_for(0, B, grain(V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = xp + b * xs;
      const int64_t body = V / kLanes * kLanes;
      float best = row[0];
      int64_t at = 0;
      if (body > 0) {
        // Per lane: its maximum so far and where it first occurred (strictly greater moves
        // it, so each lane keeps its first maximum); then the lowest index among the lanes
        // holding the row's maximum is the row's first maximum.
        vec16 m = load16(row);
        ivec16 idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        ivec16 cur = idx;
        for (int64_t i = kLanes; i < body; i += kLanes) {
          cur += kLanes;
          const vec16 v = load16(row + i);
          const auto gt = v > m;
          m = gt ? v : m;
          idx = gt ? cur : idx;
        }
        best = m[0];
        for (int l = 1; l < kLanes; ++l) best = m[l] > best ? m[l] : best;
        at = V;
        for (int l = 0; l < kLanes; ++l)
          if (m[l] == best && idx[l] < at) at = idx[l];
      }
      // The tail (or a row shorter than a vector) wins only when strictly larger.
      for (int64_t i = body == 0 ? 1 : body; i < V; ++i)
        if (row[i] > best) {
          best = row[i];
          at = i;
        }
      op[b] = at;
    }
  });
  return out;
}

}  // namespace kvmesh
