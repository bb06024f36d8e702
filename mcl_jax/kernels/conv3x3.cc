// A 3x3, stride-1, SAME-padded NHWC float32 convolution and its weight gradient, as XLA FFI
// handlers for the CPU backend (see mcl_jax/kernels/__init__.py for why and how they are built and
// used). x: [N, H, W, C], w: [3, 3, C, O] (HWIO), O one of the widths in `OutputVectors`;
// out-of-range rows and columns of x are the zero padding.
//
//   Conv3x3Forward:    y[n][h][w][o]    = sum_{kh,kw,c} x[n][h + kh - 1][w + kw - 1][c] * w[kh][kw][c][o]
//   Conv3x3WeightGrad: dW[kh][kw][c][o] = sum_{n,h,w}   x[n][h + kh - 1][w + kw - 1][c] * g[n][h][w][o]
//
// (the input gradient is Conv3x3Forward of g with the kernel flipped and its channels swapped).
// AVX-512 register tiling: the forward pass keeps a block of output pixels x O accumulators in
// registers over the 9 C taps; the weight gradient keeps a block of input channels x O
// accumulators in registers while one output row streams through, the rows staying in L1 across
// the nine taps. The batch is cut into a fixed number of chunks run on XLA's intra-op pool; the
// weight gradient sums each chunk into its own partial result and adds the partials in chunk
// order, so no result depends on how many threads ran (bit-exact reruns and resumes).
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


// Runs chunk(k) for k in [0, kChunks) on the calling thread and up to num_threads - 1 pool
// threads; returns when every chunk is done. A pool task that starts after that finds no chunk
// left and touches nothing but `work` (shared ownership), so the caller never waits on a task
// that has not started (no deadlock when every pool thread is itself waiting in such a call).
template <typename F>
void RunChunks(ffi::ThreadPool& pool, F chunk) {
  auto work = std::make_shared<Work>();
  auto body = std::make_shared<F>(std::move(chunk));
  auto run = [work, body]() {
    for (int k; (k = work->next.fetch_add(1)) < kChunks;) {
      (*body)(k);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), kChunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run;  // Schedule takes its task by rvalue
    pool.Schedule(std::move(task));
  }
  run();
  while (work->done.load(std::memory_order_acquire) < kChunks) std::this_thread::yield();
}

// One output row segment [wb, wb + nb) of image row h: WB pixels x OV vectors of 16 outputs.
template <int OV, int WB, bool kFull>
inline void ForwardBlock(const float* pad, const float* w, float* y, int64_t h, int64_t wb,
                         int nb, int64_t Wp, int64_t C) {
  constexpr int O = OV * 16;
  __m512 acc[WB][OV];
  for (int i = 0; i < WB; ++i)
    for (int j = 0; j < OV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int kh = 0; kh < 3; ++kh) {
    for (int kw = 0; kw < 3; ++kw) {
      const float* p = pad + ((h + kh) * Wp + wb + kw) * C;
      const float* wt = w + (kh * 3 + kw) * C * O;
      for (int64_t c = 0; c < C; ++c) {
        __m512 wv[OV];
        for (int j = 0; j < OV; ++j) wv[j] = _mm512_loadu_ps(wt + c * O + j * 16);
        for (int i = 0; i < WB; ++i) {
          if (!kFull && i >= nb) break;
          const __m512 xv = _mm512_set1_ps(p[i * C + c]);
          for (int j = 0; j < OV; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < WB; ++i) {
    if (!kFull && i >= nb) break;
    for (int j = 0; j < OV; ++j) _mm512_storeu_ps(y + (wb + i) * O + j * 16, acc[i][j]);
  }
}

template <int OV, int WB>
void ForwardImages(const float* x, const float* w, float* y, int64_t n0, int64_t n1, int64_t H,
                   int64_t W, int64_t C) {
  constexpr int O = OV * 16;
  const int64_t Wp = W + 2;
  std::vector<float> pad((H + 2) * Wp * C, 0.f);  // the borders stay zero
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(&pad[((h + 1) * Wp + 1) * C], x + (n * H + h) * W * C, W * C * sizeof(float));
    for (int64_t h = 0; h < H; ++h) {
      float* y_row = y + (n * H + h) * W * O;
      int64_t wb = 0;
      for (; wb + WB <= W; wb += WB)
        ForwardBlock<OV, WB, true>(pad.data(), w, y_row, h, wb, WB, Wp, C);
      if (wb < W)
        ForwardBlock<OV, WB, false>(pad.data(), w, y_row, h, wb, static_cast<int>(W - wb), Wp, C);
    }
  }
}

ChunkFn ForwardFor(int64_t O) {
  switch (O) {  // accumulators: WB x OV <= 24 zmm registers
    case 16: return ForwardImages<1, 16>;
    case 32: return ForwardImages<2, 8>;
    case 48: return ForwardImages<3, 6>;
    case 64: return ForwardImages<4, 4>;
    case 128: return ForwardImages<8, 2>;
    default: return nullptr;
  }
}

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
  RunChunks(pool, [=](int k) {
    chunk(xp, gp, pp + k * size, N * k / kChunks, N * (k + 1) / kChunks, H, W, C);
  });
  float* out = dw->typed_data();
  std::memcpy(out, pp, size * sizeof(float));
  for (int k = 1; k < kChunks; ++k)
    for (int64_t i = 0; i < size; ++i) out[i] += pp[k * size + i];
  return ffi::Error::Success();
}

static ffi::Error Conv3x3ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("conv3x3 forward: x [N,H,W,C], w [3,3,C,O]");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], O = wd[3];
  ChunkFn images = ForwardFor(O);
  if (images == nullptr)
    return ffi::Error::InvalidArgument("conv3x3 forward: unsupported output channels");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  RunChunks(pool, [=](int k) {
    images(xp, wp, yp, N * k / kChunks, N * (k + 1) / kChunks, H, W, C);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3WeightGrad, Conv3x3WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3Forward, Conv3x3ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
