"""How the data package starts worker processes."""
import multiprocessing


def worker_context():
    """The multiprocessing context of every worker pool in ``data``: a fork server (spawn where there is
    none), never forks of the calling process: a fork taken after torch or OpenCV started their thread
    pools can deadlock in the child."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)
