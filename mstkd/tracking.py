"""Optional experiment tracking: TensorBoard scalars and MLflow runs, for those who follow runs there.

Centralised training logs one point per epoch, a federated server one per round. Nested dicts
become slash-separated keys (``val/WT_dice``, ``site-1/train-loss``); only numbers are logged.

- **tensorboard** (``pip install '.[tensorboard]'``): event files under ``<run folder>/tensorboard/``;
  ``tensorboard --logdir <run folder>`` shows them.
- **mlflow** (``pip install '.[mlflow]'``): one MLflow run per training run, in the experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``mstkd``), with the run and project config as params, the
  same metrics per round or epoch, and at the end the best checkpoint, the final 15-subset table and
  the report as artefacts. The store is ``$MLFLOW_TRACKING_URI`` when set (a server, or a database
  shared by many runs), else a local one in the run folder: ``mlflow.db`` (SQLite) and
  ``mlflow-artifacts/``; ``mlflow ui --backend-store-uri sqlite:///<run folder>/mlflow.db`` shows it.
  With a SQLite URI the artefacts go beside the database. A resumed run continues the MLflow run of
  its folder (tag ``mstkd.run_folder``), so one MLflow run holds the whole history.

A tracker that fails while the run goes on is dropped with one line on stderr: tracking never
stops a run. Run folders get copied between machines, so what one holds is checked before use: a
local MLflow store whose run keeps its artefacts anywhere but ``<run folder>/mlflow-artifacts/`` is
refused (the tracker is dropped), an artefact that is a link or not a regular file inside the run folder
is not kept, and the user:password of a URL is cut from every warning.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from mstkd.errors import InputError
from mstkd.numbers import is_number

FOLDER = "tensorboard"
TRACKERS = ("tensorboard", "mlflow")
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlflow-artifacts"
"""The local MLflow store in a run folder (when ``MLFLOW_TRACKING_URI`` is not set)."""
EXPERIMENT = "mstkd"
"""The MLflow experiment when ``MLFLOW_EXPERIMENT_NAME`` is not set."""
FOLDER_TAG = "mstkd.run_folder"
"""The MLflow tag that names a run's folder, by which a resumed run finds the run it continues."""


def flatten(values: Mapping[str, Any], prefix: str = "", *, count_lists: bool = True) -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"<prefix>a/b": 1, "<prefix>c": 2}`` (lists by their length, or as
    they are with ``count_lists=False``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/", count_lists=count_lists))
        else:
            counted = count_lists and isinstance(value, list | tuple)
            flat[f"{prefix}{key}"] = len(value) if counted else value
    return flat


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of :func:`flatten`: ``{"val": {"WT_dice": 0.8}, "note": "x"}`` -> ``{"val/WT_dice": 0.8}``."""
    return {k: float(v) for k, v in flatten(values, prefix).items() if is_number(v)}


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s]*@")
"""The ``user:password@`` of a URL (up to its last ``@`` before the path), cut from what a warning says."""
_SECRET_QUERY = re.compile(r"([?&][^=&\s]*(?:password|passwd|secret|token|key)[^=&\s]*=)[^&\s]*", re.IGNORECASE)
"""A query value whose name says it is a secret (``?sslpassword=...``, ``&access_token=...``)."""


def redact(text: str) -> str:
    """``text`` without the credentials of any URL in it: ``http://alice:pw@host/x?token=t`` -> ``http://host/x?token=***``
    (the user:password part, and query values named like a password, secret, token or key)."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1", text))


def _warn(text: str) -> None:
    print(f"warning: {redact(text)}", file=sys.stderr)


