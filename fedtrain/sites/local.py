"""A site on one machine (``fedtrain site run``): poll the store, judge each task, run it, answer.

The loop is the site operator's, with processes instead of Jobs: as `fedtrain.sites.pace` says (at
least every ``pollSeconds``) it reads the site's ``task.json``, asks `agent.plan` what to do, runs
an accepted task with the worker's ``site-task`` command (through the local runner's
`LocalExecutor`, started beside the first reads, which records finished tasks in the work
directory), writes the answer of a task that failed or was refused, and keeps
``site-status.json``. A result in the store means the task is done, so a site started again
never runs or uploads a task twice. It stops when the training is over, or on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from fedtrain.contract.errors import EXIT_BAD_DATA, BadDataError, BadInputError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    POSTING_LIMIT,
    Posting,
    SiteResult,
    SiteTask,
    encode,
    parse_posting,
    parse_result,
)
from fedtrain.contract.storage import S3_ENV, Store, open_store
from fedtrain.engine.status import Observation
from fedtrain.local.executor import LocalExecutor
from fedtrain.sites import agent
from fedtrain.sites.pace import Pace
from fedtrain.sites.participation import FederatedParticipation, ParticipationStatus, training_location
from fedtrain.worker.data.decoded import CACHE_ENV

STATUS_FILE = "site-status.json"
SECRET_FILE = "secure.key"  # the site's secure-aggregation master secret: made once (0600), never in the store
DATA_DONE = ".complete"
TASK_ID = re.compile(r"^[a-z0-9][-a-z0-9]{0,127}$")  # ids the engine gives: r0003-munich-a1


def load_site_status(workdir: Path) -> ParticipationStatus:
    """The site's status kept in its work directory (a fresh one when there is none)."""
    path = workdir / STATUS_FILE
    if not path.exists():
        return ParticipationStatus()
    return ParticipationStatus.model_validate_json(path.read_text())


def save_site_status(workdir: Path, status: ParticipationStatus) -> None:
    """Replace ``site-status.json`` atomically."""
    temporary = workdir / f"{STATUS_FILE}.tmp"
    temporary.write_text(status.model_dump_json(by_alias=True, indent=1))
    os.replace(temporary, workdir / STATUS_FILE)


def site_data(manifest: FederatedParticipation, workdir: Path) -> str:
    """The site's GTSRB tree on this machine: ``data.localPath``, or a synthetic set generated once."""
    data = manifest.spec.data
    if data.local_path is not None:
        return data.local_path
    if data.synthetic is None:
        raise BadInputError("spec.data.claimName is for the site operator on Kubernetes; on one machine give "
                            "spec.data.localPath (a GTSRB tree) or spec.data.synthetic")
    from fedtrain.worker.data.synth import SynthConfig, generate

    root = workdir / "data"
    wanted = data.synthetic.model_dump_json()
    if (root / DATA_DONE).exists() and (root / DATA_DONE).read_text() == wanted:
        return str(root)
    synthetic = data.synthetic
    generate(root, SynthConfig(per_class=synthetic.images_per_class, test_per_class=synthetic.test_images_per_class,
                               frames_per_track=synthetic.frames_per_track, seed=synthetic.seed))
    (root / DATA_DONE).write_text(wanted)
    return str(root)


