// Tile compositing of binned Gaussians on the CPU: the reference 3DGS per-pixel loops
// (renderCUDA / renderCUDA backward) as XLA FFI custom calls, multithreaded.
//
// Semantics are composite_jax.py's (the contract's): pixel (x, y) at (x + .5, y + .5),
// power = -0.5 (a dx^2 + c dy^2) - b dx dy, skip power > 0, alpha = min(0.99, o exp(power)),
// skip alpha < 1/255, stop before T < 1e-4 (that Gaussian not composited); the gradient of
// the clamped alpha is zero where it is clamped (as gsplat and composite_jax.py). The
// backward walks each pixel's list back from its last composited Gaussian and recovers the
// transmittance by division, as the reference does.
//
// Threads: images are split between threads when there are at least two; a single image
// splits its tiles between threads, each accumulating the Gaussians' gradients privately
// (summed at the end), so no two threads ever add to the same gradient.
//
// Built by rasterizer/composite_cpu.py (g++ -O3 -shared) against jaxlib's XLA FFI headers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;
constexpr int kPixels = kTile * kTile;

struct Shapes {
  int64_t batch, num, channels, capacity, tiles, tiles_x, width, height;
};

// Inputs shared by the forward and the backward, as typed pointers.
template <typename T>
struct Inputs {
  const T* means2d;     // (B, N, 2)
  const T* conics;      // (B, N, 3)
  const T* opacities;   // (B, N)
  const T* colors;      // (B, N, C)
  const T* depths;      // (B, N)
  const T* background;  // (B, C)
  const int32_t* ids;   // (B, K)
  const int32_t* ranges;  // (B, T, 2)
};

int num_threads(int64_t units) {
  int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, std::min(hw, units)));
}

// Runs fn(thread_index, begin, end) over [0, units) split into contiguous ranges.
template <typename Fn>
void parallel_ranges(int64_t units, int threads, Fn fn) {
  if (threads <= 1) {
    fn(0, int64_t{0}, units);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    int64_t begin = units * t / threads, end = units * (t + 1) / threads;
    pool.emplace_back([=] { fn(t, begin, end); });
  }
  fn(0, int64_t{0}, units / threads);
  for (auto& th : pool) th.join();
}

// exp(x) for x <= 0, branch-free so that the per-pixel loops vectorise: Cody-Waite range
// reduction and a degree-6 polynomial (about 1 ulp in float, as XLA's own exp); double uses
// std::exp. Underflows to 0 below -87 (alpha there is far below 1/255 anyway).
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = std::max(x, -80.0f);
  // n = round(x / ln 2) through a truncating conversion (x <= 0), which vectorises.
  const int32_t ni = -static_cast<int32_t>(0.5f - x * 1.44269504088896341f);
  const float n = static_cast<float>(ni);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// One tile's pixels, structure of arrays: every per-Gaussian step below is a loop over the
// 256 pixels that the compiler turns into SIMD code.
template <typename T>
struct TilePixels {
  alignas(64) T px[kPixels];
  alignas(64) T py[kPixels];
  alignas(64) T inside[kPixels];  // 1 inside the image, 0 in the padding of edge tiles
  int64_t pixel[kPixels];         // flat (b, y, x) index, -1 outside
};

template <typename T>
void tile_pixels(const Shapes& s, int64_t b, int64_t tile, TilePixels<T>& t) {
  const int64_t x0 = (tile % s.tiles_x) * kTile, y0 = (tile / s.tiles_x) * kTile;
  for (int p = 0; p < kPixels; ++p) {
    const int64_t x = x0 + p % kTile, y = y0 + p / kTile;
    const bool in = x < s.width && y < s.height;
    t.px[p] = T(x) + T(0.5);
    t.py[p] = T(y) + T(0.5);
    t.inside[p] = in ? T(1) : T(0);
    t.pixel[p] = in ? (b * s.height + y) * s.width + x : -1;
  }
}

