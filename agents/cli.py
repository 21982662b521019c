"""What every command-line script (``python -m agents.<name>``) shares: one-line errors and exit codes.

Argparse's convention, kept to one line: a bad flag or value prints
``PROG: error: --flag: expected …, got …`` on stderr and exits 2 (no
traceback, no usage block: ``--help`` has it). A config check that names a
field (``batch_size: expected an int >= 1, got 0``) is reported under its
flag (``--batch-size: …``). A bad checkpoint (:class:`CheckpointError`) is
reported the same way, naming the file, and exits 2, as does a run directory
that another run is using. A run that fails after set-up saves what it can,
then prints one line naming what failed and exits 1 (:data:`EXIT_FAILED`).
Ctrl-C or SIGTERM exits 130 (:data:`EXIT_INTERRUPTED`); a training run first
writes its final checkpoint. A script's ``main`` is ``run_script(PROG, body, tf_threads=True)``.

Importing this module does nothing process-wide: it does not import TensorFlow. What a script sets
for its whole process, it asks for where it starts:

- ``with script_imports(PROG, __name__):`` around a script's imports imports TensorFlow first with
  its C++ start-up messages hidden (TensorFlow 2.21's absl logs ignore ``TF_CPP_MIN_LOG_LEVEL``), so
  that an error really is one line (``TF_CPP_MIN_LOG_LEVEL=0`` or ``1`` shows them), and makes
  Ctrl-C meanwhile one line; imported as a module, it does neither.
- ``run_script(..., tf_threads=True)`` sets TensorFlow's thread pools (:func:`configure_threads`: one
  thread per op, one op per visible core) before the body runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from agents.interrupts import EXIT_INTERRUPTED, quiet_interrupt, sigterm_as_interrupt

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "ArgumentParser",
    "configure_threads",
    "consume_onednn_dtype_notice",
    "import_tensorflow_quietly",
    "one_line",
    "parse_overrides",
    "run_script",
    "script_imports",
]

EXIT_USAGE = 2
"""Exit status of a bad flag, value or checkpoint (argparse's)."""
EXIT_FAILED = 1
"""Exit status of a run that failed after set-up (it saved what it could first) or of a failing env."""

T = TypeVar("T")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and find its devices with the stderr file descriptor pointed at /dev/null, unless it
    is imported already or ``TF_CPP_MIN_LOG_LEVEL`` (default 2 here, as the scripts set it) is below 2.

    Python's own errors are unaffected: an exception raised meanwhile is printed after stderr is back.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("2", "3"):
        return
    with _stderr_muted():
        import tensorflow as tf

        tf.config.list_physical_devices()


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """The stderr file descriptor (C++ logs included) pointed at /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def script_imports(prog: str, module: str) -> Iterator[None]:
    """A script's own imports: ``with script_imports(PROG, __name__):`` around them.

    In the script's processes (``module``, the caller's ``__name__``, is ``'__main__'``, or
    ``'__mp_main__'`` where a spawned worker process re-imports the script), TensorFlow is imported
    first, with its C++ start-up logs hidden (:func:`import_tensorflow_quietly`), and a Ctrl-C
    meanwhile (TensorFlow takes seconds) prints ``PROG: interrupted`` and exits 130. Imported as a
    module, the block runs as it is: nothing is imported ahead and a KeyboardInterrupt goes through.
    """
    script = module in ("__main__", "__mp_main__")
    with quiet_interrupt(prog, enabled=script):
        if script:
            import_tensorflow_quietly()
        yield


def configure_threads(intra: int = 1, inter: int | None = None) -> bool:
    """TensorFlow's thread pools for this process, if it has not run anything yet (else False).

    Process-wide, so only a script's entry point asks for it (``run_script(..., tf_threads=True)``).
    One thread per op and one op per core at once (``inter`` defaults to the cores this process
    may run on, :func:`burnin.host.visible_cores`): the learner's ops are small matmuls that split
    poorly across threads, while its online and target passes run side by side; measured 1.13× the
    updates/s of TensorFlow's default (a thread pool of every core per op) at the demo's scale, and
    no slower at the paper's (``benchmarks/README.md``).
    """
    import tensorflow as tf

    from burnin.host import visible_cores

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter or visible_cores())
    except RuntimeError:  # the context is running already: its pools stay as they are
        return False
    return True


def one_line(message: object) -> str:
    """``message`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, and which reports config errors under their flag.

    A float option takes a value that starts with '-' as its value (``--solve-return -inf``, ``--x -1e3``):
    argparse alone reads those as an unknown option, since only plain negative numbers look like values to it.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        floats = {s for a in self._actions if a.type is float and a.nargs is None for s in a.option_strings}
        joined: list[str] = []
        for token in argv:
            if joined and joined[-1] in floats and token.startswith("-") and _is_float(token):
                joined[-1] = f"{joined[-1]}={token}"
            else:
                joined.append(token)
        return super().parse_known_args(joined, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")

    def flag(self, dest: str) -> str | None:
        """The option string of the argument stored in ``dest`` (``batch_size`` -> ``--batch-size``), or None."""
        for action in self._actions:
            if action.dest == dest and action.option_strings:
                return action.option_strings[-1]
        return None

    def require_at_least(self, args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
        """:meth:`error` for the first int argument (by destination) below its minimum, in ``minimums``'
        order; a list argument is judged by its smallest entry, an unset (None) one is skipped."""
        for dest, minimum in minimums.items():
            value = getattr(args, dest)
            value = min(value) if isinstance(value, list) else value
            if value is not None and value < minimum:
                self.error(f"{self.flag(dest) or dest}: expected an int >= {minimum}, got {value}")

    def fail(self, err: BaseException, *, aliases: Mapping[str, str] | None = None) -> NoReturn:
        """:meth:`error` for a ``ValueError``/``TypeError`` of a check: a leading ``field:`` that is an
        argument's destination (or, through ``aliases``, another name for one) becomes its flag."""
        text = one_line(err)
        name, sep, rest = text.partition(": ")
        dest = (aliases or {}).get(name, name)
        flag = self.flag(dest) if sep else None
        self.error(f"{flag}: {rest}" if flag else text)

    def build(
        self,
        factory: Callable[..., T],
        /,
        *args: Any,
        aliases: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> T:
        """``factory(*args, **kwargs)``; a ``ValueError`` or ``TypeError`` it raises goes to :meth:`fail`."""
        try:
            return factory(*args, **kwargs)
        except (TypeError, ValueError) as err:
            self.fail(err, aliases=aliases)

    def checkpoint(self, dest: str, path: str | os.PathLike[str]) -> Path:
        """The checkpoint directory the argument ``dest`` names (or the previous one a crashed save left it
        falling back to); :meth:`error` if there is no readable checkpoint there."""
        from agents.r2d2.checkpoint import CheckpointError, read_meta

        try:
            found, _ = read_meta(path)
        except CheckpointError as err:
            self.error(
                f"{self.flag(dest) or dest}: expected a checkpoint directory, got {str(path)!r}: {err}"
            )
        return found


def parse_overrides(parser: ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` items (``--set``) as a dict of JSON values; FIELD must be an R2D2Config or RunOptions
    field, else :meth:`ArgumentParser.error` (one line). Here, not in a script, since the train-side scripts
    (``agents.tune``) and the studies all take ``--set``."""
    from agents.experiment import RunOptions
    from agents.r2d2 import R2D2Config

    known = {f.name for f in dataclasses.fields(R2D2Config)} | {
        f.name for f in dataclasses.fields(RunOptions)
    }
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(f"--set: expected FIELD=VALUE with FIELD an R2D2Config or run option, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set: expected a JSON value for {key}, got {value!r}")
        if isinstance(extra[key], list):  # JSON has no tuples; the config's sequences are tuples
            extra[key] = tuple(extra[key])
    return extra


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def consume_onednn_dtype_notice() -> None:
    """Trace one bool transpose with stderr muted, unless ``TF_CPP_MIN_LOG_LEVEL`` asks for TensorFlow's logs.

    TensorFlow's oneDNN graph pass logs "oneDNN supports DT_BOOL only on platforms with AVX-512" at ERROR
    level, once per process, the first time a graph transposes bools (the learner's step masks), even on
    AVX-512 hosts such as the Zen 4 this was seen on; the op runs on Eigen either way. Spent here, it does not
    land in the middle of a script's progress bar as if something had failed.
    """
    if "tensorflow" not in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") not in ("2", "3"):
        return
    import tensorflow as tf

    with _stderr_muted():
        tf.function(tf.transpose)(tf.zeros((1, 2), tf.bool))


def run_script(prog: str, body: Callable[[], int], *, tf_threads: bool = False) -> int:
    """Run a script's ``body`` with SIGTERM as Ctrl-C; returns its exit status.

    A :class:`CheckpointError` (a bad checkpoint, or one of another env or
    seed) or a :class:`agents.rundir.RunDirError` (a run directory in use)
    prints one line and gives :data:`EXIT_USAGE`; a run that failed after
    saving what it could (:class:`agents.experiment.RunFailed`) or an env that
    failed outside a run (:class:`agents.r2d2.EnvError`, e.g. in ``--eval``)
    prints one line and gives :data:`EXIT_FAILED`; Ctrl-C or SIGTERM that
    ``body`` does not handle gives :data:`EXIT_INTERRUPTED`. With
    ``tf_threads``, TensorFlow's process-wide thread pools are set first
    (:func:`configure_threads`; every script of this repository asks for them);
    then TensorFlow's one-time oneDNN notice is spent quietly
    (:func:`consume_onednn_dtype_notice`).
    """
    with sigterm_as_interrupt():
        try:
            # After TensorFlow's quiet import (here too, for a script without script_imports, e.g. a
            # benchmark whose own imports are TensorFlow-free); inside the try, so that Ctrl-C here is
            # one line too.
            import_tensorflow_quietly()
            from agents.experiment import RunFailed
            from agents.r2d2.actor import EnvError
            from agents.r2d2.checkpoint import CheckpointError
            from agents.rundir import RunDirError

            if tf_threads:
                configure_threads()
            consume_onednn_dtype_notice()
            try:
                return body()
            except (CheckpointError, RunDirError) as err:
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
                return EXIT_USAGE
            except (RunFailed, EnvError) as err:
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
                return EXIT_FAILED
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
