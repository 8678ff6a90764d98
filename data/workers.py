"""How the data package starts worker processes."""
import multiprocessing

# Workers start from a fork server (spawn where there is none), never as forks of the calling process:
# a fork taken after torch or OpenCV started their thread pools can deadlock in the child.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def worker_context():
    """The multiprocessing context for the data package's worker pools."""
    return multiprocessing.get_context(WORKER_START)
