// cuDNN fused flash attention (causal, BF16) through cuDNN 9's backend graph API: the forward
// and backward SDPA patterns expressed as matmul / pointwise / reduction / reshape operations on
// strided views of our packed (B,T,3C) q|k|v, with execution plans cached per shape.
// Host code only; compiled by nvcc because Bazel keeps the CUDA include path out of g++.
#include "ops/cuda/attention_cudnn.h"

#include <cudnn.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/status_macros.h"

namespace qtrain::ops::cudnn_attention {
namespace {

absl::Status CudnnError(cudnnStatus_t s, const char* expr, int line) {
  return absl::InternalError(absl::StrCat("cuDNN ", cudnnGetErrorString(s), " (", s, ") at ",
                                          __FILE__, ":", line, " in ", expr));
}

#define CUDNN_RETURN_IF_ERROR(expr)                                     \
  do {                                                                  \
    const cudnnStatus_t qt_cudnn_s_ = (expr);                           \
    if (qt_cudnn_s_ != CUDNN_STATUS_SUCCESS)                            \
      return CudnnError(qt_cudnn_s_, #expr, __LINE__);                  \
  } while (0)

// Owns one backend descriptor.
class Desc {
 public:
  Desc() = default;
  ~Desc() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  absl::Status Create(cudnnBackendDescriptorType_t type) {
    CUDNN_RETURN_IF_ERROR(cudnnBackendCreateDescriptor(type, &d_));
    return absl::OkStatus();
  }
  cudnnBackendDescriptor_t get() const { return d_; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};
using DescPtr = std::shared_ptr<Desc>;

template <typename T>
absl::Status Set(const DescPtr& d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
                 int64_t n, const T* v) {
  CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(d->get(), name, type, n, v));
  return absl::OkStatus();
}

absl::Status SetDesc(const DescPtr& d, cudnnBackendAttributeName_t name, const DescPtr& v) {
  cudnnBackendDescriptor_t raw = v->get();
  return Set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
}

absl::Status Finalize(const DescPtr& d) {
  CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(d->get()));
  return absl::OkStatus();
}

// Builds the operations of one graph; keeps every descriptor alive until the plan is built.
class GraphBuilder {
 public:
  absl::StatusOr<DescPtr> Tensor(cudnnDataType_t type, std::vector<int64_t> dims,
                                 std::vector<int64_t> strides, bool is_virtual, int64_t uid = -1,
                                 bool by_value = false,
                                 cudnnBackendTensorReordering_t reorder =
                                     CUDNN_TENSOR_REORDERING_NONE) {
    auto d = std::make_shared<Desc>();
    RETURN_IF_ERROR(d->Create(CUDNN_BACKEND_TENSOR_DESCRIPTOR));
    if (uid < 0) uid = next_virtual_uid_++;
    const int64_t align = 16;
    const bool virt = is_virtual, byval = by_value;
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type));
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64,
                        static_cast<int64_t>(dims.size()), dims.data()));
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64,
                        static_cast<int64_t>(strides.size()), strides.data()));
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid));
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align));
    RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &virt));
    if (by_value) {
      RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &byval));
    }
    if (reorder != CUDNN_TENSOR_REORDERING_NONE) {
      RETURN_IF_ERROR(Set(d, CUDNN_ATTR_TENSOR_REORDERING_MODE,
                          CUDNN_TYPE_TENSOR_REORDERING_MODE, 1, &reorder));
    }
    RETURN_IF_ERROR(Finalize(d));
    keep_.push_back(d);
    return d;
  }

  // A float scalar passed by value (its host address goes into the variant pack).
  absl::StatusOr<DescPtr> Scalar(int64_t uid) {
    return Tensor(CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, uid, true);
  }

  // A virtual tensor shaped like `dims` with packed strides.
  absl::StatusOr<DescPtr> Virtual(cudnnDataType_t type, std::vector<int64_t> dims) {
    std::vector<int64_t> strides(dims.size());
    int64_t s = 1;
    for (int i = static_cast<int>(dims.size()) - 1; i >= 0; --i) {
      strides[i] = s;
      s *= dims[i];
    }
    return Tensor(type, dims, strides, true);
  }

  // y = mode(x, b, t); b and t may be null. axis >= 0 only for GEN_INDEX.
  absl::Status Pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t prec, const DescPtr& x,
                         const DescPtr& b, const DescPtr& t, const DescPtr& y,
                         int64_t axis = -1) {
    auto pw = std::make_shared<Desc>();
    RETURN_IF_ERROR(pw->Create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR));
    RETURN_IF_ERROR(Set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode));
    RETURN_IF_ERROR(Set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec));
    if (axis >= 0) {
      RETURN_IF_ERROR(Set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis));
    }
    RETURN_IF_ERROR(Finalize(pw));
    auto op = std::make_shared<Desc>();
    RETURN_IF_ERROR(op->Create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x));
    if (b) RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b));
    if (t) RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
    RETURN_IF_ERROR(Finalize(op));
    keep_.push_back(pw);
    ops_.push_back(op);
    return absl::OkStatus();
  }

  absl::Status Matmul(const DescPtr& a, const DescPtr& b, const DescPtr& c) {
    auto mm = std::make_shared<Desc>();
    RETURN_IF_ERROR(mm->Create(CUDNN_BACKEND_MATMUL_DESCRIPTOR));
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    RETURN_IF_ERROR(Set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp));
    RETURN_IF_ERROR(Finalize(mm));
    auto op = std::make_shared<Desc>();
    RETURN_IF_ERROR(op->Create(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm));
    RETURN_IF_ERROR(Finalize(op));
    keep_.push_back(mm);
    ops_.push_back(op);
    return absl::OkStatus();
  }

  absl::Status Reduction(cudnnReduceTensorOp_t mode, const DescPtr& x, const DescPtr& y) {
    auto rd = std::make_shared<Desc>();
    RETURN_IF_ERROR(rd->Create(CUDNN_BACKEND_REDUCTION_DESCRIPTOR));
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    RETURN_IF_ERROR(Set(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1,
                        &mode));
    RETURN_IF_ERROR(Set(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp));
    RETURN_IF_ERROR(Finalize(rd));
    auto op = std::make_shared<Desc>();
    RETURN_IF_ERROR(op->Create(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd));
    RETURN_IF_ERROR(Finalize(op));
    keep_.push_back(rd);
    ops_.push_back(op);
    return absl::OkStatus();
  }

  absl::Status Reshape(const DescPtr& x, const DescPtr& y) {
    auto op = std::make_shared<Desc>();
    RETURN_IF_ERROR(op->Create(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x));
    RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y));
    RETURN_IF_ERROR(Finalize(op));
    ops_.push_back(op);
    return absl::OkStatus();
  }

  // Causal mask: s where row >= col, else the lowest float (uid of that scalar: neg_uid).
  absl::StatusOr<DescPtr> CausalMask(const DescPtr& s, const std::vector<int64_t>& sdims,
                                     const DescPtr& lowest) {
    ASSIGN_OR_RETURN(DescPtr row, Virtual(CUDNN_DATA_INT32, sdims));
    RETURN_IF_ERROR(Pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s, nullptr, nullptr,
                              row, 2));
    ASSIGN_OR_RETURN(DescPtr col, Virtual(CUDNN_DATA_INT32, sdims));
    RETURN_IF_ERROR(Pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s, nullptr, nullptr,
                              col, 3));
    ASSIGN_OR_RETURN(DescPtr keep, Virtual(CUDNN_DATA_BOOLEAN, sdims));
    RETURN_IF_ERROR(Pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, nullptr, keep));
    ASSIGN_OR_RETURN(DescPtr out, Virtual(CUDNN_DATA_FLOAT, sdims));
    RETURN_IF_ERROR(Pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, lowest, keep,
                              out));
    return out;
  }

  const std::vector<DescPtr>& ops() const { return ops_; }

 private:
  int64_t next_virtual_uid_ = 1000;
  std::vector<DescPtr> keep_;
  std::vector<DescPtr> ops_;
};

