// LoadExportWeights / LoadExportedModel.
#include "trainer/export_reader.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/quant/pack.h"
#include "ops/status_macros.h"
#include "trainer/model_setup.h"

namespace qtrain {
namespace {

absl::StatusOr<std::vector<float>> F32(const SafeTensors& st, const std::string& name,
                                       const std::string& path, int64_t n) {
  ASSIGN_OR_RETURN(const Tensor* t, st.Get(name, path));
  std::vector<float> v(n);
  RETURN_IF_ERROR(t->CopyTo(v.data(), n, absl::StrCat(path, ": tensor '", name, "'")));
  return v;
}

}  // namespace

absl::Status LoadExportWeights(const SafeTensors& st, const std::string& path, Gpt* model) {
  ASSIGN_OR_RETURN(std::string format, st.Meta("format", path));
  if (format != kExportFormat) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": format '", format, "', expected '", kExportFormat, "'"));
  }
  ParamStore& ps = model->params();
  std::vector<bool> done(ps.size(), false);
  for (Linear* lin : model->linears()) {
    if (lin->options().mode != LinearMode::kQat) continue;
    const ops::LsqConfig cfg = lin->weight_lsq_config();
    const int OC = lin->out_features(), C = lin->in_features();
    ASSIGN_OR_RETURN(const Tensor* q, st.Get(lin->name() + ".qweight", path));
    ASSIGN_OR_RETURN(int64_t row_bytes, ops::packed_row_bytes(cfg.bits, C));
    if (q->dtype != "U8" || q->shape != std::vector<int64_t>{OC, row_bytes}) {
      return absl::DataLossError(absl::StrCat(path, ": '", lin->name(),
                                              ".qweight' must be U8 [", OC, ",", row_bytes, "]"));
    }
    std::vector<int32_t> codes(static_cast<size_t>(OC) * C);
    const ops::CodeSign sign =
        cfg.mode == ops::LsqMode::kSymmetric ? ops::CodeSign::kSigned : ops::CodeSign::kUnsigned;
    RETURN_IF_ERROR(ops::unpack_codes(codes.data(),
                                      reinterpret_cast<const uint8_t*>(q->bytes.data()), OC, C,
                                      cfg.bits, sign));
    const int64_t ns = ps.info(lin->w_scale_index()).size;
    ASSIGN_OR_RETURN(std::vector<float> steps, F32(st, lin->name() + ".w_scale", path, ns));
    std::vector<float> zeros;
    if (lin->w_zero_index() >= 0) {
      ASSIGN_OR_RETURN(zeros, F32(st, lin->name() + ".w_zero", path, ns));
    }
    RETURN_IF_ERROR(lin->LoadQuantized(codes, steps, lin->w_zero_index() >= 0 ? &zeros : nullptr));
    for (int idx : {lin->weight_index(), lin->w_scale_index(), lin->w_zero_index()}) {
      if (idx >= 0) done[idx] = true;
    }
    for (int idx : lin->phi_param_indices()) done[idx] = true;
    if (lin->x_scale_index() >= 0) {
      // The activation step is exported under its own name; mark it initialised.
      ASSIGN_OR_RETURN(std::vector<float> xs, F32(st, lin->name() + ".x_scale", path, 1));
      RETURN_IF_ERROR(lin->SetActivationStepFromAmax(0));
      ps.param(lin->x_scale_index())[0] = xs[0];
      done[lin->x_scale_index()] = true;
    }
  }
  for (int i = 0; i < ps.size(); ++i) {
    if (done[i]) continue;
    ASSIGN_OR_RETURN(std::vector<float> v, F32(st, ps.info(i).name, path, ps.info(i).size));
    std::copy(v.begin(), v.end(), ps.param(i));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Gpt>> LoadExportedModel(const std::string& path, JobSpec* spec) {
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  ASSIGN_OR_RETURN(std::string format, st.Meta("format", path));
  if (format != kExportFormat) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": format '", format, "', expected '", kExportFormat, "'"));
  }
  ASSIGN_OR_RETURN(std::string text, st.Meta("job_spec", path));
  ASSIGN_OR_RETURN(*spec, ParseJobSpec(text, path + " (job_spec metadata)"));
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(*spec));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(gc));
  RETURN_IF_ERROR(LoadExportWeights(st, path, model.get()));
  return model;
}

}  // namespace qtrain
