// 3x3 stride-1 convolution for CPU inference by Winograd's F(4x4, 3x3):
// each 4x4 output tile comes from a 6x6 input tile through 36 independent
// products per input and output channel, where direct convolution takes 144
// (16 outputs x 9 taps): 4x fewer multiply-adds in the GEMMs. The products run
// as 36 GEMMs ([tiles, C] x [C, K]); the transforms around them, which are
// memory-bound, are fused with the epilogue (bias, residual, ReLU).
//
// Transform matrices (interpolation points 0, +-1, +-2, infinity):
//   B^T (6x6) for the input, G (6x3) for the weight, A^T (4x6) for the output;
//   y = A^T [ (G g G^T) * (B^T d B) ] A.
#include <ATen/MemoryOverlap.h>

#include "../resnet_fast.h"
#include "cpu_ops.h"

namespace resnet_fast::cpu {
namespace {

constexpr int64_t kIn = 6;      // input tile side
constexpr int64_t kOut = 4;     // output tile side
constexpr int64_t kPoints = kIn * kIn;
constexpr int64_t kLanes = 16;  // channels transformed together (vectorised)

// The transforms are RESNET_FAST_SIMD_CLONES (cpu_ops.h).

// B^T applied along one axis of a tile: t(i, lane) from d(0..5, lane).
template <typename In, typename Out>
inline void input_rows(const In& d, const Out& t) {
  for (int64_t k = 0; k < kLanes; ++k) {
    const float d0 = d(0, k), d1 = d(1, k), d2 = d(2, k), d3 = d(3, k), d4 = d(4, k), d5 = d(5, k);
    t(0, k) = 4.f * d0 - 5.f * d2 + d4;
    t(1, k) = -4.f * (d1 + d2) + d3 + d4;
    t(2, k) = 4.f * (d1 - d2) - d3 + d4;
    t(3, k) = 2.f * (d3 - d1) - d2 + d4;
    t(4, k) = 2.f * (d1 - d3) - d2 + d4;
    t(5, k) = 4.f * d1 - 5.f * d3 + d5;
  }
}

// A^T applied along one axis of a tile: s(0..3, lane) from m(0..5, lane).
template <typename In, typename Out>
inline void output_rows(const In& m, const Out& s) {
  for (int64_t k = 0; k < kLanes; ++k) {
    const float m0 = m(0, k), m1 = m(1, k), m2 = m(2, k), m3 = m(3, k), m4 = m(4, k), m5 = m(5, k);
    const float a = m1 + m2, b = m1 - m2, c = m3 + m4, e = m3 - m4;
    s(0, k) = m0 + a + c;
    s(1, k) = b + 2.f * e;
    s(2, k) = a + 4.f * c;
    s(3, k) = b + 8.f * e + m5;
  }
}

struct TileGrid {
  int64_t N, H, W, tiles_h, tiles_w;
  int64_t count() const { return N * tiles_h * tiles_w; }
  // Image, first output row and first output column of tile t.
  void locate(int64_t t, int64_t& n, int64_t& row, int64_t& col) const {
    n = t / (tiles_h * tiles_w);
    const int64_t rest = t % (tiles_h * tiles_w);
    row = rest / tiles_w * kOut;
    col = rest % tiles_w * kOut;
  }
};

// V[p][t][c] for tiles [first, last) and every channel: the 6x6 input tile
// around each output tile (zero outside the image, padding 1), transformed.
RESNET_FAST_SIMD_CLONES void transform_input(const float* x, const TileGrid& grid, int64_t C, int64_t first,
                                             int64_t last, float* V, int64_t point_stride) {
  float d[kIn][kIn][kLanes], t[kIn][kIn][kLanes];
  for (int64_t tile = first; tile < last; ++tile) {
    int64_t n, row, col;
    grid.locate(tile, n, row, col);
    float* v_tile = V + (tile - first) * C;
    for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
      const int64_t lanes = std::min(kLanes, C - c0);
      for (int64_t i = 0; i < kIn; ++i) {
        const int64_t r = row - 1 + i;
        for (int64_t j = 0; j < kIn; ++j) {
          const int64_t s = col - 1 + j;
          if (r < 0 || r >= grid.H || s < 0 || s >= grid.W) {
            for (int64_t k = 0; k < kLanes; ++k) d[i][j][k] = 0.f;
            continue;
          }
          const float* src = x + ((n * grid.H + r) * grid.W + s) * C + c0;
          if (lanes == kLanes) {  // a whole vector (every group, where C is a multiple of 16)
            for (int64_t k = 0; k < kLanes; ++k) d[i][j][k] = src[k];
          } else {
            for (int64_t k = 0; k < kLanes; ++k) d[i][j][k] = k < lanes ? src[k] : 0.f;
          }
        }
      }
      for (int64_t j = 0; j < kIn; ++j)  // B^T d, one column at a time
        input_rows([&](int64_t i, int64_t k) { return d[i][j][k]; },
                   [&](int64_t i, int64_t k) -> float& { return t[i][j][k]; });
      for (int64_t i = 0; i < kIn; ++i) {  // (B^T d) B, one row at a time
        float out[kIn][kLanes];
        input_rows([&](int64_t j, int64_t k) { return t[i][j][k]; },
                   [&](int64_t j, int64_t k) -> float& { return out[j][k]; });
        for (int64_t j = 0; j < kIn; ++j) {
          float* dst = v_tile + (i * kIn + j) * point_stride + c0;
          for (int64_t k = 0; k < lanes; ++k) dst[k] = out[j][k];
        }
      }
    }
  }
}

// y = act(A^T M A + bias (+ residual)) for tiles [first, last), every output
// channel, written where the 4x4 tile lies inside the image. ReLU keeps NaN.
RESNET_FAST_SIMD_CLONES void transform_output(const float* M, int64_t point_stride, const TileGrid& grid, int64_t K,
                                              int64_t first, int64_t last, const float* bias, const float* residual,
                                              bool relu, float* y) {
  float m[kIn][kIn][kLanes], s[kOut][kIn][kLanes];
  for (int64_t tile = first; tile < last; ++tile) {
    int64_t n, row, col;
    grid.locate(tile, n, row, col);
    const float* m_tile = M + (tile - first) * K;
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t lanes = std::min(kLanes, K - k0);
      for (int64_t p = 0; p < kPoints; ++p) {
        const float* src = m_tile + p * point_stride + k0;
        if (lanes == kLanes) {
          for (int64_t k = 0; k < kLanes; ++k) m[p / kIn][p % kIn][k] = src[k];
        } else {
          for (int64_t k = 0; k < kLanes; ++k) m[p / kIn][p % kIn][k] = k < lanes ? src[k] : 0.f;
        }
      }
      for (int64_t j = 0; j < kIn; ++j)  // A^T m
        output_rows([&](int64_t i, int64_t k) { return m[i][j][k]; },
                    [&](int64_t i, int64_t k) -> float& { return s[i][j][k]; });
      for (int64_t i = 0; i < kOut; ++i) {  // (A^T m) A
        const int64_t r = row + i;
        if (r >= grid.H) break;
        float out[kOut][kLanes];
        output_rows([&](int64_t j, int64_t k) { return s[i][j][k]; },
                    [&](int64_t j, int64_t k) -> float& { return out[j][k]; });
        for (int64_t j = 0; j < kOut && col + j < grid.W; ++j) {
          const int64_t offset = ((n * grid.H + r) * grid.W + col + j) * K + k0;
          float* dst = y + offset;
          const float* res = residual == nullptr ? nullptr : residual + offset;
          for (int64_t k = 0; k < lanes; ++k) {
            float v = out[j][k] + bias[k0 + k];
            if (res != nullptr) v += res[k];
            dst[k] = relu && v < 0.f ? 0.f : v;
          }
        }
      }
    }
  }
}

