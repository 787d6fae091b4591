"""A sweep's worker process: runs the jobs it reads from stdin, one JSON line each, and answers each on stdout.

A job is ``{"config": PATH | null, "run_dir": DIR, "resume": bool}``; the answer is ``{"outcome": "done" | "resumed" |
"done (diverged)" | "failed: ..." | "stopped ...", "warnings": [...]}``. SIGINT and SIGTERM during a run make it
checkpoint at its next iteration boundary (``train`` handles them); the worker then answers and exits with 128 + the
signal number. Between runs either signal ends the worker at once. Started by ``ormo.experiment.sweep``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

STOPPED = "stopped (checkpointed; rerun to continue)"


class _Stop(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def _answer(outcome: str, caught: list[warnings.WarningMessage]) -> None:
    texts = list(dict.fromkeys(str(w.message) for w in caught))
    sys.stdout.write(json.dumps({"outcome": outcome, "warnings": texts}) + "\n")
    sys.stdout.flush()


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        import torch

        from ..rules.base import ConfigError
        from .config import load_config
        from .run import read_run_info, train
        from .rundir import RunDirError

        threads = int(os.environ.get("ORMO_SWEEP_THREADS", "0")) or torch.get_num_threads()
        for line in sys.stdin:
            job = json.loads(line)
            run_dir = Path(job["run_dir"])
            torch.set_num_threads(threads)  # a resumed run sets its own recorded count: undo it for the next run
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if job["resume"]:
                        train(None, run_dir, resume=True, progress=False)
                        outcome = "resumed"
                    else:
                        train(load_config(job["config"]), run_dir, progress=False)
                        outcome = "done"
                    if read_run_info(run_dir).get("diverged"):
                        outcome += " (diverged)"
                except KeyboardInterrupt as e:
                    _answer(STOPPED, caught)
                    return 128 + int(getattr(e, "signum", signal.SIGINT))
                except (ConfigError, RunDirError) as e:  # their messages name the file or field and the fix
                    outcome = f"failed: {e}"
                except Exception as e:  # one broken run must not stop the sweep: report it and take the next
                    outcome = f"failed: {type(e).__name__}: {e}"
            _answer(outcome, caught)
    except KeyboardInterrupt as e:  # a signal between runs
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