def parse_trackers(specs: str | Iterable[str]) -> tuple[str, ...]:
    """``"tensorboard,mlflow"``, or several such strings -> the trackers, each once, in the order given.

    Raises:
        InputError: a name that is not one of :data:`TRACKERS`.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    names = [name for spec in specs for name in str(spec).replace(",", " ").split()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"tracker {', '.join(unknown)}: choose from {', '.join(TRACKERS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


class Tracker:
    """Logs to every tracker asked for (none: does nothing).

    Tracking never stops a run: a tracker that fails once (a server that does not answer, a locked database)
    says so in one line on stderr and is left out from then on; the run and its own files go on.
    """

    def __init__(self, run_dir: str | Path, trackers: str | Iterable[str] = ()) -> None:
        """Raises :class:`InputError` at once (before any work) for an unknown tracker or one whose package is
        missing."""
        backends = {"tensorboard": _TensorBoard, "mlflow": _MLflow}
        self.run_dir = Path(run_dir)
        self.backends = [backends[name](self.run_dir) for name in parse_trackers(trackers)]

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def start(self, name: str, params: Mapping[str, Any], *, resumed: bool = False) -> None:
        """Begin the run ``name`` with its settings (nested; MLflow keeps them as params); ``resumed``: continue the
        run this folder tracked last, where the tracker can (MLflow), so that one run holds the whole history."""
        self._each("start", name, params, resumed)

    def log(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        self._each("log", step, scalars(values, prefix))

    def finish(self, artifacts: Iterable[Path] = (), *, failed: bool = False) -> None:
        """End the run: keep ``artifacts`` (the regular files that exist in the run folder, links not followed;
        MLflow only) and mark it finished or failed. A run already ended is left as it is."""
        kept = [Path(p) for p in artifacts if self.backends and self._keeps(Path(p))]
        self._each("finish", kept, failed)

    def _keeps(self, path: Path) -> bool:
        """Whether ``path`` may leave as an artefact: a regular file (by ``lstat``: a link to a secret is not
        followed) whose real place is in the run folder (no linked folder on the way); missing: silently not."""
        try:
            mode = path.lstat().st_mode
        except OSError:  # missing, or under something that is not a folder
            return False
        if stat.S_ISREG(mode) and path.resolve().is_relative_to(self.run_dir.resolve()):
            return True
        _warn(f"{path} not kept as a tracking artefact: a link, not a regular file, or outside the run folder")
        return False

    @contextlib.contextmanager
    def failed_on_error(self) -> Iterator[None]:
        """Marks the run failed when the block raises (and lets the error through); a run the block finished
        stays finished."""
        try:
            yield
        except BaseException:
            self.finish(failed=True)
            raise

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # any error of a tracking library or its server
                self.backends.remove(backend)
                name = type(backend).__name__.strip("_")
                _warn(f"{name} tracking stopped ({type(exc).__name__}: {exc}); the run goes on")


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise InputError(
                "TensorBoard logging needs the tensorboard package: pip install '.[tensorboard]' in the repository"
            ) from None
        self.folder = run_dir / FOLDER
        self.writer = None

    def start(self, name: str, params: Mapping[str, Any], resumed: bool) -> None:
        pass  # TensorBoard's run is its folder

    def log(self, step: int, points: dict[str, float]) -> None:
        if self.writer is None:  # the folder appears with the first point, not before
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        for tag, value in points.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_MLFLOW_KEY = re.compile(r"[^/\w.\- :]")
"""Characters MLflow refuses in a param or metric key (replaced by ``_``: a subset's ``+``, for instance)."""
_MLFLOW_BATCH = 100  # params per call (MLflow's limit); metrics go 1000 at a time
_MLFLOW_PARAM_LENGTH = 6000


class _MLflow:
    def __init__(self, run_dir: Path) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise InputError("MLflow tracking needs mlflow: pip install '.[mlflow]' in the repository") from None
        self.run_dir = run_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        self.uri = uri or f"sqlite:///{self.run_dir / MLFLOW_DB}"
        # a store in the run folder may have come with a copied folder: its artefacts must stay in that folder
        self.confined_to = None if uri else self.run_dir / MLFLOW_ARTIFACTS
        # artefacts beside a local database (a server keeps its own); MLflow's default is ./mlruns wherever it runs
        database = self.uri.removeprefix("sqlite:///") if self.uri.startswith("sqlite:///") else ""
        self.artifact_location = (Path(database).parent / MLFLOW_ARTIFACTS).as_uri() if database else None
        self.client: Any = None
        self.run_id = ""

    def start(self, name: str, params: Mapping[str, Any], resumed: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(experiment, artifact_location=self.artifact_location)
        )
        earlier = self._last_run(experiment_id) if resumed else None  # this folder's last run goes on
        if earlier is not None:
            self._check_artifacts(earlier.info.artifact_uri)
            self.run_id = earlier.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {FOLDER_TAG: self.run_dir.as_posix()}
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self._check_artifacts(run.info.artifact_uri)  # a planted experiment's location is the run's
        self.run_id = run.info.run_id
        flat = [
            Param(_MLFLOW_KEY.sub("_", k), str(v)[:_MLFLOW_PARAM_LENGTH])
            for k, v in flatten(params, count_lists=False).items()
        ]
        for i in range(0, len(flat), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=flat[i : i + _MLFLOW_BATCH])

    def _last_run(self, experiment_id: str) -> Any:
        """The latest run tagged with this run folder, or None. The filter cannot quote every path (MLflow has
        no escape for a quote), so it asks for a LIKE pattern with ``_`` for each unusual character, and the
        tag is matched exactly here."""
        folder = self.run_dir.as_posix()
        pattern = re.sub(r"[^\w./ -]", "_", folder)
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{FOLDER_TAG}` LIKE '{pattern}'",
                order_by=["attributes.start_time DESC"],
                max_results=_MLFLOW_BATCH,
                page_token=token,
            )
            found = next((run for run in page if run.data.tags.get(FOLDER_TAG) == folder), None)
            if found is not None or not page.token:
                return found
            token = page.token

    def _check_artifacts(self, uri: str) -> None:
        """Refuses (the tracker is dropped) a run of the local store whose artefacts would go anywhere but the
        store's own folder in the run folder: another place, a linked folder, another scheme."""
        if self.confined_to is None:
            return  # a store given by MLFLOW_TRACKING_URI keeps its artefacts where its owner set
        parts = urlsplit(uri or "")
        path = Path(url2pathname(parts.path))
        if not (
            parts.scheme == "file"
            and parts.netloc in ("", "localhost")
            and path.is_absolute()
            and path.resolve().is_relative_to(self.confined_to)
        ):
            raise InputError(
                f"{MLFLOW_DB} keeps this run's artefacts outside {self.confined_to} (a run folder moved or copied "
                f"here?): refused; move {MLFLOW_DB} aside to start a new store"
            )

    def log(self, step: int, points: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if not self.run_id:
            self.start("run", {}, False)
        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in points.items() if not math.isnan(v)]
        for i in range(0, len(metrics), 10 * _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 10 * _MLFLOW_BATCH])

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        if not self.run_id:
            return
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        self.run_id = ""
