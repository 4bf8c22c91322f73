"""Both stores through one interface, against a directory and a real S3 server (moto, over HTTP, IAM enforced)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from fedtrain.contract.errors import (
    EXIT_BAD_INPUT,
    EXIT_TEMPORARY,
    BadDataError,
    BadInputError,
    TemporaryStorageError,
    TooLargeError,
)
from fedtrain.contract.layout import Layout
from fedtrain.contract.storage import PART_SIZE, DirectoryStore, S3Settings, S3Store, Store, iterate_keys, open_store
from fedtrain.worker.cli import main as worker_main
from fedtrain.worker.strategies import UpdateFile, UpdateSet
from fedtrain.worker.weights import read_weights, save_weights
from tests.conftest import S3Server, free_port


def s3_store(server: S3Server, prefix: str | None = None) -> S3Store:
    """A store under a fresh prefix, so that tests never see each other's keys."""
    location = f"s3://{server.bucket}/{prefix or uuid.uuid4().hex}"
    store = open_store(location, server.environment())
    assert isinstance(store, S3Store)
    return store


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "directory":
        return open_store(str(tmp_path / "training"))
    return s3_store(request.getfixturevalue("s3_server"))


def test_files_round_trip_list_and_remove(store: Store, tmp_path: Path) -> None:
    assert not store.exists("manifest.json")
    with pytest.raises(BadDataError, match=r"manifest\.json: missing"):
        store.read_bytes("manifest.json")
    store.write_bytes("manifest.json", b"{}")
    store.write_bytes("round-0001/clients/a.json", b"1")
    store.write_bytes("round-0001/clients/a.safetensors", b"2")
    store.write_bytes("round-0001/global.safetensors", b"3")
    assert store.exists("manifest.json") and store.read_bytes("manifest.json") == b"{}"
    assert store.list("round-0001/clients/") == ["round-0001/clients/a.json", "round-0001/clients/a.safetensors"]
    assert store.list("round-0002") == []
    assert list(iterate_keys(store, "round-0001", ".safetensors")) == ["round-0001/global.safetensors"]
    with pytest.raises(BadInputError, match="relative path inside the training"):
        store.write_bytes("../other-training/manifest.json", b"x")
    assert store.remove_all() == 4
    assert store.list("") == []


def test_a_bounded_read_refuses_a_file_over_its_limit_without_reading_it(store: Store, tmp_path: Path) -> None:
    store.write_bytes("sites/munich/results/a.json", b"")
    assert store.read_bounded("sites/munich/results/a.json", 10) == b""
    store.write_bytes("sites/munich/results/a.json", b"x" * 10)
    assert store.read_bounded("sites/munich/results/a.json", 10) == b"x" * 10
    big = tmp_path / "big.bin"
    with big.open("wb") as stream:
        stream.truncate(3 * PART_SIZE)  # a multipart object on S3
    store.upload("sites/munich/results/b.json", big)
    tracemalloc.start()
    with pytest.raises(TooLargeError, match=rf"b\.json: {3 * PART_SIZE} bytes, over the 65536 bytes allowed"):
        store.read_bounded("sites/munich/results/b.json", 65536)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < PART_SIZE  # not read whole, not even a part of it
    with pytest.raises(BadDataError, match=r"c\.json: missing"):
        store.read_bounded("sites/munich/results/c.json", 10)


def test_a_conditional_read_returns_the_file_only_when_it_changed(store: Store) -> None:
    missing = store.read_if_changed("sites/munich/task.json", 1024, None)
    assert (missing.data, missing.missing, missing.changed) == (None, True, False)
    store.write_bytes("sites/munich/task.json", b'{"phase": "Running"}')
    first = store.read_if_changed("sites/munich/task.json", 1024, None)
    assert first.data == b'{"phase": "Running"}' and first.changed and first.tag
    again = store.read_if_changed("sites/munich/task.json", 1024, first.tag)
    assert (again.data, again.changed, again.tag) == (None, False, first.tag)
    store.write_bytes("sites/munich/task.json", b'{"phase": "Failed"}')
    changed = store.read_if_changed("sites/munich/task.json", 1024, first.tag)
    assert changed.data == b'{"phase": "Failed"}' and changed.changed and changed.tag != first.tag
    with pytest.raises(TooLargeError):
        store.read_if_changed("sites/munich/task.json", 8, None)