// Tensor uids of the variant packs.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kLowest, kOne, kDO, kDQ, kDK, kDV, kDQAccum,
};

// The execution plans of one graph that finalized, in the heuristic's order; the first call
// times them and keeps the fastest (`best`), so a shape costs one timing round per process.
struct Plan {
  std::vector<DescPtr> candidates;
  int best = -1;               // -1: not timed yet
  int64_t workspace = 0;       // the largest candidate's own workspace
  int64_t dq_accum_bytes = 0;  // backward: fp32 dQ accumulator placed after it, zeroed per call
};

constexpr int kMaxCandidates = 6;

struct State {
  std::mutex mu;
  cudnnHandle_t handle = nullptr;
  bool init_done = false;
  absl::Status init_status;
  std::map<std::tuple<bool, int, int, int, int>, std::shared_ptr<Plan>> plans;
  std::map<std::tuple<bool, int, int, int, int>, absl::Status> failures;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

State& GetState() {
  static State* s = new State();
  return *s;
}

absl::Status Init(State& st) {
  if (st.init_done) return st.init_status;
  st.init_done = true;
  st.init_status = [&]() -> absl::Status {
    const size_t version = cudnnGetVersion();
    if (version < 90000) {
      return absl::FailedPreconditionError(
          absl::StrCat("cuDNN attention needs cuDNN >= 9.0, found ", version));
    }
    int dev = 0;
    CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
    int major = 0;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major != 9) {
      return absl::FailedPreconditionError(
          absl::StrCat("cuDNN attention is used on Hopper (sm_90) only; device ", dev,
                       " is sm_", major, "x"));
    }
    CUDNN_RETURN_IF_ERROR(cudnnCreate(&st.handle));
    return absl::OkStatus();
  }();
  return st.init_status;
}