// The per-Gaussian alpha at all 256 pixels of a tile: power, exp(power), o exp(power), the
// clamped alpha and whether it counts (power <= 0, alpha >= 1/255) as 1/0.
template <typename T>
struct Splat {
  T mx, my, a, b, c, o;
  explicit Splat(const Inputs<T>& in, int64_t g)
      : mx(in.means2d[2 * g]), my(in.means2d[2 * g + 1]), a(in.conics[3 * g]),
        b(in.conics[3 * g + 1]), c(in.conics[3 * g + 2]), o(in.opacities[g]) {}
};

template <typename T>
__attribute__((always_inline)) inline void splat_alpha(const Splat<T>& q, T px, T py, T& dx, T& dy, T& gauss, T& raw,
                        T& alpha, bool& counts) {
  dx = px - q.mx;
  dy = py - q.my;
  const T power = T(-0.5) * (q.a * dx * dx + q.c * dy * dy) - q.b * dx * dy;
  gauss = exp_nonpositive(std::min(power, T(0)));
  raw = q.o * gauss;
  alpha = std::min(raw, T(0.99));
  counts = (power <= T(0)) & (alpha >= T(1.0 / 255.0));
}

template <typename T>
void forward_tile(const Shapes& s, const Inputs<T>& in, int64_t b, int64_t tile, T* color,
                  T* alpha_out, T* depth_out, T* trans_out, int32_t* last_out) {
  const int64_t C = s.channels;
  const int32_t* range = in.ranges + 2 * (b * s.tiles + tile);
  const int32_t start = range[0], end = range[1];
  TilePixels<T> t;
  tile_pixels(s, b, tile, t);
  alignas(64) T trans[kPixels], depth[kPixels], live[kPixels], weight[kPixels];
  alignas(64) int32_t last[kPixels];
  std::vector<T> acc(C * kPixels, T(0));  // (C, 256)
  for (int p = 0; p < kPixels; ++p) {
    trans[p] = T(1);
    depth[p] = T(0);
    live[p] = t.inside[p];
    last[p] = -1;
  }
  for (int32_t k = start; k < end; ++k) {
    const int64_t g = b * s.num + in.ids[b * s.capacity + k];
    const Splat<T> q(in, g);
    const T z = in.depths[g];
    T any_live = T(0);
#pragma omp simd reduction(max : any_live)
    for (int p = 0; p < kPixels; ++p) {
      T dx, dy, gauss, raw, alpha;
      bool counts;
      splat_alpha(q, t.px[p], t.py[p], dx, dy, gauss, raw, alpha, counts);
      const bool active = counts & (live[p] > T(0));
      const T next = trans[p] * (T(1) - alpha);
      const bool stop = active & (next < T(1e-4));
      const bool composited = active & !stop;
      const T w = composited ? alpha * trans[p] : T(0);
      weight[p] = w;
      depth[p] += w * z;
      trans[p] = composited ? next : trans[p];
      last[p] = composited ? k : last[p];
      live[p] = stop ? T(0) : live[p];
      any_live = std::max(any_live, live[p]);
    }
    const T* col = in.colors + g * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      T* a = acc.data() + ch * kPixels;
      const T cv = col[ch];
      for (int p = 0; p < kPixels; ++p) a[p] += weight[p] * cv;
    }
    if (any_live == T(0)) break;  // every pixel has stopped: the reference's early exit
  }
  const T* bg = in.background + b * C;
  for (int p = 0; p < kPixels; ++p) {
    const int64_t pixel = t.pixel[p];
    if (pixel < 0) continue;
    for (int64_t ch = 0; ch < C; ++ch)
      color[pixel * C + ch] = acc[ch * kPixels + p] + trans[p] * bg[ch];
    alpha_out[pixel] = T(1) - trans[p];
    depth_out[pixel] = depth[p];
    trans_out[pixel] = trans[p];
    last_out[pixel] = last[p];
  }
}

// Gradient accumulators, laid out as the inputs (B*N rows).
template <typename T>
struct Grads {
  T *means2d, *conics, *opacities, *colors, *depths;
};