def test_a_conditional_read_of_a_file_that_went_away_says_so(store: Store) -> None:
    store.write_bytes("sites/munich/task.json", b"{}")
    seen = store.read_if_changed("sites/munich/task.json", 1024, None)
    assert store.remove_all() == 1
    gone = store.read_if_changed("sites/munich/task.json", 1024, seen.tag)
    assert gone.missing and gone.changed and gone.data is None


def test_a_directory_store_reads_only_regular_files_inside_it(tmp_path: Path) -> None:
    """A party sharing the directory may plant links and named pipes in its folder: each is refused, none followed.

    The pipe's open would block a reader for ever; each read runs in a thread, so a blocked one fails the test.
    """
    outside = tmp_path / "coordinator-secret.key"
    outside.write_bytes(b"k" * 32)
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "store"
    store = DirectoryStore(root)
    store.write_bytes("sites/evil/results/honest.json", b"{}")
    folder = root / "sites" / "evil"
    (folder / "results" / "linked.json").symlink_to(outside)
    os.mkfifo(folder / "results" / "pipe.json")
    (folder / "round-0001").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "update-a1.json").write_bytes(b"{}")

    def outcome(read: Callable[[], object]) -> str:
        found: list[str] = []

        def attempt() -> None:
            try:
                read()
                found.append("read")
            except BadDataError as error:
                found.append(str(error))
        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert found, "the read blocked"
        return found[0]

    assert outcome(lambda: store.read_bounded("sites/evil/results/honest.json", 10)) == "read"
    assert outcome(lambda: store.read_bounded("sites/evil/results/linked.json", 100)).endswith(
        "a link, not a file; refused")
    assert outcome(lambda: store.read_bytes("sites/evil/results/pipe.json")).endswith("not a regular file; refused")
    assert outcome(lambda: store.read_if_changed("sites/evil/results/pipe.json", 100, None)).endswith(
        "not a regular file; refused")
    assert outcome(lambda: store.read_bytes("sites/evil/round-0001/update-a1.json")).endswith(
        "leads out of the store (a link); refused")
    assert outcome(lambda: store.download("sites/evil/results/linked.json", tmp_path / "copy")).endswith("refused")
    assert outcome(lambda: store.write_bytes("sites/evil/round-0001/task.json", b"{}")).endswith("refused")
    assert not (tmp_path / "elsewhere" / "task.json").exists() and outside.read_bytes() == b"k" * 32
    assert outcome(lambda: store.read_bounded("sites/evil/results", 100)).endswith("missing")  # a folder