def site_environment(manifest: FederatedParticipation, workdir: Path,
                     base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: this process's, the store's settings, and the decoded-image cache."""
    environment = {CACHE_ENV: str(workdir / "cache"), **(base if base is not None else os.environ),
                   **agent.storage_environment(manifest.spec)}
    if manifest.spec.store.s3 is not None:
        environment[S3_ENV["credentials_from"]] = ("the environment of `fedtrain site run` (AWS_ACCESS_KEY_ID, "
                                                   "AWS_SECRET_ACCESS_KEY)")
    return environment


class SiteLoop:
    """One site's loop over one training: `step` looks once; `run` loops until the training is over."""

    def __init__(self, manifest: FederatedParticipation, workdir: Path, out: IO[str],
                 environment: Mapping[str, str] | None = None, clock: Callable[[], float] = time.time,
                 threads: int | None = None) -> None:
        self.manifest, self.spec, self.workdir, self.out, self.clock = manifest, manifest.spec, workdir, out, clock
        self.threads = threads  # per task; None: every core (a site's machine is its own)
        workdir.mkdir(parents=True, exist_ok=True)
        self.environment = site_environment(manifest, workdir, environment)
        self.location = training_location(self.spec)
        self.store: Store = open_store(self.location, self.environment)
        self.layout = Layout()
        self.data_path = site_data(manifest, workdir)
        self.status = load_site_status(workdir)
        self.started: LocalExecutor | None = None
        self._starting = threading.Lock()  # `warm`'s thread and the loop both reach for the executor
        self._warming: threading.Thread | None = None
        self._released = threading.Event()  # `warm`'s thread may end: the executor is shut down
        self.running: SiteTask | None = None
        self.pace = Pace.for_store(float(self.spec.poll_seconds), self.store.reads_are_local)
        self.posting_seen: tuple[str | None, Posting | None] | None = None  # the posting's tag, and what it said
        self.answered: set[str] = set()  # tasks whose answer is in the store (asked once, or written here)

    @property
    def executor(self) -> LocalExecutor:
        """The executor, started on first use or by `warm` (its fork server imports torch and warms it up)."""
        with self._starting:
            if self.started is None:
                self.started = LocalExecutor(self.workdir / "executor", 1, threads_per_task=self.threads,
                                             environment=self.environment)
            return self.started

    def warm(self) -> None:
        """Start the executor in the background while the loop reads the store.

        Its fork server takes seconds to start (several on a busy machine); started with the first
        task, every site's first round waited for it. ``fedtrain site run`` joins one training, so
        the process it keeps ready is used soon. The thread that starts it lives until `run` shut
        it down: the fork server is told to die with the thread that started it (PR_SET_PDEATHSIG
        follows the thread, not the process).
        """
        if self._warming is None and self.started is None:
            self._warming = threading.Thread(target=self._start_and_hold, name=f"site-{self.site}-executor",
                                             daemon=True)
            self._warming.start()

    def _start_and_hold(self) -> None:
        try:
            _ = self.executor
        finally:
            self._released.wait()

    def _shutdown(self) -> None:
        """Stop the executor (one `warm` is still starting included), then let `warm`'s thread end."""
        with self._starting:  # a start under way has finished
            if self.started is not None:
                self.started.shutdown()
        self._released.set()
        if self._warming is not None:
            self._warming.join()

    @property
    def site(self) -> str:
        """The site's name in the coordinator's clients.list."""
        return self.spec.site

    def step(self) -> bool:
        """Look at the store once and act; True when the training is over."""
        posting = self._posting()
        self.pace.follow(posting is not None and posting.phase == "Running", float(self.spec.poll_seconds))
        ended = self._reap()
        task = posting.task if posting is not None else None
        answered = task is not None and self._answered(task.id)
        action = agent.plan(posting, self.site, self.spec.policy, self.clock(), answered,
                            self.running.id if self.running else None, self.spec.suspend)
        self._act(action)
        self._keep(agent.next_status(self.status, posting, action, ended, self.clock()))
        return isinstance(action, agent.Idle) and action.finished

    def run(self) -> int:
        """Poll until the training is over (exit 0) or Ctrl-C / SIGTERM (exit 0, nothing half-written)."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        self._say(f"site {self.site}: joining training {self.spec.training.name or self.spec.training.id or '-'} "
                  f"at {self.location}")
        try:
            self.warm()
            while not self.step():
                self._pause()
            self._say(f"site {self.site}: {self.status.message}")
        except KeyboardInterrupt:
            self._say(f"site {self.site}: stopped; run the same command again to go on")
        finally:
            self._shutdown()
            signal.signal(signal.SIGTERM, previous)
        return 0

    def _pause(self) -> None:
        """Wait until the running task ends (at most ``pollSeconds``), or as `Pace` says while none runs."""
        if self.running is not None:
            self.executor.wait(self.spec.poll_seconds)
        else:
            time.sleep(self.pace.next_wait())

    def _answered(self, task_id: str) -> bool:
        """Whether the task's answer is in the store: asked once per task, remembered once it is."""
        if task_id not in self.answered and (self.running is None or self.running.id != task_id) \
                and self.store.exists(self.layout.site_result(self.site, task_id)):
            self.answered.add(task_id)
        return task_id in self.answered

    def _posting(self) -> Posting | None:
        """The posted task, None when nothing is posted; a corrupt one is answered as bad data.

        Read only when it changed (one conditional request otherwise). A posting that is gone after
        the site had read one is the training's end (`agent.vanished`).
        """
        key = self.layout.site_task(self.site)
        seen = self.posting_seen
        version = self.store.read_if_changed(key, POSTING_LIMIT, seen[0] if seen else None)
        if seen is not None and not version.changed:
            return seen[1] if not version.missing else agent.vanished(None, self.status)
        self.pace.moved()
        if version.data is None:
            self.posting_seen = (None, None)
            return agent.vanished(None, self.status)
        try:
            posting = parse_posting(version.data, f"{self.site}'s task.json")
        except BadDataError as error:
            self._refuse_corrupt(version.data, str(error))
            posting = None
        self.posting_seen = (version.tag, posting)
        return posting

    def _refuse_corrupt(self, data: bytes, reason: str) -> None:
        """Answer a task that failed its checksum (once), so the coordinator sees why instead of silence."""
        try:
            task_id = json.loads(data)["task"]["id"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(task_id, str) or not TASK_ID.match(task_id):
            return
        key = self.layout.site_result(self.site, task_id)
        if not self.store.exists(key):
            result = SiteResult(task=task_id, site=self.site, state="failed", exit_code=EXIT_BAD_DATA, reason=reason)
            self.store.write_bytes(key, encode(result))
            self._say(f"site {self.site}: task {task_id} refused: {reason}")

    def _reap(self) -> tuple[SiteTask, SiteResult] | None:
        """The running task and its result once it has ended (the answer written when the worker failed)."""
        if self.running is None:
            return None
        observation = self.executor.poll().get(self.running.id)
        if observation is None or observation.state == "running":
            return None
        task, self.running = self.running, None
        result = self._answer(task, observation)
        self.answered.add(task.id)
        self.pace.moved()  # the next task comes once the coordinator has the answers it waits for
        self._say(_ended_line(self.site, task, result))
        return task, result

    def _answer(self, task: SiteTask, observation: Observation) -> SiteResult:
        key = self.layout.site_result(self.site, task.id)
        if self.store.exists(key):
            return parse_result(self.store.read_bytes(key), self.store.describe(key))
        reason = observation.reason if observation.state == "failed" else "the worker ended without an answer"
        result = agent.failure_result(task, self.site, observation.exit_code, reason,
                                      [self.data_path, str(self.workdir.resolve()), str(self.workdir)])
        self.store.write_bytes(key, encode(result))
        return result

    def _act(self, action: agent.SiteAction) -> None:
        if isinstance(action, agent.Run):
            secret = agent.SecretFile(str(self.workdir.resolve() / SECRET_FILE))
            self.executor.launch(action.task.id, agent.worker_arguments(action.task, self.spec, self.location,
                                                                        self.data_path, secret))
            self.running = action.task
            self._say(f"site {self.site}: running task {action.task.id}")
        elif isinstance(action, agent.Refuse):
            result = agent.refusal_result(action.task, self.site, action.reason)
            self.store.write_bytes(self.layout.site_result(self.site, action.task.id), encode(result))
            self.answered.add(action.task.id)
            self.pace.moved()
            self._say(f"site {self.site}: refused task {action.task.id}: {action.reason}")
        elif isinstance(action, agent.Cancel):
            self.executor.cancel(action.task_id)
            self.running = None
            self._say(f"site {self.site}: cancelled task {action.task_id}: {action.why}")

    def _keep(self, status: ParticipationStatus) -> None:
        if status != self.status:
            self.status = status
            save_site_status(self.workdir, status)

    def _say(self, line: str) -> None:
        self.out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.out.flush()


def _ended_line(site: str, task: SiteTask, result: SiteResult) -> str:
    if result.state == "failed":
        return f"site {site}: task {task.id} failed (exit {result.exit_code}): {result.reason}"
    figures = result.output.get("metrics") or result.output
    accuracy = figures.get("val_accuracy", figures.get("accuracy"))
    shown = f", accuracy {accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    return f"site {site}: task {task.id} done{shown}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