template <typename T>
void backward_tile(const Shapes& s, const Inputs<T>& in, int64_t b, int64_t tile,
                   const T* trans_final, const int32_t* last_in, const T* g_color,
                   const T* g_alpha, const T* g_depth, Grads<T> out) {
  const int64_t C = s.channels;
  const int32_t start = in.ranges[2 * (b * s.tiles + tile)];
  TilePixels<T> t;
  tile_pixels(s, b, tile, t);
  const T* bg = in.background + b * C;
  alignas(64) T trans[kPixels], behind[kPixels], gd[kPixels], value[kPixels], weight[kPixels];
  alignas(64) int32_t last[kPixels];
  std::vector<T> gc(C * kPixels, T(0));  // (C, 256)
  int32_t max_last = -1;
  for (int p = 0; p < kPixels; ++p) {
    const int64_t pixel = t.pixel[p];
    if (pixel < 0) {
      trans[p] = behind[p] = gd[p] = T(0);
      last[p] = -1;
      continue;
    }
    T gc_bg = T(0);
    for (int64_t ch = 0; ch < C; ++ch) {
      gc[ch * kPixels + p] = g_color[pixel * C + ch];
      gc_bg += g_color[pixel * C + ch] * bg[ch];
    }
    trans[p] = trans_final[pixel];
    // Everything behind the current Gaussian, weighted by the cotangents: the background
    // and the alpha output (1 - T_final) start it.
    behind[p] = trans[p] * (gc_bg - g_alpha[pixel]);
    gd[p] = g_depth[pixel];
    last[p] = last_in[pixel];
    max_last = std::max(max_last, last[p]);
  }
  for (int32_t k = max_last; k >= start; --k) {
    const int64_t g = b * s.num + in.ids[b * s.capacity + k];
    const Splat<T> q(in, g);
    const T z = in.depths[g];
    const T* col = in.colors + g * C;
    for (int p = 0; p < kPixels; ++p) value[p] = gd[p] * z;
    for (int64_t ch = 0; ch < C; ++ch) {
      const T* gcc = gc.data() + ch * kPixels;
      const T cv = col[ch];
      for (int p = 0; p < kPixels; ++p) value[p] += gcc[p] * cv;
    }
    T s_mx = 0, s_my = 0, s_a = 0, s_b = 0, s_c = 0, s_o = 0, s_z = 0;
#pragma omp simd reduction(+ : s_mx, s_my, s_a, s_b, s_c, s_o, s_z)
    for (int p = 0; p < kPixels; ++p) {
      T dx, dy, gauss, raw, alpha;
      bool counts;
      splat_alpha(q, t.px[p], t.py[p], dx, dy, gauss, raw, alpha, counts);
      const bool composited = counts & (k <= last[p]);
      const T keep = composited ? T(1) - alpha : T(1);
      const T before = trans[p] / keep;
      const T w = composited ? alpha * before : T(0);
      const T grad_alpha = composited ? before * value[p] - behind[p] / keep : T(0);
      behind[p] += w * value[p];
      trans[p] = before;
      weight[p] = w;
      // Where alpha is clamped at 0.99 it has no gradient.
      const T grad_raw = raw <= T(0.99) ? grad_alpha : T(0);
      const T grad_power = grad_raw * raw;
      s_o += grad_raw * gauss;
      s_mx += grad_power * (q.a * dx + q.b * dy);
      s_my += grad_power * (q.b * dx + q.c * dy);
      s_a += grad_power * T(-0.5) * dx * dx;
      s_b += grad_power * (-dx * dy);
      s_c += grad_power * T(-0.5) * dy * dy;
      s_z += w * gd[p];
    }
    out.means2d[2 * g] += s_mx;
    out.means2d[2 * g + 1] += s_my;
    out.conics[3 * g] += s_a;
    out.conics[3 * g + 1] += s_b;
    out.conics[3 * g + 2] += s_c;
    out.opacities[g] += s_o;
    out.depths[g] += s_z;
    T* gcol = out.colors + g * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      const T* gcc = gc.data() + ch * kPixels;
      T sum = T(0);
#pragma omp simd reduction(+ : sum)
      for (int p = 0; p < kPixels; ++p) sum += weight[p] * gcc[p];
      gcol[ch] += sum;
    }
  }
}