// Q (B,NH,T,hs) as a view of the packed (B,T,3C) buffer at column offset `which` * C; with
// `transposed`, the (B,NH,hs,T) view.
struct View {
  std::vector<int64_t> dims, strides;
};
View QkvView(int B, int T, int C, int NH, bool transposed) {
  const int64_t hs = C / NH, C3 = 3LL * C;
  if (transposed) return {{B, NH, hs, T}, {T * C3, hs, 1, C3}};
  return {{B, NH, T, hs}, {T * C3, hs, C3, 1}};
}
View OutView(int B, int T, int C, int NH) {
  const int64_t hs = C / NH;
  return {{B, NH, T, hs}, {static_cast<int64_t>(T) * C, hs, C, 1}};
}
View StatsView(int B, int T, int NH) {
  return {{B, NH, T, 1}, {static_cast<int64_t>(NH) * T, T, 1, 1}};
}

// Heuristics, then up to kMaxCandidates engine configs whose plans finalize (mode A's list;
// the fallback list only when mode A gives none).
absl::StatusOr<std::shared_ptr<Plan>> MakePlan(cudnnHandle_t handle, const GraphBuilder& g) {
  auto graph = std::make_shared<Desc>();
  RETURN_IF_ERROR(graph->Create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR));
  std::vector<cudnnBackendDescriptor_t> raw;
  for (const DescPtr& op : g.ops()) raw.push_back(op->get());
  RETURN_IF_ERROR(Set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                      static_cast<int64_t>(raw.size()), raw.data()));
  RETURN_IF_ERROR(Set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle));
  RETURN_IF_ERROR(Finalize(graph));

  absl::Status last = absl::NotFoundError("cuDNN heuristics returned no engine config");
  auto out = std::make_shared<Plan>();
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    if (!out->candidates.empty()) break;
    auto heur = std::make_shared<Desc>();
    RETURN_IF_ERROR(heur->Create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR));
    RETURN_IF_ERROR(SetDesc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph));
    RETURN_IF_ERROR(Set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
    if (cudnnBackendFinalize(heur->get()) != CUDNN_STATUS_SUCCESS) continue;
    int64_t count = 0;
    if (cudnnBackendGetAttribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr) !=
            CUDNN_STATUS_SUCCESS ||
        count <= 0) {
      continue;
    }
    std::vector<DescPtr> cfgs(count);
    std::vector<cudnnBackendDescriptor_t> raw_cfgs(count);
    for (int64_t i = 0; i < count; ++i) {
      cfgs[i] = std::make_shared<Desc>();
      RETURN_IF_ERROR(cfgs[i]->Create(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw_cfgs[i] = cfgs[i]->get();
    }
    int64_t got = 0;
    CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                   CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                                   raw_cfgs.data()));
    for (int64_t i = 0; i < got && static_cast<int>(out->candidates.size()) < kMaxCandidates;
         ++i) {
      auto plan = std::make_shared<Desc>();
      RETURN_IF_ERROR(plan->Create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR));
      RETURN_IF_ERROR(Set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle));
      RETURN_IF_ERROR(SetDesc(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[i]));
      const cudnnStatus_t s = cudnnBackendFinalize(plan->get());
      if (s != CUDNN_STATUS_SUCCESS) {
        last = CudnnError(s, "finalize execution plan", __LINE__);
        continue;
      }
      int64_t n = 0, ws = 0;
      CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(plan->get(),
                                                     CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                     CUDNN_TYPE_INT64, 1, &n, &ws));
      out->candidates.push_back(plan);
      out->workspace = std::max(out->workspace, ws);
    }
  }
  if (out->candidates.empty()) return last;
  if (out->candidates.size() == 1) out->best = 0;
  return out;
}

