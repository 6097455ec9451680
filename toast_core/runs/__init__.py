"""Background tuning runs: a FIFO queue, worker threads, live progress, cancel, and a registry on disk.

The app submits a `RunConfig`; a worker thread builds the data, trains through `train.train` and
writes the run's record under `root/<run_id>/`, so a page only ever polls a cheap snapshot and a
restarted app finds every run again. Nothing here imports Streamlit.

Layout of one run on disk (every file written through a temp file + os.replace, nothing pickled):

    config.json         the RunConfig
    status.json         state, progress, final metrics, timings, memory, error + traceback
    history.json        one entry per optimisation step (loss, lr, train_acc, val_* at evals)
    snapshot.npy        latest CLS-attention grid of the fixed probe image (np.save, no pickle);
                        a finished run always ends with the one of its final module
    module.*            the final steering module (checkpoints.save_module) once the run is done
    checkpoint_last.*   the module every `checkpoint_every` steps and at cancel, for `resume`

FORT methods (`methods.fort.FortMixin`) get their position prompts from the run's training images in
the worker, before training (`phase` says so meanwhile), as the few-shot protocol does on a support set.

Resuming continues from `checkpoint_last` with the remaining steps. The optimiser state (AdamW
moments, SGD momentum) is not saved, so it restarts; the learning rate continues from where the
schedule was (warmup remainder, then a cosine from there down to the same final lr).

Each status.json names its owner (host, pid, process start time, manager token). Opening a
registry marks a queued / running run `interrupted` only when its owner is gone; a run that a live
manager (in this process or another, e.g. the CLI beside the app) is running is followed from disk.

Where each part lives: `config` (RunConfig, task strings), `tasks` (a run's data), `record` (states,
file names, RunStatus), `registry` (every write and read of a run folder, rescans, adoption across
processes), `owners` (owner stamps and process liveness), `execute` (one segment from data to
finished module), `listener` (train() callbacks), `devices` (worker devices, backbone copies),
`manager` (queue, workers, cancel, resume).
"""

from toast_core.runs.config import RunConfig, TaskRef, parse_task
from toast_core.runs.manager import RunManager
from toast_core.runs.record import (
    ACTIVE_STATES,
    CHECKPOINT_STEM,
    CONFIG_FILE,
    FINISHED_STATES,
    FORMAT,
    FORMAT_VERSION,
    HISTORY_FILE,
    MODULE_STEM,
    RESUMABLE_STATES,
    SNAPSHOT_FILE,
    STATES,
    STATUS_FILE,
    RunError,
    RunStatus,
)
from toast_core.runs.registry import Registry
from toast_core.runs.tasks import load_task_data

__all__ = [
    "ACTIVE_STATES",
    "CHECKPOINT_STEM",
    "CONFIG_FILE",
    "FINISHED_STATES",
    "FORMAT",
    "FORMAT_VERSION",
    "HISTORY_FILE",
    "MODULE_STEM",
    "RESUMABLE_STATES",
    "SNAPSHOT_FILE",
    "STATES",
    "STATUS_FILE",
    "Registry",
    "RunConfig",
    "RunError",
    "RunManager",
    "RunStatus",
    "TaskRef",
    "load_task_data",
    "parse_task",
]
