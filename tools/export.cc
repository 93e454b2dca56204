// export: a QAT checkpoint -> safetensors with packed low-bit integer weights, steps and zero
// points (layout: docs/quantization.md, "Exported models"); Phi is absent once decayed, else
// folded into the weight before packing. `eval_export` evaluates the result.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/quant/pack.h"
#include "ops/status_macros.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

ABSL_FLAG(std::string, checkpoint, "", "qtrain checkpoint of a QAT job (step_*.safetensors)");
ABSL_FLAG(std::string, out, "", "output safetensors path");

namespace qtrain {
namespace {

absl::Status Export(const std::string& ckpt, const std::string& out) {
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(ckpt));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadModelForEval(spec, ckpt));
  ParamStore& ps = model->params();
  std::vector<TensorView> views;
  std::vector<std::vector<uint8_t>> packed;  // keeps packed bytes alive until written
  packed.reserve(model->linears().size());
  std::vector<bool> exported(ps.size(), false);
  int quantized = 0, folded = 0;
  for (Linear* lin : model->linears()) {
    if (lin->options().mode != LinearMode::kQat) continue;
    const ops::LsqConfig cfg = lin->weight_lsq_config();
    const bool fold = lin->phi_rank() > 0;
    folded += fold;
    std::vector<int32_t> codes;
    RETURN_IF_ERROR(lin->WeightCodes(&codes, fold));
    const int OC = lin->out_features(), C = lin->in_features();
    ASSIGN_OR_RETURN(int64_t row_bytes, ops::packed_row_bytes(cfg.bits, C));
    packed.emplace_back(static_cast<size_t>(OC) * row_bytes);
    const ops::CodeSign sign =
        cfg.mode == ops::LsqMode::kSymmetric ? ops::CodeSign::kSigned : ops::CodeSign::kUnsigned;
    RETURN_IF_ERROR(ops::pack_codes(packed.back().data(), codes.data(), OC, C, cfg.bits, sign));
    views.push_back({lin->name() + ".qweight", "U8", {OC, row_bytes}, packed.back().data(),
                     packed.back().size()});
    exported[lin->weight_index()] = true;
    // Phi factors are folded (or gone): they are not part of the export.
    for (int idx : lin->phi_param_indices()) exported[idx] = true;
    ++quantized;
  }
  // Everything else (embeddings, layernorms, biases, steps, zero points, full-precision
  // Linears) as F32 under its own name.
  for (int i = 0; i < ps.size(); ++i) {
    if (exported[i]) continue;
    const ParamInfo& info = ps.info(i);
    views.push_back({info.name, "F32", info.shape, ps.param(i),
                     static_cast<size_t>(info.size) * sizeof(float)});
  }
  std::map<std::string, std::string> meta = {
      {"format", "qtrain-export-v1"},
      {"job_spec", JobSpecToText(spec)},
      {"source_checkpoint", ckpt},
  };
  RETURN_IF_ERROR(WriteSafeTensors(out, views, meta));
  std::printf("exported %d quantized Linears (%d with Phi folded in) to %s\n", quantized, folded,
              out.c_str());
  if (quantized == 0) std::printf("note: the job has no QAT Linears; all weights are F32\n");
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string ckpt = absl::GetFlag(FLAGS_checkpoint), out = absl::GetFlag(FLAGS_out);
  if (ckpt.empty() || out.empty()) {
    std::fprintf(stderr, "export: --checkpoint and --out are required\n");
    return 2;
  }
  absl::Status s = qtrain::Export(ckpt, out);
  if (!s.ok()) {
    std::fprintf(stderr, "export: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