absl::StatusOr<std::shared_ptr<Plan>> BuildForward(cudnnHandle_t handle, int B, int T, int C,
                                                   int NH) {
  GraphBuilder g;
  const std::vector<int64_t> sdims = {B, NH, T, T};
  const std::vector<int64_t> rdims = {B, NH, T, 1};
  const View qv = QkvView(B, T, C, NH, false), kt = QkvView(B, T, C, NH, true);
  const View ov = OutView(B, T, C, NH), sv = StatsView(B, T, NH);
  ASSIGN_OR_RETURN(DescPtr q, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kQ));
  ASSIGN_OR_RETURN(DescPtr k, g.Tensor(CUDNN_DATA_BFLOAT16, kt.dims, kt.strides, false, kK));
  ASSIGN_OR_RETURN(DescPtr v, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kV));
  ASSIGN_OR_RETURN(DescPtr o, g.Tensor(CUDNN_DATA_BFLOAT16, ov.dims, ov.strides, false, kO));
  ASSIGN_OR_RETURN(DescPtr stats, g.Tensor(CUDNN_DATA_FLOAT, sv.dims, sv.strides, false, kStats));
  ASSIGN_OR_RETURN(DescPtr scale, g.Scalar(kScale));
  ASSIGN_OR_RETURN(DescPtr lowest, g.Scalar(kLowest));

  ASSIGN_OR_RETURN(DescPtr s, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Matmul(q, k, s));
  ASSIGN_OR_RETURN(DescPtr ss, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s, scale, nullptr, ss));
  ASSIGN_OR_RETURN(DescPtr masked, g.CausalMask(ss, sdims, lowest));
  // Softmax with statistics: stats = max + log(sum exp(s - max)).
  ASSIGN_OR_RETURN(DescPtr mx, g.Virtual(CUDNN_DATA_FLOAT, rdims));
  RETURN_IF_ERROR(g.Reduction(CUDNN_REDUCE_TENSOR_MAX, masked, mx));
  ASSIGN_OR_RETURN(DescPtr sub, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, masked, mx, nullptr, sub));
  ASSIGN_OR_RETURN(DescPtr ex, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, sub, nullptr, nullptr, ex));
  ASSIGN_OR_RETURN(DescPtr sum, g.Virtual(CUDNN_DATA_FLOAT, rdims));
  RETURN_IF_ERROR(g.Reduction(CUDNN_REDUCE_TENSOR_ADD, ex, sum));
  ASSIGN_OR_RETURN(DescPtr lg, g.Virtual(CUDNN_DATA_FLOAT, rdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, sum, nullptr, nullptr, lg));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, lg, nullptr, stats));
  ASSIGN_OR_RETURN(DescPtr p, g.Virtual(CUDNN_DATA_BFLOAT16, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, ex, sum, nullptr, p));
  RETURN_IF_ERROR(g.Matmul(p, v, o));
  return MakePlan(handle, g);
}

