// LoadJobForRun, CreateRunContext, MakeServiceSinks, FetchResume.
#include "trainer/service_run.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/client.h"
#include "distributed/service_context.h"
#include "ops/status_macros.h"
#include "trainer/checkpoint.h"
#include "trainer/service_sinks.h"

namespace qtrain {
namespace {

absl::StatusOr<std::shared_ptr<ps::PsClient>> ClientFor(const JobSpec& spec,
                                                       const std::string& address) {
  ASSIGN_OR_RETURN(ps::ClientOptions options, ServiceClientOptions(spec, address));
  if (options.tls_ca_file.empty()) {
    if (const char* ca = std::getenv("QTRAIN_PS_TLS_CA_FILE"); ca != nullptr) options.tls_ca_file = ca;
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ps::PsClient> c, ps::PsClient::Create(options));
  return std::shared_ptr<ps::PsClient>(std::move(c));
}

}  // namespace

std::string ServiceAddress(const JobSpec& spec) {
  return spec.parameter_service().address().empty() ? spec.distributed().coordinator()
                                                    : spec.parameter_service().address();
}

absl::StatusOr<JobSpec> LoadJobForRun(const std::string& job, const std::string& address_flag,
                                      const std::vector<std::string>& overrides) {
  if (!absl::StartsWith(job, kServiceScheme)) return LoadJobSpec(job, overrides);
  const std::string job_id = job.substr(std::string(kServiceScheme).size());
  std::string address = address_flag;
  if (address.empty()) {
    if (const char* a = std::getenv("QTRAIN_PS_ADDRESS"); a != nullptr) address = a;
  }
  if (address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--job=", job, " names a job on the parameter service: say where it is with "
        "--coordinator=host:port (or $QTRAIN_PS_ADDRESS)"));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<ps::PsClient> client, ClientFor(JobSpec(), address));
  // GetJobSpec checks the text against the SHA-256 the service recorded.
  ASSIGN_OR_RETURN(ps::GetJobSpecResponse got, client->GetJobSpec(job_id));
  return ParseJobSpec(got.spec_text(), job, overrides);
}

absl::StatusOr<std::unique_ptr<DistributedContext>> CreateRunContext(const JobSpec& spec,
                                                                     int rank, int world_size) {
  if (spec.distributed().coordinator().empty()) {
    if (rank >= 0 || world_size > 0) {
      return absl::InvalidArgumentError(
          "--rank / --world_size are for ranks that meet through the parameter service: "
          "also pass --coordinator=host:port (MPI and Slurm say them themselves)");
    }
    return DistributedContext::Create(spec.distributed());
  }
  ServiceLaunch launch;
  launch.rank = rank;
  launch.world_size = world_size;
  launch.spec_hash = JobSpecHash(spec);
  return JoinThroughService(spec, launch);
}

absl::StatusOr<std::vector<std::unique_ptr<RunSink>>> MakeServiceSinks(const JobSpec& spec,
                                                                       bool register_spec,
                                                                       bool is_root) {
  std::vector<std::unique_ptr<RunSink>> sinks;
  if (!is_root || spec.parameter_service().address().empty()) return sinks;
  ASSIGN_OR_RETURN(std::shared_ptr<ps::PsClient> client,
                   ClientFor(spec, spec.parameter_service().address()));
  const std::string job_id = ServiceJobId(spec);
  if (register_spec) {
    // The run's own spec (after command-line overrides) becomes the job's registered one.
    absl::StatusOr<ps::RegisterJobResponse> r =
        client->RegisterJob(job_id, JobSpecToText(spec), /*replace=*/true);
    if (!r.ok()) {
      return absl::Status(r.status().code(),
                          absl::StrCat("registering job ", job_id, ": ", r.status().message()));
    }
  }
  sinks.push_back(std::make_unique<ServiceMetricsSink>(client, job_id));
  sinks.push_back(
      std::make_unique<ServiceCheckpointSink>(client, job_id, spec.checkpoint().keep_last()));
  return sinks;
}

absl::StatusOr<std::string> FetchResume(const JobSpec& spec, const std::string& resume,
                                        DistributedContext* dist) {
  if (!absl::StartsWith(resume, kServiceScheme)) return resume;
  // ps://JOB/latest or ps://JOB/STEP
  const std::string rest = resume.substr(std::string(kServiceScheme).size());
  const size_t slash = rest.rfind('/');
  const std::string job_id = slash == std::string::npos ? rest : rest.substr(0, slash);
  const std::string which = slash == std::string::npos ? "latest" : rest.substr(slash + 1);
  int64_t step = -1;
  absl::Status ok;
  if (job_id.empty() || (which != "latest" && !absl::SimpleAtoi(which, &step))) {
    ok = absl::InvalidArgumentError(absl::StrCat("--resume=", resume,
                                                 ": expected ps://JOB/latest or ps://JOB/STEP"));
  }
  const std::string address = ServiceAddress(spec);
  if (ok.ok() && address.empty()) {
    ok = absl::InvalidArgumentError(absl::StrCat(
        "--resume=", resume, " needs the service's address: parameter_service.address or "
        "distributed.coordinator (or --coordinator)"));
  }
  std::string path;
  if (ok.ok() && dist->is_root()) {
    absl::StatusOr<std::shared_ptr<ps::PsClient>> client = ClientFor(spec, address);
    absl::StatusOr<ps::CheckpointInfo> info = absl::UnknownError("not downloaded");
    if (!client.ok()) info = client.status();
    if (client.ok()) {
      // Downloaded under a temporary name, checked, then renamed to the trainer's name.
      const std::string tmp = spec.out_dir() + "/checkpoints/.download.safetensors";
      info = (*client)->DownloadCheckpoint(job_id, step, tmp);
      if (info.ok()) {
        path = CheckpointPath(spec.out_dir(), static_cast<int>(info->step()));
        if (std::rename(tmp.c_str(), path.c_str()) != 0) {
          info = absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
        }
      }
    }
    ok = info.status();
    if (ok.ok()) {
      std::printf("qtrain: downloaded %s from the parameter service at %s (step %lld, %lld bytes)\n",
                  path.c_str(), address.c_str(), static_cast<long long>(info->step()),
                  static_cast<long long>(info->size()));
      std::fflush(stdout);
    }
  }
  // Agreed errors go back as they are: every rank prints the same message.
  if (absl::Status agreed = dist->AllOk(ok, absl::StrCat("fetching ", resume)); !agreed.ok()) {
    return agreed;
  }
  // Only rank 0 reads the checkpoint; the others just need to know that this is a resume.
  return dist->is_root() ? path : resume;
}

}  // namespace qtrain
