"""How the data package starts worker processes, makes them end with their parent, and cleans up after
processes that died."""
import multiprocessing
import os
import re
import select
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

# ".<name>.tmp<PID>" files (atomic writes) and ".<name>-tmp-<PID>" / ".<name>.partial-<PID>" folders
TEMPORARY = re.compile(r"^\..+(?:\.tmp|-tmp-|\.partial-)(\d+)$")


def worker_context():
    """The multiprocessing context of every worker pool in ``data``: a fork server (spawn where there is
    none), never forks of the calling process: a fork taken after torch or OpenCV started their thread
    pools can deadlock in the child."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def default_workers() -> int:
    """Worker processes used when none are given: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _start_pool_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    exit_with(parent)
    if initializer is not None:
        initializer(*initargs)


def map_ordered(func: Callable, items: Sequence, workers: int | None = None, desc: str = "",
                unit: str = "img", progress: bool = True, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterable:
    """``map(func, items)`` in order over ``workers`` processes (``<= 1``: in-process), with a progress bar.

    The one worker pool of the data package: workers come from :func:`worker_context`, end with this
    process (:func:`exit_with`), then run ``initializer(*initargs)`` (pool workers only). ``func`` must be
    a module-level function (it is pickled to the workers). A worker that dies raises
    ``BrokenProcessPool`` here instead of leaving the map waiting.
    """
    workers = default_workers() if workers is None else workers
    bar = dict(total=len(items), desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0,
               disable=not progress)
    if workers <= 1 or len(items) < 2:
        yield from tqdm(map(func, items), **bar)
        return
    chunksize = max(1, min(64, len(items) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_start_pool_worker,
                             initargs=(os.getpid(), initializer, initargs)) as pool:
        yield from tqdm(pool.map(func, items, chunksize=chunksize), **bar)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with(pid: int) -> None:
    """End this process as soon as process ``pid`` ends, whatever ends it (also SIGKILL).

    A worker started from a fork server is the fork server's child, so the parent-death signal would
    follow the fork server; and the fork server and the resource tracker live as long as any worker holds
    their pipes. A daemon thread waits on a pidfd of ``pid`` (polls once a second where there are none)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        handle = None

    def wait():
        if handle is not None:
            select.select([handle], [], [])
        else:
            while pid_alive(pid):
                threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def remove_dead_temporaries(folder, prefixes: str | tuple[str, ...] = "") -> list[Path]:
    """Delete the temporary files and folders in ``folder`` (those whose names start with one of
    ``prefixes``) that processes left when they died: their names carry the writer's PID (``TEMPORARY``).
    Returns them; those of living processes stay."""
    folder = Path(folder)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = TEMPORARY.match(path.name)
        if match and path.name.startswith(prefixes) and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed
