"""Shared end of the torchrun test workers."""
import multiprocessing.util
import os
import sys


def exit_now(rc: int = 0) -> None:
    """Exits without the rest of interpreter teardown: gloo's background threads have been
    seen to abort a worker at exit ("terminate called without an active exception") after
    all its work was done and its process group destroyed.

    multiprocessing's own exit hook runs first: Megatron's dist_checkpointing starts a spawned
    Manager process for its write results, which inherits this worker's stdout/stderr; left
    running, it keeps the test's pipes open and the test waits for ever."""
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