// Tiles per work item: its transformed input and products ([36, tiles, C]
// and [36, tiles, K]) stay in cache between the transforms and the GEMMs.
constexpr int64_t kMaxBlockTiles = 32;

// Scratch for one work item, reused across calls (grown when needed), so that
// a warm call allocates nothing and touches no fresh pages.
float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

void check_winograd_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_winograd,
                         const at::Tensor& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "resnet_fast: the Winograd convolution takes a 3x3 weight (K, C, 3, 3), got shape ", weight.sizes());
  check_conv_args(x, weight, bias, residual, {1, 1}, {1, 1}, {1, 1}, 1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "resnet_fast: the Winograd convolution runs on CPU float32 tensors, got ", x.scalar_type(), " on ",
              x.device());
  const int64_t C = x.size(1), K = weight.size(0);
  TORCH_CHECK(weight_winograd.dim() == 3 && weight_winograd.size(0) == kPoints && weight_winograd.size(1) == C &&
                  weight_winograd.size(2) == K,
              "resnet_fast: weight_winograd must be [36, ", C, ", ", K, "] (winograd_weight of the weight), got ",
              weight_winograd.sizes());
  TORCH_CHECK(weight_winograd.device().is_cpu() && weight_winograd.scalar_type() == at::kFloat &&
                  weight_winograd.is_contiguous(),
              "resnet_fast: weight_winograd must be a contiguous CPU float32 tensor (as winograd_weight returns it)");
}

}  // namespace

