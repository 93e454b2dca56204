// DetectLaunchEnv.
#include "distributed/launch_env.h"

#include <cstdlib>

#include "absl/strings/numbers.h"

namespace qtrain {
namespace {

bool ReadInt(const std::function<const char*(const char*)>& getenv, const char* name, int* out) {
  const char* v = getenv(name);
  return v != nullptr && absl::SimpleAtoi(v, out);
}

}  // namespace

LaunchEnv DetectLaunchEnv(const std::function<const char*(const char*)>& getenv_in) {
  const std::function<const char*(const char*)> getenv =
      getenv_in ? getenv_in : [](const char* name) -> const char* { return std::getenv(name); };
  LaunchEnv env;
  int rank = 0, size = 0, local = -1;
  if (ReadInt(getenv, "OMPI_COMM_WORLD_RANK", &rank) &&
      ReadInt(getenv, "OMPI_COMM_WORLD_SIZE", &size)) {
    env.launcher = "mpirun";
    env.rank = rank;
    env.world_size = size;
    if (ReadInt(getenv, "OMPI_COMM_WORLD_LOCAL_RANK", &local)) env.local_rank = local;
    return env;
  }
  // SLURM_STEP_ID (or the older SLURM_STEPID) exists only inside an srun step.
  if ((getenv("SLURM_STEP_ID") != nullptr || getenv("SLURM_STEPID") != nullptr) &&
      ReadInt(getenv, "SLURM_PROCID", &rank) &&
      (ReadInt(getenv, "SLURM_STEP_NUM_TASKS", &size) || ReadInt(getenv, "SLURM_NTASKS", &size))) {
    env.launcher = "srun";
    env.rank = rank;
    env.world_size = size;
    if (ReadInt(getenv, "SLURM_LOCALID", &local)) env.local_rank = local;
    return env;
  }
  if (ReadInt(getenv, "PMI_RANK", &rank) && ReadInt(getenv, "PMI_SIZE", &size)) {
    env.launcher = "pmi";
    env.rank = rank;
    env.world_size = size;
    if (ReadInt(getenv, "MPI_LOCALRANKID", &local)) env.local_rank = local;
    return env;
  }
  return env;
}

}  // namespace qtrain
