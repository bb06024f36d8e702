// Weight gradient of a 3x3, stride-1, SAME-padded NHWC float32 convolution, as an XLA FFI handler
// for the CPU backend (see mcl_jax/kernels/__init__.py for why and how it is built and used).
//
//   dW[kh][kw][c][o] = sum_{n,h,w} x[n][h + kh - 1][w + kw - 1][c] * g[n][h][w][o]
//
// x: [N, H, W, C], g: [N, H, W, O] (O a multiple of 16), dW: [3, 3, C, O] (HWIO). Out-of-range
// rows and columns of x are the zero padding. AVX-512: each (kh, kw) and block of input channels
// keeps its C_block x O accumulators in registers while it streams one output row; a row of x and
// of g stay in L1 across the nine taps. The batch is cut into a fixed number of chunks, each
// summed into its own partial result, then the partials are added in chunk order: the result does
// not depend on how many threads ran the chunks (bit-exact reruns and resumes).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kChunks = 8;

template <int OV, int CB>
void AccumulateImages(const float* x, const float* g, float* acc, int64_t n0, int64_t n1,
                      int64_t H, int64_t W, int64_t C) {
  constexpr int O = OV * 16;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < H; ++h) {
      const float* g_row = g + (n * H + h) * W * O;
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t hi = h + kh - 1;
        if (hi < 0 || hi >= H) continue;
        const float* x_row = x + (n * H + hi) * W * C;
        for (int kw = 0; kw < 3; ++kw) {
          // Output columns whose input column w + kw - 1 lies inside the image.
          const int64_t w0 = kw == 0 ? 1 : 0, w1 = kw == 2 ? W - 1 : W;
          for (int64_t cb = 0; cb < C; cb += CB) {
            const int cn = static_cast<int>(std::min<int64_t>(CB, C - cb));
            float* a = acc + ((kh * 3 + kw) * C + cb) * O;
            __m512 r[CB][OV];
            for (int i = 0; i < CB; ++i)
              for (int j = 0; j < OV; ++j)
                r[i][j] = i < cn ? _mm512_loadu_ps(a + i * O + j * 16) : _mm512_setzero_ps();
            for (int64_t w = w0; w < w1; ++w) {
              const float* xp = x_row + (w + kw - 1) * C + cb;
              __m512 gv[OV];
              for (int j = 0; j < OV; ++j) gv[j] = _mm512_loadu_ps(g_row + w * O + j * 16);
              for (int i = 0; i < CB; ++i) {
                if (i >= cn) break;
                const __m512 xv = _mm512_set1_ps(xp[i]);
                for (int j = 0; j < OV; ++j) r[i][j] = _mm512_fmadd_ps(xv, gv[j], r[i][j]);
              }
            }
            for (int i = 0; i < cn; ++i)
              for (int j = 0; j < OV; ++j) _mm512_storeu_ps(a + i * O + j * 16, r[i][j]);
          }
        }
      }
    }
  }
}

using ChunkFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                         int64_t);

ChunkFn ChunkFor(int64_t O) {
  switch (O) {  // accumulators: CB x OV = 16 zmm registers
    case 16: return AccumulateImages<1, 16>;
    case 32: return AccumulateImages<2, 8>;
    case 48: return AccumulateImages<3, 5>;
    case 64: return AccumulateImages<4, 4>;
    case 128: return AccumulateImages<8, 2>;
    default: return nullptr;
  }
}

// Shared by the caller and the pool tasks; a task that starts after the caller returned finds no
// chunk left and touches nothing else.
struct Work {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
};

}  // namespace

static ffi::Error Conv3x3WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::F32> g,
                                       ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2])
    return ffi::Error::InvalidArgument("conv3x3 weight gradient: x [N,H,W,C], g [N,H,W,O]");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], O = gd[3];
  ChunkFn chunk = ChunkFor(O);
  if (chunk == nullptr)
    return ffi::Error::InvalidArgument("conv3x3 weight gradient: unsupported output channels");
  const int64_t size = 9 * C * O;
  std::unique_ptr<float[]> partial(new float[kChunks * size]());
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* pp = partial.get();
  auto work = std::make_shared<Work>();
  auto run_chunks = [=]() {
    for (int k; (k = work->next.fetch_add(1)) < kChunks;) {
      chunk(xp, gp, pp + k * size, N * k / kChunks, N * (k + 1) / kChunks, H, W, C);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), kChunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    // Captures only `work` by value until it knows a chunk is its own.
    pool.Schedule([work, run_chunks]() { run_chunks(); });
  }
  run_chunks();
  while (work->done.load(std::memory_order_acquire) < kChunks) std::this_thread::yield();
  float* out = dw->typed_data();
  std::memcpy(out, pp, size * sizeof(float));
  for (int k = 1; k < kChunks; ++k)
    for (int64_t i = 0; i < size; ++i) out[i] += pp[k * size + i];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3WeightGrad, Conv3x3WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