absl::StatusOr<std::shared_ptr<Plan>> BuildBackward(cudnnHandle_t handle, int B, int T, int C,
                                                    int NH) {
  GraphBuilder g;
  const int64_t hs = C / NH;
  const std::vector<int64_t> sdims = {B, NH, T, T};
  const std::vector<int64_t> rdims = {B, NH, T, 1};
  const View qv = QkvView(B, T, C, NH, false), kt = QkvView(B, T, C, NH, true);
  const View ov = OutView(B, T, C, NH), sv = StatsView(B, T, NH);
  ASSIGN_OR_RETURN(DescPtr q, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kQ));
  ASSIGN_OR_RETURN(DescPtr k, g.Tensor(CUDNN_DATA_BFLOAT16, kt.dims, kt.strides, false, kK));
  ASSIGN_OR_RETURN(DescPtr v, g.Tensor(CUDNN_DATA_BFLOAT16, kt.dims, kt.strides, false, kV));
  ASSIGN_OR_RETURN(DescPtr o, g.Tensor(CUDNN_DATA_BFLOAT16, ov.dims, ov.strides, false, kO));
  ASSIGN_OR_RETURN(DescPtr d_o, g.Tensor(CUDNN_DATA_BFLOAT16, ov.dims, ov.strides, false, kDO));
  ASSIGN_OR_RETURN(DescPtr stats, g.Tensor(CUDNN_DATA_FLOAT, sv.dims, sv.strides, false, kStats));
  ASSIGN_OR_RETURN(DescPtr dq, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kDQ));
  ASSIGN_OR_RETURN(DescPtr dk, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kDK));
  ASSIGN_OR_RETURN(DescPtr dv, g.Tensor(CUDNN_DATA_BFLOAT16, qv.dims, qv.strides, false, kDV));
  ASSIGN_OR_RETURN(DescPtr scale, g.Scalar(kScale));
  ASSIGN_OR_RETURN(DescPtr lowest, g.Scalar(kLowest));
  ASSIGN_OR_RETURN(DescPtr one, g.Scalar(kOne));
  // A non-virtual fp32 dQ accumulator selects cuDNN's atomic-dQ kernel (no T x T workspace).
  ASSIGN_OR_RETURN(DescPtr dq_acc,
                   g.Tensor(CUDNN_DATA_FLOAT, {B, NH, T, hs}, {NH * T * hs, T * hs, hs, 1}, false,
                            kDQAccum, false, CUDNN_TENSOR_REORDERING_F16x16));

  // softmax_sum = rowsum(dO * O): a BSHD-strided virtual product, reduced over hs.
  ASSIGN_OR_RETURN(DescPtr doo, g.Tensor(CUDNN_DATA_FLOAT, ov.dims,
                                         {static_cast<int64_t>(NH) * T * hs, T * hs, NH * hs, 1},
                                         true));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, d_o, o, nullptr, doo));
  ASSIGN_OR_RETURN(DescPtr rsum, g.Virtual(CUDNN_DATA_FLOAT, rdims));
  RETURN_IF_ERROR(g.Reduction(CUDNN_REDUCE_TENSOR_ADD, doo, rsum));
  ASSIGN_OR_RETURN(DescPtr softmax_sum, g.Virtual(CUDNN_DATA_FLOAT, rdims));
  RETURN_IF_ERROR(
      g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, rsum, one, nullptr, softmax_sum));

  // P = exp(mask(scale Q K^T) - stats).
  ASSIGN_OR_RETURN(DescPtr s, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Matmul(q, k, s));
  ASSIGN_OR_RETURN(DescPtr ss, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s, scale, nullptr, ss));
  ASSIGN_OR_RETURN(DescPtr masked, g.CausalMask(ss, sdims, lowest));
  ASSIGN_OR_RETURN(DescPtr sub, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, masked, stats, nullptr, sub));
  ASSIGN_OR_RETURN(DescPtr p, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, sub, nullptr, nullptr, p));

  // dV = P^T dO.
  const std::vector<int64_t> tdims = {B, NH, T, T};
  const std::vector<int64_t> tstrides = {static_cast<int64_t>(NH) * T * T,
                                         static_cast<int64_t>(T) * T, 1, T};
  ASSIGN_OR_RETURN(DescPtr pt, g.Tensor(CUDNN_DATA_BFLOAT16, tdims, tstrides, true));
  RETURN_IF_ERROR(g.Reshape(p, pt));
  RETURN_IF_ERROR(g.Matmul(pt, d_o, dv));

  // dS = P * (dO V^T - softmax_sum) * scale.
  ASSIGN_OR_RETURN(DescPtr dp, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Matmul(d_o, v, dp));
  ASSIGN_OR_RETURN(DescPtr dp1, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dp, one, nullptr, dp1));
  ASSIGN_OR_RETURN(DescPtr dp2, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(
      g.Pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, dp1, softmax_sum, nullptr, dp2));
  ASSIGN_OR_RETURN(DescPtr dp3, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dp2, p, nullptr, dp3));
  ASSIGN_OR_RETURN(DescPtr ds, g.Virtual(CUDNN_DATA_FLOAT, sdims));
  RETURN_IF_ERROR(g.Pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dp3, scale, nullptr, ds));

  // dK = dS^T Q.
  ASSIGN_OR_RETURN(DescPtr dst, g.Tensor(CUDNN_DATA_BFLOAT16, tdims, tstrides, true));
  RETURN_IF_ERROR(g.Reshape(ds, dst));
  RETURN_IF_ERROR(g.Matmul(dst, q, dk));

  // dQ = dS K, accumulated in fp32, then rounded into dq.
  const View kv = QkvView(B, T, C, NH, false);
  ASSIGN_OR_RETURN(DescPtr kk, g.Tensor(CUDNN_DATA_BFLOAT16, kv.dims, kv.strides, true));
  RETURN_IF_ERROR(g.Reshape(k, kk));
  RETURN_IF_ERROR(g.Matmul(ds, kk, dq_acc));
  RETURN_IF_ERROR(
      g.Pointwise(CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, dq_acc, nullptr, nullptr, dq));

  ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, MakePlan(handle, g));
  plan->dq_accum_bytes = static_cast<int64_t>(B) * NH * T * hs * 4;
  return plan;
}

