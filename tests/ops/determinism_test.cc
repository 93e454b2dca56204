// The trainer's resume must be bit-identical, so no op may let the OpenMP thread count change
// its rounding: run the parallel ops with 1, 2 and 3 threads and compare bits.
#include <omp.h>

#include <cstring>
#include <functional>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cpu_ops.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::RandomTokens;
using testing::RandomVector;
using testing::ToFloat;

// Runs fn under each thread count and expects byte-identical outputs.
void ExpectSameBitsAcrossThreads(const std::function<std::vector<float>()>& fn,
                                 const char* what) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> ref = fn();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const std::vector<float> got = fn();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0)
        << what << " differs with " << threads << " threads";
  }
  omp_set_num_threads(saved);
}

std::vector<float> Concat(std::initializer_list<const std::vector<float>*> parts) {
  std::vector<float> all;
  for (const auto* p : parts) all.insert(all.end(), p->begin(), p->end());
  return all;
}

TEST(DeterminismTest, Matmul) {
  const int n = 300, c = 70, oc = 100;  // ragged row and channel blocks
  const std::vector<float> x = ToFloat(RandomVector(n * c, 1)), w = ToFloat(RandomVector(oc * c, 2));
  const std::vector<float> b = ToFloat(RandomVector(oc, 3)), dy = ToFloat(RandomVector(n * oc, 4));
  ExpectSameBitsAcrossThreads(
      [&] {
        std::vector<float> y(n * oc), dx(n * c, 0.f), dw(oc * c, 0.f), db(oc, 0.f);
        matmul_forward(y.data(), x.data(), w.data(), b.data(), n, c, oc);
        matmul_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), n, c, oc);
        return Concat({&y, &dx, &dw, &db});
      },
      "matmul");
}

TEST(DeterminismTest, LayernormAttentionGelu) {
  const int B = 3, T = 17, C = 48, NH = 4, N = B * T;
  const std::vector<float> x = ToFloat(RandomVector(N * 3 * C, 5));
  const std::vector<float> w = ToFloat(RandomVector(3 * C, 6)), bias = ToFloat(RandomVector(3 * C, 7));
  const std::vector<float> dy = ToFloat(RandomVector(N * 3 * C, 8));
  ExpectSameBitsAcrossThreads(
      [&] {
        std::vector<float> ln(N * 3 * C), mean(N), rstd(N), dln(N * 3 * C, 0.f), dw(3 * C, 0.f),
            db(3 * C, 0.f);
        layernorm_forward(ln.data(), mean.data(), rstd.data(), x.data(), w.data(), bias.data(), N,
                          3 * C);
        layernorm_backward(dln.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(),
                           mean.data(), rstd.data(), N, 3 * C);
        std::vector<float> att_out(N * C), att(B * NH * T * T), scratch(B * NH * T * T),
            datt(N * 3 * C, 0.f);
        attention_forward(att_out.data(), att.data(), ln.data(), B, T, C, NH);
        attention_backward(datt.data(), scratch.data(), dy.data(), ln.data(), att.data(), B, T, C,
                           NH);
        std::vector<float> g(N * C), dg(N * C, 0.f);
        gelu_forward(g.data(), att_out.data(), N * C);
        gelu_backward(dg.data(), att_out.data(), dy.data(), N * C);
        return Concat({&ln, &mean, &rstd, &dln, &dw, &db, &att_out, &att, &datt, &g, &dg});
      },
      "layernorm/attention/gelu");
}

TEST(DeterminismTest, CrossEntropyAndOptimizer) {
  const int N = 130, C = 40, V = 67;
  const std::vector<float> x = ToFloat(RandomVector(N * C, 9)), wte = ToFloat(RandomVector(V * C, 10));
  const std::vector<int32_t> targets = RandomTokens(N, V, 11);
  ExpectSameBitsAcrossThreads(
      [&] {
        std::vector<float> losses(N), probs(N * V), dx(N * C, 0.f), dwte(V * C, 0.f);
        const double mean = lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                         wte.data(), targets.data(), N, C, V);
        lm_head_crossentropy_backward(dx.data(), dwte.data(), probs.data(), x.data(), wte.data(),
                                      targets.data(), N, C, V, 1.f);
        std::vector<float> p = wte, m(V * C, 0.f), v(V * C, 0.f);
        const double norm = std::sqrt(sum_squares(dwte.data(), V * C));
        clip_by_global_norm(dwte.data(), V * C, norm, 0.01);
        adamw_update(p.data(), dwte.data(), m.data(), v.data(), V * C, 1e-3f, 0.9f, 0.95f, 1e-8f,
                     0.1f, 1);
        std::vector<float> scalars = {static_cast<float>(mean), static_cast<float>(norm)};
        return Concat({&losses, &dx, &p, &m, &v, &scalars});
      },
      "crossentropy/optimizer");
}

}  // namespace
}  // namespace qtrain::ops