ffi::Error check_shapes(const ffi::AnyBuffer& means2d, const ffi::AnyBuffer& colors,
                        const ffi::AnyBuffer& ids, const ffi::AnyBuffer& ranges, int64_t width,
                        int64_t height, Shapes& s) {
  auto md = means2d.dimensions(), cd = colors.dimensions(), id = ids.dimensions(),
       rd = ranges.dimensions();
  if (md.size() != 3 || cd.size() != 3 || id.size() != 2 || rd.size() != 3)
    return ffi::Error::InvalidArgument("composite_cpu: unexpected input ranks");
  s.batch = md[0];
  s.num = md[1];
  s.channels = cd[2];
  s.capacity = id[1];
  s.tiles = rd[1];
  s.width = width;
  s.height = height;
  s.tiles_x = (width + kTile - 1) / kTile;
  if (s.tiles != s.tiles_x * ((height + kTile - 1) / kTile))
    return ffi::Error::InvalidArgument("composite_cpu: tile_ranges does not match the image");
  return ffi::Error::Success();
}

// The binning's invariants, checked before any pointer is formed from them: every tile's
// [start, end) lies in [0, K] and every id read there is a Gaussian in [0, N); the backward's
// last composited positions lie in their tile's range (or are -1). An index outside them
// (inputs not from `bin_gaussians`, or a bug upstream) is an error raised in Python, never a
// read or a gradient written outside the buffers. O(K + T + pixels): small beside compositing.
ffi::Error check_bins(const Shapes& s, const int32_t* ids, const int32_t* ranges,
                      const int32_t* last) {
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t tile = 0; tile < s.tiles; ++tile) {
      const int32_t start = ranges[2 * (b * s.tiles + tile)],
                    end = ranges[2 * (b * s.tiles + tile) + 1];
      if (start < 0 || end < start || end > s.capacity)
        return ffi::Error::InvalidArgument(
            "composite_cpu: tile_ranges outside [0, capacity] or decreasing (image " +
            std::to_string(b) + ", tile " + std::to_string(tile) + ": [" +
            std::to_string(start) + ", " + std::to_string(end) + "), capacity " +
            std::to_string(s.capacity) + ")");
      for (int32_t k = start; k < end; ++k) {
        const int32_t id = ids[b * s.capacity + k];
        if (id < 0 || id >= s.num)
          return ffi::Error::InvalidArgument(
              "composite_cpu: gaussian_ids[" + std::to_string(b) + ", " + std::to_string(k) +
              "] = " + std::to_string(id) + " is not a Gaussian (N = " +
              std::to_string(s.num) + ")");
      }
      if (last == nullptr) continue;
      const int64_t x0 = (tile % s.tiles_x) * kTile, y0 = (tile / s.tiles_x) * kTile;
      for (int64_t y = y0; y < std::min(y0 + kTile, s.height); ++y)
        for (int64_t x = x0; x < std::min(x0 + kTile, s.width); ++x) {
          const int32_t k = last[(b * s.height + y) * s.width + x];
          if (k != -1 && (k < start || k >= end))
            return ffi::Error::InvalidArgument(
                "composite_cpu: last composited position " + std::to_string(k) +
                " outside its tile's range [" + std::to_string(start) + ", " +
                std::to_string(end) + ")");
        }
    }
  return ffi::Error::Success();
}

template <typename T>
Inputs<T> typed_inputs(const ffi::AnyBuffer& means2d, const ffi::AnyBuffer& conics,
                       const ffi::AnyBuffer& opacities, const ffi::AnyBuffer& colors,
                       const ffi::AnyBuffer& depths, const ffi::AnyBuffer& background,
                       const ffi::AnyBuffer& ids, const ffi::AnyBuffer& ranges) {
  return Inputs<T>{means2d.typed_data<T>(),    conics.typed_data<T>(),
                   opacities.typed_data<T>(),  colors.typed_data<T>(),
                   depths.typed_data<T>(),     background.typed_data<T>(),
                   ids.typed_data<int32_t>(),  ranges.typed_data<int32_t>()};
}

template <typename T>
void forward_typed(const Shapes& s, const Inputs<T>& in, T* color, T* alpha, T* depth,
                   T* trans, int32_t* last) {
  const int64_t units = s.batch * s.tiles;
  parallel_ranges(units, num_threads(units), [&](int, int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u)
      forward_tile(s, in, u / s.tiles, u % s.tiles, color, alpha, depth, trans, last);
  });
}

template <typename T>
void backward_typed(const Shapes& s, const Inputs<T>& in, const T* trans, const int32_t* last,
                    const T* g_color, const T* g_alpha, const T* g_depth, Grads<T> out,
                    T* g_background) {
  const int64_t C = s.channels, rows = s.batch * s.num;
  std::fill(out.means2d, out.means2d + 2 * rows, T(0));
  std::fill(out.conics, out.conics + 3 * rows, T(0));
  std::fill(out.opacities, out.opacities + rows, T(0));
  std::fill(out.colors, out.colors + C * rows, T(0));
  std::fill(out.depths, out.depths + rows, T(0));
  const int64_t pixels = s.width * s.height;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t ch = 0; ch < C; ++ch) {
      T sum = T(0);
      for (int64_t p = 0; p < pixels; ++p)
        sum += g_color[(b * pixels + p) * C + ch] * trans[b * pixels + p];
      g_background[b * C + ch] = sum;
    }
  if (s.batch >= 2) {  // whole images per thread: their Gaussians are disjoint
    parallel_ranges(s.batch, num_threads(s.batch), [&](int, int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t t = 0; t < s.tiles; ++t)
          backward_tile(s, in, b, t, trans, last, g_color, g_alpha, g_depth, out);
    });
    return;
  }
  const int threads = num_threads(s.tiles);
  const int64_t width = 2 + 3 + 1 + C + 1;
  std::vector<std::vector<T>> scratch(threads - 1, std::vector<T>(width * rows, T(0)));
  parallel_ranges(s.tiles, threads, [&](int index, int64_t begin, int64_t end) {
    Grads<T> mine = out;
    if (index > 0) {
      T* base = scratch[index - 1].data();
      mine = Grads<T>{base, base + 2 * rows, base + 5 * rows, base + 6 * rows,
                      base + (6 + C) * rows};
    }
    for (int64_t t = begin; t < end; ++t)
      backward_tile(s, in, 0, t, trans, last, g_color, g_alpha, g_depth, mine);
  });
  for (const auto& buffer : scratch) {
    const T* base = buffer.data();
    for (int64_t i = 0; i < 2 * rows; ++i) out.means2d[i] += base[i];
    for (int64_t i = 0; i < 3 * rows; ++i) out.conics[i] += base[2 * rows + i];
    for (int64_t i = 0; i < rows; ++i) out.opacities[i] += base[5 * rows + i];
    for (int64_t i = 0; i < C * rows; ++i) out.colors[i] += base[6 * rows + i];
    for (int64_t i = 0; i < rows; ++i) out.depths[i] += base[(6 + C) * rows + i];
  }
}