// Cached plan for the shape (built on first use; a failed build is remembered and returned).
absl::StatusOr<std::shared_ptr<Plan>> GetPlan(State& st, bool backward, int B, int T, int C,
                                              int NH) {
  RETURN_IF_ERROR(Init(st));
  const auto key = std::make_tuple(backward, B, T, C, NH);
  auto it = st.plans.find(key);
  if (it != st.plans.end()) return it->second;
  auto f = st.failures.find(key);
  if (f != st.failures.end()) return f->second;
  absl::StatusOr<std::shared_ptr<Plan>> plan = backward ? BuildBackward(st.handle, B, T, C, NH)
                                                        : BuildForward(st.handle, B, T, C, NH);
  if (!plan.ok()) {
    const absl::Status s(plan.status().code(),
                         absl::StrCat("cuDNN attention ", backward ? "backward" : "forward",
                                      " plan for B=", B, " T=", T, " C=", C, " NH=", NH, ": ",
                                      plan.status().message()));
    st.failures[key] = s;
    return s;
  }
  st.plans[key] = *plan;
  return *plan;
}

absl::StatusOr<void*> Workspace(State& st, int64_t bytes) {
  if (bytes <= st.workspace_bytes) return st.workspace;
  if (st.workspace != nullptr) {
    // Earlier executions may still read the old buffer.
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    CUDA_RETURN_IF_ERROR(cudaFree(st.workspace));
    st.workspace = nullptr;
    st.workspace_bytes = 0;
  }
  CUDA_RETURN_IF_ERROR(cudaMalloc(&st.workspace, bytes));
  st.workspace_bytes = bytes;
  return st.workspace;
}

absl::Status Execute(State& st, const DescPtr& plan, const std::vector<int64_t>& uids,
                     std::vector<void*> ptrs, void* workspace, cudaStream_t stream) {
  CUDNN_RETURN_IF_ERROR(cudnnSetStream(st.handle, stream));
  auto pack = std::make_shared<Desc>();
  RETURN_IF_ERROR(pack->Create(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR));
  RETURN_IF_ERROR(Set(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                      static_cast<int64_t>(uids.size()), uids.data()));
  RETURN_IF_ERROR(Set(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                      static_cast<int64_t>(ptrs.size()), ptrs.data()));
  RETURN_IF_ERROR(Set(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace));
  RETURN_IF_ERROR(Finalize(pack));
  CUDNN_RETURN_IF_ERROR(cudnnBackendExecute(st.handle, plan->get(), pack->get()));
  return absl::OkStatus();
}