at::Tensor winograd_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "resnet_fast: winograd_weight takes a 3x3 convolution weight (K, C, 3, 3), got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
              "resnet_fast: winograd_weight takes a CPU float32 weight, got ", weight.scalar_type(), " on ",
              weight.device());
  // The convolution trusts its transformed weight to be finite (it fuses a
  // NaN-keeping ReLU only by then): a weight with NaN or Inf has none.
  TORCH_CHECK(at::isfinite(weight).all().item<bool>(),
              "resnet_fast: winograd_weight needs a finite weight (it has NaN or Inf); use conv_bias_act for it");
  // U[p][c][k] = (G g G^T)[p] for the 3x3 filter g of output k, input c,
  // computed in float64 and rounded once.
  static const double G[kIn][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                                   {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  const auto w = weight.to(at::kDouble).contiguous();
  const int64_t K = w.size(0), C = w.size(1);
  auto U = at::empty({kPoints, C, K}, weight.options());
  const double* g_all = w.data_ptr<double>();
  float* u = U.data_ptr<float>();
  at::parallel_for(0, K, 1, [&](int64_t k_first, int64_t k_last) {
    for (int64_t k = k_first; k < k_last; ++k)
      for (int64_t c = 0; c < C; ++c) {
        const double* g = g_all + (k * C + c) * 9;
        double gg[kIn][3];  // G g
        for (int64_t i = 0; i < kIn; ++i)
          for (int64_t j = 0; j < 3; ++j) gg[i][j] = G[i][0] * g[j] + G[i][1] * g[3 + j] + G[i][2] * g[6 + j];
        for (int64_t i = 0; i < kIn; ++i)
          for (int64_t j = 0; j < kIn; ++j)
            u[((i * kIn + j) * C + c) * K + k] =
                static_cast<float>(gg[i][0] * G[j][0] + gg[i][1] * G[j][1] + gg[i][2] * G[j][2]);
      }
  });
  return U;
}

namespace {

// y = act(conv(x) + bias + residual) by the transforms and GEMMs above, for
// finite operands; y may be the residual itself (each output element is read
// from it, then written, by one thread).
void winograd_into(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight_winograd, const at::Tensor& bias,
                   const at::Tensor& residual, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight_winograd.size(2);
  const TileGrid grid{N, H, W, (H + kOut - 1) / kOut, (W + kOut - 1) / kOut};
  const int64_t T = grid.count();
  if (T == 0) return;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto bc = bias.contiguous();
  // No work item outgrows the cache, and every thread gets as many of them
  // (a 56x56 image's 196 tiles as 7 items of up to 32 left one of 2 threads
  // idle an eighth of the time).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t items = ceil_div(ceil_div(T, kMaxBlockTiles), threads) * threads;
  const int64_t block_tiles = ceil_div(T, items);
  const int64_t blocks = ceil_div(T, block_tiles);
  const float* xp = xc.data_ptr<float>();
  const float* rp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  const float* bp = bc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b_first, int64_t b_last) {
    float* V = scratch(kPoints * block_tiles * (C + K));
    float* M = V + kPoints * block_tiles * C;
    for (int64_t b = b_first; b < b_last; ++b) {
      const int64_t first = b * block_tiles, last = std::min(T, first + block_tiles), n = last - first;
      transform_input(xp, grid, C, first, last, V, n * C);
      // 36 products [n, C] x [C, K], one per transform point; single-threaded
      // here (inside the parallel region), as the work items are.
      auto products = at::from_blob(M, {kPoints, n, K}, x.options());
      at::bmm_out(products, at::from_blob(V, {kPoints, n, C}, x.options()), weight_winograd);
      transform_output(M, n * K, grid, K, first, last, bp, rp, relu, yp);
    }
  });
}

}  // namespace

at::Tensor conv3x3_winograd_bias_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_winograd,
                                     const at::Tensor& bias, const std::optional<at::Tensor>& residual, bool relu) {
  check_winograd_args(x, weight, weight_winograd, bias, residual);
  // The transforms mix every input of a 6x6 tile into every output of its
  // 4x4 tile, so one NaN or Inf would reach outputs that direct convolution
  // keeps clean (and Inf - Inf makes NaN of an Inf): non-finite operands take
  // the direct route, which gives the reference's answer.
  if (!operands_finite(x, bias, residual))
    return conv_bias_act(x, weight, bias, residual, {1, 1}, {1, 1}, {1, 1}, 1, relu);
  auto y = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
                     x.options().memory_format(at::MemoryFormat::ChannelsLast));
  winograd_into(y, x, weight_winograd, bias,
                residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor(), relu);
  return y;
}

void conv3x3_winograd_bias_act_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& weight_winograd, const at::Tensor& bias, bool relu) {
  check_winograd_args(x, weight, weight_winograd, bias, residual);
  TORCH_CHECK(residual.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fast: conv3x3_winograd_bias_act_ writes into residual, which must be channels_last contiguous");
  at::assert_no_overlap(residual, x);
  if (!operands_finite(x, bias, residual)) {
    conv_bias_act_(residual, x, weight, bias, {1, 1}, {1, 1}, {1, 1}, 1, relu);
    return;
  }
  winograd_into(residual, x, weight_winograd, bias, residual, relu);
}

}  // namespace resnet_fast::cpu
