// What the launcher says about this process: mpirun (OMPI_COMM_WORLD_*), srun
// (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID) or a PMI launcher (PMI_RANK / PMI_SIZE).
#ifndef QTRAIN_DISTRIBUTED_LAUNCH_ENV_H_
#define QTRAIN_DISTRIBUTED_LAUNCH_ENV_H_

#include <functional>
#include <string>

namespace qtrain {

struct LaunchEnv {
  std::string launcher;  // "mpirun", "srun", "pmi"; "" when started by hand
  int rank = 0;
  int world_size = 1;
  int local_rank = -1;  // -1: the launcher does not say
};

// Reads the environment through `getenv` (std::getenv by default; tests pass a map). mpirun's
// variables win over Slurm's: under `mpirun` inside an allocation SLURM_PROCID numbers the
// per-node daemons, not the ranks. In an sbatch script outside any `srun` step only
// SLURM_NTASKS is set, which says nothing about this process (no step: one process).
LaunchEnv DetectLaunchEnv(const std::function<const char*(const char*)>& getenv = nullptr);

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_LAUNCH_ENV_H_