// Runs fn(T{}) with T the inputs' float type: float32 or float64, else an error.
template <typename Fn>
ffi::Error by_dtype(ffi::DataType dtype, Fn fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      fn(float{});
      return ffi::Error::Success();
    case ffi::DataType::F64:
      fn(double{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("composite_cpu: float32 or float64 inputs only");
  }
}

ffi::Error ForwardImpl(ffi::AnyBuffer means2d, ffi::AnyBuffer conics, ffi::AnyBuffer opacities,
                       ffi::AnyBuffer colors, ffi::AnyBuffer depths, ffi::AnyBuffer background,
                       ffi::AnyBuffer ids, ffi::AnyBuffer ranges, int64_t width, int64_t height,
                       ffi::Result<ffi::AnyBuffer> color, ffi::Result<ffi::AnyBuffer> alpha,
                       ffi::Result<ffi::AnyBuffer> depth, ffi::Result<ffi::AnyBuffer> trans,
                       ffi::Result<ffi::AnyBuffer> last) {
  Shapes s;
  if (auto e = check_shapes(means2d, colors, ids, ranges, width, height, s); e.failure())
    return e;
  if (auto e = check_bins(s, ids.typed_data<int32_t>(), ranges.typed_data<int32_t>(), nullptr);
      e.failure())
    return e;
  return by_dtype(means2d.element_type(), [&](auto zero) {
    using T = decltype(zero);
    forward_typed<T>(
        s, typed_inputs<T>(means2d, conics, opacities, colors, depths, background, ids, ranges),
        color->typed_data<T>(), alpha->typed_data<T>(), depth->typed_data<T>(),
        trans->typed_data<T>(), last->typed_data<int32_t>());
  });
}

ffi::Error BackwardImpl(ffi::AnyBuffer means2d, ffi::AnyBuffer conics, ffi::AnyBuffer opacities,
                        ffi::AnyBuffer colors, ffi::AnyBuffer depths, ffi::AnyBuffer background,
                        ffi::AnyBuffer ids, ffi::AnyBuffer ranges, ffi::AnyBuffer trans,
                        ffi::AnyBuffer last, ffi::AnyBuffer g_color, ffi::AnyBuffer g_alpha,
                        ffi::AnyBuffer g_depth, int64_t width, int64_t height,
                        ffi::Result<ffi::AnyBuffer> d_means2d,
                        ffi::Result<ffi::AnyBuffer> d_conics,
                        ffi::Result<ffi::AnyBuffer> d_opacities,
                        ffi::Result<ffi::AnyBuffer> d_colors,
                        ffi::Result<ffi::AnyBuffer> d_depths,
                        ffi::Result<ffi::AnyBuffer> d_background) {
  Shapes s;
  if (auto e = check_shapes(means2d, colors, ids, ranges, width, height, s); e.failure())
    return e;
  if (auto e = check_bins(s, ids.typed_data<int32_t>(), ranges.typed_data<int32_t>(),
                          last.typed_data<int32_t>());
      e.failure())
    return e;
  return by_dtype(means2d.element_type(), [&](auto zero) {
    using T = decltype(zero);
    backward_typed<T>(
        s, typed_inputs<T>(means2d, conics, opacities, colors, depths, background, ids, ranges),
        trans.typed_data<T>(), last.typed_data<int32_t>(), g_color.typed_data<T>(),
        g_alpha.typed_data<T>(), g_depth.typed_data<T>(),
        Grads<T>{d_means2d->typed_data<T>(), d_conics->typed_data<T>(),
                 d_opacities->typed_data<T>(), d_colors->typed_data<T>(),
                 d_depths->typed_data<T>()},
        d_background->typed_data<T>());
  });
}

// The eight inputs both handlers start with.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()   // means2d
      .Arg<ffi::AnyBuffer>()   // conics
      .Arg<ffi::AnyBuffer>()   // opacities
      .Arg<ffi::AnyBuffer>()   // colors
      .Arg<ffi::AnyBuffer>()   // depths
      .Arg<ffi::AnyBuffer>()   // background
      .Arg<ffi::AnyBuffer>()   // gaussian_ids
      .Arg<ffi::AnyBuffer>();  // tile_ranges
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Reta3dCompositeForward, ForwardImpl,
                              BindInputs()
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("height")
                                  .Ret<ffi::AnyBuffer>()   // color
                                  .Ret<ffi::AnyBuffer>()   // alpha
                                  .Ret<ffi::AnyBuffer>()   // depth
                                  .Ret<ffi::AnyBuffer>()   // final transmittance
                                  .Ret<ffi::AnyBuffer>());  // last composited position

XLA_FFI_DEFINE_HANDLER_SYMBOL(Reta3dCompositeBackward, BackwardImpl,
                              BindInputs()
                                  .Arg<ffi::AnyBuffer>()  // final transmittance
                                  .Arg<ffi::AnyBuffer>()  // last composited position
                                  .Arg<ffi::AnyBuffer>()  // g_color
                                  .Arg<ffi::AnyBuffer>()  // g_alpha
                                  .Arg<ffi::AnyBuffer>()  // g_depth
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("height")
                                  .Ret<ffi::AnyBuffer>()   // d means2d
                                  .Ret<ffi::AnyBuffer>()   // d conics
                                  .Ret<ffi::AnyBuffer>()   // d opacities
                                  .Ret<ffi::AnyBuffer>()   // d colors
                                  .Ret<ffi::AnyBuffer>()   // d depths
                                  .Ret<ffi::AnyBuffer>());  // d background