// Runs `call(candidate)` with the plan's chosen candidate; on the plan's first use with several
// candidates, first times each (one warm-up, then the mean of 3 calls, on `stream`, which this
// waits for) and keeps the fastest; a candidate whose call fails is skipped. The timed calls
// write the same outputs as the real one, which comes last.
absl::Status RunBest(Plan& plan, cudaStream_t stream,
                     const std::function<absl::Status(const DescPtr&)>& call) {
  if (plan.best < 0) {
    cudaEvent_t start = nullptr, stop = nullptr;
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    float best_ms = 0;
    for (size_t i = 0; i < plan.candidates.size(); ++i) {
      if (!call(plan.candidates[i]).ok() || cudaStreamSynchronize(stream) != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
      cudaEventRecord(start, stream);
      bool ok = true;
      for (int r = 0; r < 3 && ok; ++r) ok = call(plan.candidates[i]).ok();
      cudaEventRecord(stop, stream);
      float ms = 0;
      if (!ok || cudaEventSynchronize(stop) != cudaSuccess ||
          cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
      if (plan.best < 0 || ms < best_ms) {
        plan.best = static_cast<int>(i);
        best_ms = ms;
      }
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (plan.best < 0) {
      return absl::InternalError("cuDNN attention: no engine config ran for this shape");
    }
  }
  return call(plan.candidates[plan.best]);
}

}  // namespace

bool Supported(int head_size, const void* const* ptrs, int n) {
  if (head_size % 8 != 0 || head_size > 128) return false;
  for (int i = 0; i < n; ++i) {
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  }
  State& st = GetState();
  std::lock_guard<std::mutex> lock(st.mu);
  return Init(st).ok();
}

absl::Status Forward(bf16* out, float* lse, const bf16* inp, int B, int T, int C, int NH,
                     cudaStream_t stream) {
  State& st = GetState();
  std::lock_guard<std::mutex> lock(st.mu);
  ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, GetPlan(st, false, B, T, C, NH));
  ASSIGN_OR_RETURN(void* ws, Workspace(st, std::max<int64_t>(plan->workspace, 16)));
  float scale = 1.f / std::sqrt(static_cast<float>(C / NH));
  float lowest = -FLT_MAX;
  const bf16* x = inp;
  return RunBest(*plan, stream, [&](const DescPtr& p) {
    return Execute(st, p, {kQ, kK, kV, kO, kStats, kScale, kLowest},
                   {const_cast<bf16*>(x), const_cast<bf16*>(x + C), const_cast<bf16*>(x + 2 * C),
                    out, lse, &scale, &lowest},
                   ws, stream);
  });
}

absl::Status Backward(bf16* dinp, const bf16* dout, const bf16* inp, const bf16* out,
                      const float* lse, int B, int T, int C, int NH, cudaStream_t stream) {
  State& st = GetState();
  std::lock_guard<std::mutex> lock(st.mu);
  ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, GetPlan(st, true, B, T, C, NH));
  const int64_t plan_ws = (plan->workspace + 255) / 256 * 256;
  ASSIGN_OR_RETURN(void* ws, Workspace(st, plan_ws + plan->dq_accum_bytes));
  void* dq_acc = static_cast<char*>(ws) + plan_ws;
  float scale = 1.f / std::sqrt(static_cast<float>(C / NH));
  float lowest = -FLT_MAX;
  float one = 1.f;
  auto mut = [](const void* p) { return const_cast<void*>(p); };
  return RunBest(*plan, stream, [&](const DescPtr& p) -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dq_acc, 0, plan->dq_accum_bytes, stream));
    return Execute(st, p,
                   {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kScale, kLowest, kOne, kDQAccum},
                   {mut(inp), mut(inp + C), mut(inp + 2 * C), mut(out), mut(dout), mut(lse), dinp,
                    dinp + C, dinp + 2 * C, &scale, &lowest, &one, dq_acc},
                   ws, stream);
  });
}

}  // namespace qtrain::ops::cudnn_attention