def test_large_files_stream_in_parts_and_come_back_whole(store: Store, tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(2 * PART_SIZE + 12345)  # three parts on S3
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store.upload("final/big.bin", source)
    target = tmp_path / "back" / "big.bin"
    store.download("final/big.bin", target)
    assert target.read_bytes() == data
    assert store.read_bytes("final/big.bin") == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["big.bin"]  # no temporary left behind


def test_weights_with_checksums_on_s3(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    weights = {"w": np.arange(4, dtype=np.float32), "n": np.array(3)}
    digest = save_weights(store, "round-0000/global.safetensors", weights, {"num_examples": 0})
    loaded, meta = read_weights(store, "round-0000/global.safetensors")
    assert meta["sha256"] == digest and np.array_equal(loaded["w"], weights["w"]) and loaded["n"].shape == ()
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{store.prefix}/round-0000/global.safetensors",
                                  Body=b"not the file the sidecar describes")
    with pytest.raises(BadDataError, match=r"s3://fedtrain-test/.*/global.safetensors: sha256 .* does not match"):
        read_weights(store, "round-0000/global.safetensors")


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedtrain.contract.storage import open_store

    store = open_store(sys.argv[1])
    parts = []

    def hold_third_part(**_):  # the first two parts are on the server; the writer dies during the third
        parts.append(1)
        if len(parts) == 3:
            print("two parts sent", flush=True)
            time.sleep(600)

    if hasattr(store, "client"):
        store.transfer.max_concurrency = 1
        store.client.meta.events.register("before-send.s3.UploadPart", hold_third_part)
        store.upload(sys.argv[2], Path(sys.argv[3]))
    else:
        import fedtrain.contract.storage as storage
        original = storage.shutil.copyfileobj
        def slow_copy(reader, writer, size):
            writer.write(reader.read(2 * size))
            writer.flush()
            hold_third_part(); hold_third_part(); hold_third_part()
        storage.shutil.copyfileobj = slow_copy
        store.upload(sys.argv[2], Path(sys.argv[3]))
""")


def test_a_writer_killed_mid_upload_leaves_the_old_file(store: Store, tmp_path: Path) -> None:
    key = "round-0001/global.safetensors"
    store.write_bytes(key, b"the complete old file")
    big = tmp_path / "new.bin"
    big.write_bytes(b"n" * (3 * PART_SIZE + 1))
    environment = {**os.environ, **(s3_environment(store) if isinstance(store, S3Store) else {})}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store.location, key, str(big)], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        line = writer.stdout.readline()
        assert line.strip() == "two parts sent", writer.stderr.read() if writer.stderr else ""
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert store.read_bytes(key) == b"the complete old file"
    assert store.list("round-0001") == [key]  # no half file under any name a reader would take
    if isinstance(store, S3Store):  # the parts sit in an unfinished upload, invisible, until a lifecycle rule
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert [u["Key"] for u in uploads.get("Uploads", [])] == [f"{store.prefix}/{key}"]


def s3_environment(store: S3Store) -> dict[str, str]:
    settings = store.settings
    assert settings.endpoint and settings.access_key_id and settings.secret_access_key
    return {"FEDTRAIN_S3_ENDPOINT": settings.endpoint, "AWS_ACCESS_KEY_ID": settings.access_key_id,
            "AWS_SECRET_ACCESS_KEY": settings.secret_access_key}


def test_a_crash_between_weights_and_sidecar_is_caught_on_read(store: Store) -> None:
    key = "round-0001/clients/c.safetensors"
    save_weights(store, key, {"w": np.zeros(3, np.float32)}, {"num_examples": 1})
    new = {"w": np.ones(3, np.float32)}
    from safetensors.numpy import save

    store.write_bytes(key, save(new))  # the writer died here: the sidecar still describes the old weights
    with pytest.raises(BadDataError, match="does not match its sidecar"):
        read_weights(store, key)


def test_wrong_credentials_name_the_secret(s3_server: S3Server) -> None:
    environment = {**s3_server.environment("Secret team-a/fedtrain-s3 (keys AWS_ACCESS_KEY_ID, "
                                           "AWS_SECRET_ACCESS_KEY)"), "AWS_SECRET_ACCESS_KEY": "wrong"}
    store = open_store(f"s3://{s3_server.bucket}/x", environment)
    with pytest.raises(BadInputError) as caught:
        store.write_bytes("manifest.json", b"{}")
    message = str(caught.value)
    assert "Secret team-a/fedtrain-s3" in message and "refused the credentials (SignatureDoesNotMatch)" in message
    unknown = {**environment, "AWS_ACCESS_KEY_ID": "AKIANOBODY"}
    with pytest.raises(BadInputError, match=r"InvalidAccessKeyId.*Secret team-a/fedtrain-s3"):
        open_store(f"s3://{s3_server.bucket}/x", unknown).read_bytes("manifest.json")
    with pytest.raises(BadInputError, match=r"refused the credentials \(403\).*Secret team-a/fedtrain-s3"):
        open_store(f"s3://{s3_server.bucket}/x", unknown).exists("manifest.json")  # HEAD answers carry no code
    with pytest.raises(BadInputError, match=r"bucket 'elsewhere' .*(does not exist|refused)|refused the credentials"):
        open_store("s3://elsewhere/x", s3_server.environment()).write_bytes("manifest.json", b"{}")


def test_the_worker_cli_exits_bad_input_naming_the_secret(s3_server: S3Server, synth_tree: Path) -> None:
    environment = {**os.environ, **s3_server.environment("Secret team-a/fedtrain-s3"),
                   "AWS_SECRET_ACCESS_KEY": "wrong"}
    done = subprocess.run([sys.executable, "-m", "fedtrain.worker.cli", "init", "--workdir",
                           f"s3://{s3_server.bucket}/cli", "--data", str(synth_tree), "--clients", "2",
                           "--architecture", "tiny_cnn", "--image-size", "32"],
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "Secret team-a/fedtrain-s3" in done.stderr and "Traceback" not in done.stderr


def test_settings_are_checked_and_named() -> None:
    with pytest.raises(BadInputError, match="FEDTRAIN_S3_ADDRESSING_STYLE='sideways'"):
        S3Settings.from_environment({"FEDTRAIN_S3_ADDRESSING_STYLE": "sideways"})
    with pytest.raises(BadInputError, match=r"FEDTRAIN_S3_CA_BUNDLE=/nowhere/ca\.crt: no such file"):
        S3Settings.from_environment({"FEDTRAIN_S3_CA_BUNDLE": "/nowhere/ca.crt"})
    with pytest.raises(BadInputError, match="FEDTRAIN_S3_MAX_ATTEMPTS='0': use a whole number of attempts"):
        S3Settings.from_environment({"FEDTRAIN_S3_MAX_ATTEMPTS": "0"})
    with pytest.raises(BadInputError, match="scheme gs:// is not supported"):
        open_store("gs://bucket/x")
    assert isinstance(open_store("/tmp/somewhere"), DirectoryStore)


def test_a_whole_cli_federation_on_s3(s3_server: S3Server, synth_tree: Path) -> None:
    """init, train and aggregate with nothing but the bucket in common."""
    location = f"s3://{s3_server.bucket}/federations/{uuid.uuid4().hex[:8]}"
    environment = {**os.environ, **s3_server.environment()}

    def worker(*args: object) -> dict:
        done = subprocess.run([sys.executable, "-m", "fedtrain.worker.cli", *map(str, args)], env=environment,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    worker("init", "--workdir", location, "--data", synth_tree, "--clients", 2, "--architecture", "tiny_cnn",
           "--image-size", 32)
    for client in ("client-00", "client-01"):
        worker("train", "--workdir", location, "--round", 1, "--client", client, "--device", "cpu")
    result = worker("aggregate", "--workdir", location, "--round", 1, "--device", "cpu")
    assert result["accepted"] == ["client-00", "client-01"] and 0 <= result["accuracy"] <= 1
    store = open_store(location, s3_server.environment())
    assert store.list("round-0001") == [
        "round-0001/clients/client-00-a1.json", "round-0001/clients/client-00-a1.safetensors",
        "round-0001/clients/client-01-a1.json", "round-0001/clients/client-01-a1.safetensors",
        "round-0001/global.json", "round-0001/global.safetensors", "round-0001/result.json"]
    removed = worker("remove", "--workdir", location)
    assert removed["removed"] is True and store.list("") == []


# --- temporary failures ---------------------------------------------------------------------------

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyS3(ThreadingHTTPServer):
    """An S3 endpoint on loopback that answers 503 SlowDown to requests for keys matching ``failing``.

    Other requests go through to ``upstream`` (moto) unchanged, Host header included, so their
    signatures still verify; without an upstream, every request fails. It counts what it refused.
    """

    def __init__(self, failing: str = "", upstream: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.failing, self.upstream, self.refused = failing, upstream, 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyS3

    def log_message(self, *args: object) -> None:
        """Quiet."""

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.upstream is None or (self.server.failing and self.server.failing in self.path):
            self.server.refused += 1
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return
        upstream = urlparse(self.server.upstream)
        connection = http.client.HTTPConnection(upstream.hostname or "", upstream.port, timeout=30)
        connection.request(self.command, self.path, body, headers=dict(self.headers))
        reply = connection.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = answer


@pytest.fixture
def flaky_s3() -> Iterator[FlakyS3]:
    server = FlakyS3()
    yield server
    server.close()


def environment_at(endpoint: str, attempts: int = 2) -> dict[str, str]:
    """Settings for an endpoint, with few attempts so that botocore's back-off stays short."""
    return {"FEDTRAIN_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
            "FEDTRAIN_S3_MAX_ATTEMPTS": str(attempts)}


def test_an_unreachable_endpoint_is_a_temporary_error_after_the_retries(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_store("s3://bucket/training", environment_at(endpoint))
    source = tmp_path / "file.bin"
    source.write_bytes(b"x")
    for action in (lambda: store.read_bytes("manifest.json"), lambda: store.exists("manifest.json"),
                   lambda: store.write_bytes("manifest.json", b"{}"), lambda: store.upload("big.bin", source),
                   lambda: store.list("round-0001"),
                   lambda: store.listed_absent("sites/munich/task.json")):  # a site's check after a 403
        with pytest.raises(TemporaryStorageError, match=rf"cannot reach {endpoint} after 2 attempt\(s\)"):
            action()


def test_slow_down_and_5xx_answers_are_temporary_not_bad_data(flaky_s3: FlakyS3, tmp_path: Path) -> None:
    store = open_store("s3://bucket/training", environment_at(flaky_s3.endpoint, attempts=2))
    with pytest.raises(TemporaryStorageError, match=r"answered SlowDown \(HTTP 503\) after 2 attempt"):
        store.read_bytes("round-0001/clients/c.safetensors")
    assert flaky_s3.refused == 2  # botocore retried once by itself before giving up
    with pytest.raises(TemporaryStorageError, match="answered 503 after 2"):  # HEAD: a status, no body
        store.exists("manifest.json")
    with pytest.raises(TemporaryStorageError, match="SlowDown"):
        store.write_bytes("manifest.json", b"{}")
    with pytest.raises(TemporaryStorageError, match="answered 503"):  # a download starts with a HEAD
        store.download("final/model.safetensors", tmp_path / "model.safetensors")
    assert flaky_s3.refused == 2 + 2 + 2 + 2
    assert not issubclass(TemporaryStorageError, BadDataError)  # so no reader takes it for a broken file


def test_the_worker_cli_exits_75_when_the_store_is_unreachable(synth_tree: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in environment_at(f"http://127.0.0.1:{free_port()}", attempts=1).items():
        monkeypatch.setenv(name, value)
    code = worker_main(["init", "--workdir", "s3://bucket/cli", "--data", str(synth_tree), "--clients", "2",
                        "--architecture", "tiny_cnn", "--image-size", "32"])
    assert code == EXIT_TEMPORARY == 75
    error = capsys.readouterr().err
    assert "init: error: s3://bucket/cli/" in error and "cannot reach http://127.0.0.1:" in error
    assert "Traceback" not in error


def test_an_update_that_cannot_be_read_now_is_not_rejected(flaky_s3: FlakyS3, tmp_path: Path) -> None:
    current = {"w": np.zeros(3, np.float32)}
    local = DirectoryStore(tmp_path)
    save_weights(local, "a.safetensors", {"w": np.ones(3, np.float32)}, {"num_examples": 2})
    far = open_store("s3://bucket/training", environment_at(flaky_s3.endpoint, attempts=1))
    files = [UpdateFile("a", local, "a.safetensors"), UpdateFile("b", far, "round-0001/clients/b.safetensors")]
    for read in (lambda updates: updates.weighted_mean(), lambda updates: updates.all()):
        updates = UpdateSet(current, files, max_norm_ratio=0)
        with pytest.raises(TemporaryStorageError, match="SlowDown"):
            read(updates)
        assert updates.rejected == {}  # the client did nothing wrong


def test_an_aggregation_whose_update_read_fails_exits_75_and_succeeds_when_run_again(
        s3_server: S3Server, synth_tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    location = f"s3://{s3_server.bucket}/flaky/{uuid.uuid4().hex[:8]}"
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    assert worker_main(["init", "--workdir", location, "--data", str(synth_tree), "--clients", "2",
                        "--architecture", "tiny_cnn", "--image-size", "32"]) == 0
    store, layout = open_store(location, s3_server.environment()), Layout()
    start, base = read_weights(store, layout.global_weights(0))
    for step, client in enumerate(("client-00", "client-01"), start=1):  # two honest updates, no training needed
        moved = {k: v + np.asarray(0.001 * step, v.dtype) if v.dtype.kind == "f" else v for k, v in start.items()}
        save_weights(store, layout.client_update(1, client), moved, {"num_examples": 5, "base_sha256": base["sha256"]})
    aggregate = ["aggregate", "--workdir", location, "--round", "1", "--device", "cpu"]
    proxy = FlakyS3(failing="clients/client-01-a1.safetensors", upstream=s3_server.endpoint)
    try:  # the real process, for its exit code
        failed = subprocess.run([sys.executable, "-m", "fedtrain.worker.cli", *aggregate], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "FEDTRAIN_S3_ENDPOINT": proxy.endpoint,
                                                             "FEDTRAIN_S3_MAX_ATTEMPTS": "2"})
    finally:
        proxy.close()
    assert failed.returncode == 75, failed.stderr
    assert "client-01-a1.safetensors" in failed.stderr and "SlowDown" in failed.stderr and proxy.refused == 2
    assert not store.exists(layout.result(1)) and not store.exists(layout.global_weights(1))
    capsys.readouterr()
    assert worker_main(aggregate) == 0  # the engine's retry, once the store answers again
    result = json.loads(capsys.readouterr().out)
    assert result["accepted"] == ["client-00", "client-01"] and result["rejected"] == {}
