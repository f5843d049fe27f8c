"""`ens infer --engine ray` on a real local Ray cluster (loopback, two CPUs, one per module):
the same stores as the local engine, through a killed inference actor and a killed driver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ensemble.formats.dataset import load_split
from ensemble.errors import EnsError
from ensemble.inference.run import InferOptions, infer
from ensemble.formats.store import MANIFEST, PARTIAL, read_store

from tests.ensemble.conftest import make_inat, store_bytes, tiny_onnx

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

MODELS = ("a", "b")
SPLITS = ("val", "test")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    data = make_inat(root / "inat", n_val=12, n_test=3)
    models = [tiny_onnx(root / "a.onnx", size=32), tiny_onnx(root / "b.onnx", size=40, seed=1)]
    splits = [load_split(data / "val2019.json"), load_split(data / "test2019.json")]
    return root, data, models, splits


def _options(out: Path, **kw) -> InferOptions:
    return InferOptions(**{"tta": ("flip", "scale"), "keep_views": True, "batch_size": 2, "chunk_size": 2,
                           "out": out, **kw})


def _all_bytes(out: Path) -> dict:
    return {(m, s): store_bytes(out / m / s) for m in MODELS for s in SPLITS}


@pytest.fixture(scope="module")
def local(setup):
    """The local engine's stores, the reference every Ray run must equal."""
    root, _, models, splits = setup
    infer(models, splits, _options(root / "local", workers=0))
    return root / "local"


def test_ray_stores_are_byte_identical_to_the_local_engines(cluster, setup, local, tmp_path):
    _, _, models, splits = setup
    result = infer(models, splits, _options(tmp_path, engine="ray"))
    assert all(s.computed for s in result.stores) and result.decodes == 15
    assert _all_bytes(tmp_path) == _all_bytes(local)
    made = json.loads((tmp_path / "a" / "val" / MANIFEST).read_text())
    reference = json.loads((local / "a" / "val" / MANIFEST).read_text())
    assert made["engine"] == "ray" and reference["engine"] == "local" and reference["cluster"] is None
    assert made["cluster"] == {"cpus": 2, "gpus": 0, "nodes": 1, "inference_actors": 1}
    # One engine's store is the other's: the key of the arrays does not name the engine.
    assert made["run_key"] == reference["run_key"]
    assert "--engine ray" in made["command"] and "--engine" not in reference["command"]
    read_store(tmp_path / "b" / "test")  # the manifest passes the reader's checks


def test_a_store_begun_by_the_local_engine_is_finished_by_ray(cluster, setup, local, tmp_path):
    _, _, models, splits = setup

    class Killed(Exception):
        pass

    def killed_after_two_chunks(event, seen=[]):
        if event.kind == "chunk":
            seen.append(event)
            if len(seen) == 2:
                raise Killed

    with pytest.raises(Killed):
        infer(models, splits, _options(tmp_path, workers=0), progress=killed_after_two_chunks)
    resumed = infer(models, splits, _options(tmp_path, engine="ray"))
    assert resumed.decodes == 15 - 4  # the two chunks saved are not computed again
    assert _all_bytes(tmp_path) == _all_bytes(local)


def test_bad_images_follow_on_bad_image_as_in_the_local_engine(cluster, tmp_path):
    data = make_inat(tmp_path / "inat", n_val=5, n_test=1)
    model = tiny_onnx(tmp_path / "a.onnx")
    val = load_split(data / "val2019.json")
    val.paths[3].write_bytes(b"not a jpeg")
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(EnsError) as info:
            infer([model], [val], _options(tmp_path / engine, engine=engine, workers=None if engine == "ray" else 0))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[1].startswith(f"image 3 ({val.paths[3]}): not an image Pillow can read")

    for engine in ("local", "ray"):
        infer([model], [val], _options(tmp_path / engine, engine=engine, on_bad_image="skip",
                                       workers=None if engine == "ray" else 0))
    assert store_bytes(tmp_path / "ray" / "a" / "val") == store_bytes(tmp_path / "local" / "a" / "val")
    assert read_store(tmp_path / "ray" / "a" / "val").skipped_ids == (3,)


SLOW_BATCH = '''
import os
_LOG = os.environ.get("ENS_TEST_BATCH_LOG")
if _LOG:
    import time
    from ensemble.inference import forward

    _call = forward.Forward.__call__

    def _logged(self, decoded, passes):
        # "pid start" of every batch begun, then slowly: a kill lands while a batch is running.
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {decoded.start}\\n".encode())
        finally:
            os.close(fd)
        time.sleep(float(os.environ["ENS_TEST_BATCH_SECONDS"]))
        return _call(self, decoded, passes)

    forward.Forward.__call__ = _logged
'''


def _hooked(tmp_path: Path, hook: str, **env: str) -> dict[str, str]:
    """The environment of a driver whose Python processes, and so its cluster's, import ``hook``."""
    folder = tmp_path / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(hook)
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _starts(log: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_killed_inference_actor_is_restarted_and_its_batch_run_again(setup, local, tmp_path):
    """The inference actor is SIGKILLed while it runs a batch (a cluster of its own whose actors
    log each batch they begin and take 2 s over it): a new actor runs that batch again, and the
    stores equal the local engine's."""
    _, data, models, _ = setup
    log = tmp_path / "batches.log"
    env = _hooked(tmp_path, SLOW_BATCH, ENS_TEST_BATCH_LOG=str(log), ENS_TEST_BATCH_SECONDS="2")
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "ensemble", "infer", *map(str, models), "--data", str(data), "--split", "val",
            "--tta", "flip,scale", "--keep-views", "--batch-size", "2", "--chunk-size", "2", "--engine", "ray",
            "--ray-address", "local", "--out", str(tmp_path / "runs")]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # generous: a new cluster on a loaded machine
            while not _starts(log) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert _starts(log), (tmp_path / "stderr").read_text()
            killed, lost = _starts(log)[-1]  # the batch it has just begun, 2 s from its end
            os.kill(killed, signal.SIGKILL)
            assert proc.wait(timeout=400) == 0, (tmp_path / "stderr").read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    starts = _starts(log)
    assert {start for _, start in starts} == set(range(0, 12, 2))
    assert [start for pid, start in starts if pid == killed][-1] == lost
    assert any(start == lost for pid, start in starts if pid != killed)  # run again, by another actor
    for m in MODELS:
        assert store_bytes(tmp_path / "runs" / m / "val") == store_bytes(local / m / "val")


HANG_CHUNK = '''
import os
_CHUNK = os.environ.get("ENS_TEST_HANG_CHUNK")
if _CHUNK:
    import time
    from ensemble.formats import store

    _write = store.StoreWriter.write_chunk

    def _hanging_write(self, index, *args, **kwargs):
        if index == int(_CHUNK):
            open(os.environ["ENS_TEST_HANG_MARK"], "w").close()  # the test's sign that it hangs here
            while True:
                time.sleep(3600)
        return _write(self, index, *args, **kwargs)

    store.StoreWriter.write_chunk = _hanging_write
'''


def test_a_killed_driver_rerun_resumes_from_its_saved_chunks(cluster, setup, local, tmp_path):
    """A real kill: the `ens infer --engine ray` driver hangs before saving chunk 3 (a
    sitecustomize on its PYTHONPATH), is SIGKILLed, and the rerun finishes from chunk 3."""
    _, data, models, _ = setup
    args = [sys.executable, "-m", "ensemble", "infer", *map(str, models), "--data", str(data), "--split", "val",
            "--tta", "flip,scale", "--keep-views", "--batch-size", "2", "--chunk-size", "2", "--engine", "ray",
            "--ray-address", cluster, "--out", str(tmp_path)]
    mark = tmp_path / "hanging"
    env = _hooked(tmp_path, HANG_CHUNK, ENS_TEST_HANG_CHUNK="3", ENS_TEST_HANG_MARK=str(mark))
    proc = subprocess.Popen(args, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = tmp_path / "a" / "val" / PARTIAL
    try:
        # Generous: on a loaded machine Ray's workers start slowly; the loop ends once it hangs.
        deadline = time.monotonic() + 300
        while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert mark.exists()  # at chunk 3's write, with chunks 0-2 saved
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert sorted(p.name for p in partial.glob("chunk-*.npz")) == [f"chunk-{i:06d}.npz" for i in range(3)]
    assert json.loads((tmp_path / "a" / "val" / MANIFEST).read_text())["complete"] is False

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming, 6 of 12 images done" in done.stderr
    for m in MODELS:
        assert store_bytes(tmp_path / m / "val") == store_bytes(local / m / "val")


def test_without_ray_the_engine_is_a_one_line_error_naming_the_extra(setup, tmp_path, monkeypatch):
    _, _, models, splits = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(EnsError, match=r"^--engine ray needs Ray: pip install 'ens\[ray\]'"):
        infer(models, splits, _options(tmp_path, engine="ray"))


def test_options_that_only_ray_takes_are_refused_without_it(setup, tmp_path):
    _, _, models, splits = setup
    with pytest.raises(EnsError, match="^--ray-address is for --engine ray$"):
        infer(models, splits, _options(tmp_path, ray_address="auto"))
    with pytest.raises(EnsError, match="^--engine spark: choose from local, ray$"):
        infer(models, splits, _options(tmp_path, engine="spark"))
    with pytest.raises(EnsError, match="^--workers 0 decodes in this process; with --engine ray images are "):
        infer(models, splits, _options(tmp_path, engine="ray", workers=0))
    with pytest.raises(EnsError, match=r"^--device tensorrt: not with --engine ray yet"):
        infer(models, splits, _options(tmp_path, engine="ray", device="tensorrt"))


@pytest.mark.parametrize("given", ["option", "RAY_ADDRESS"])
def test_an_address_without_a_cluster_is_a_one_line_error(setup, tmp_path, given):
    _, data, models, _ = setup
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    address = f"127.0.0.1:{port}"
    option = ["--ray-address", address] if given == "option" else []
    env = {**os.environ, "RAY_ADDRESS": address} if given == "RAY_ADDRESS" else os.environ
    done = subprocess.run([sys.executable, "-m", "ensemble", "infer", str(models[0]), "--data", str(data),
                           "--split", "test", "--engine", "ray", *option, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2, done.stderr
    where = f"--ray-address {address}" if given == "option" else f"RAY_ADDRESS={address}"
    assert done.stderr.strip().splitlines() == [
        f"error: {where}: cannot connect to a Ray cluster (Connection refused); "
        "start one with `ray start --head` there, or check the host and port"]


def test_a_manifest_naming_an_unknown_engine_is_refused(local, tmp_path):
    import shutil

    store = shutil.copytree(local / "a" / "test", tmp_path / "a" / "test")
    manifest = json.loads((store / MANIFEST).read_text())
    (store / MANIFEST).write_text(json.dumps({**manifest, "engine": "spark"}))
    with pytest.raises(EnsError, match=r"field 'engine' is missing or not local or ray"):
        read_store(store)
    (store / MANIFEST).write_text(json.dumps({**manifest, "engine": "ray", "cluster": {"cpus": 2}}))
    with pytest.raises(EnsError, match=r"field 'cluster' is missing or not null or \{cpus, gpus, nodes\}"):
        read_store(store)


@pytest.mark.parametrize("resources, device, workers, expected", [
    # A GPU node: one actor per GPU, a CPU each; the other CPUs decode.
    ({"cpus": 64, "gpus": 8, "nodes": 1, "cpu_nodes": 1, "node_cpus": 64}, "cuda", None,
     {"actors": 8, "actor_cpus": 1, "actor_gpus": 1, "decoders": 56}),
    # CPU nodes: one actor per node with three quarters of its CPUs; --workers caps the decoding.
    ({"cpus": 32, "gpus": 0, "nodes": 3, "cpu_nodes": 2, "node_cpus": 16}, "cpu", None,
     {"actors": 2, "actor_cpus": 12, "actor_gpus": 0, "decoders": 8}),
    ({"cpus": 32, "gpus": 0, "nodes": 2, "cpu_nodes": 2, "node_cpus": 16}, "cpu", 3,
     {"actors": 2, "actor_cpus": 12, "actor_gpus": 0, "decoders": 3}),
    ({"cpus": 2, "gpus": 0, "nodes": 1, "cpu_nodes": 1, "node_cpus": 2}, "cpu", None,
     {"actors": 1, "actor_cpus": 1, "actor_gpus": 0, "decoders": 1}),
])
def test_the_pool_plan(resources, device, workers, expected):
    from ensemble.inference.ray_engine import plan_pool

    assert plan_pool(resources, device, workers) == expected


def test_a_cluster_with_no_cpu_left_to_decode_is_refused():
    from ensemble.inference.ray_engine import plan_pool

    with pytest.raises(EnsError, match=r"^the Ray cluster has 1 CPUs; --engine ray needs one more than its 1 "
                                       r"inference actor takes \(1\) to decode images$"):
        plan_pool({"cpus": 1, "gpus": 0, "nodes": 1, "cpu_nodes": 1, "node_cpus": 1}, "cpu", None)


def test_a_model_onnxruntime_cannot_open_fails_as_in_the_local_engine(cluster, setup, tmp_path):
    """The actors open the sessions: the failure reaches the driver as the local engine's line,
    not as a restart loop."""
    import onnx

    _, _, _, splits = setup
    path = tiny_onnx(tmp_path / "odd.onnx")
    graph = onnx.load(str(path))
    graph.graph.node[0].op_type = "NoSuchOp"  # loads as ONNX, no session can run it
    onnx.save(graph, str(path))
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(EnsError) as info:
            infer([path], splits[1:], _options(tmp_path / engine, engine=engine,
                                               workers=0 if engine == "local" else None))
        messages.append(str(info.value))
    assert messages[0].startswith(f"{path}: onnxruntime cannot open it on cpu")
    assert messages[1] == messages[0]


CRASH_BATCH = '''
import os
_ROW = os.environ.get("ENS_TEST_CRASH_ROW")
if _ROW:
    from ensemble.inference import forward

    _call = forward.Forward.__call__

    def _crashing(self, decoded, passes):
        if decoded.start == int(_ROW):
            os._exit(1)  # the actor's process dies, as when the kernel kills it for its memory
        return _call(self, decoded, passes)

    forward.Forward.__call__ = _crashing
'''


def test_a_batch_that_kills_every_actor_fails_the_run_in_one_line(setup, tmp_path):
    """Every process of a cluster of its own (a sitecustomize on its PYTHONPATH) dies on the
    batch of rows 4-5: Ray runs it again on restarted actors a bounded number of times, then the
    run stops with one line, rather than restarting actors forever with the progress stuck."""
    from ensemble.inference.ray_engine import BATCH_RETRIES

    _, data, models, _ = setup
    env = _hooked(tmp_path, CRASH_BATCH, ENS_TEST_CRASH_ROW="4")
    env.pop("RAY_ADDRESS", None)
    # --ray-address local: a new cluster, started by this driver with its environment (the hook).
    done = subprocess.run([sys.executable, "-m", "ensemble", "infer", str(models[0]), "--data", str(data), "--split",
                           "val", "--batch-size", "2", "--chunk-size", "2", "--engine", "ray", "--ray-address", "local",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # The batch is the cause, not the cluster: rerunning as it is would only fail the same way.
    assert errors == [f"error: the Ray cluster failed the run: a batch killed its inference actor each of the "
                      f"{BATCH_RETRIES + 1} times it ran (out of memory, or a crash inside onnxruntime); the chunks "
                      "already saved are kept; try a smaller --batch-size, and ens --debug to see Ray's error"], done.stderr
    assert "Deprecat" not in done.stderr
    assert not (tmp_path / "runs" / "a" / "val" / "logits.npy").exists()


def test_a_decoding_tasks_memory_request_is_its_decoded_batch_cam_sources_included(tmp_path):
    """The decoding tasks' ``memory=`` is the size of what they hold: a cam run's batch carries
    each cam source's crop buffers besides the views' pixels."""
    from ensemble.inference.decode import decode_batch
    from ensemble.inference.ray_engine import RayEngine
    from ensemble.inference.runtime import GpuOptions, load_model
    from ensemble.inference.tta import plan_views

    from tests.ensemble.inference.test_infer_cam import cam_onnx

    data = make_inat(tmp_path / "inat", n_val=3, n_test=1)
    options = _options(tmp_path / "out", tta=("flip", "cam"), batch_size=3)
    engine = RayEngine(None, [load_model(cam_onnx(tmp_path / "c.onnx"))], plan_views(options.tta), options, "cpu",
                       GpuOptions(), {"cpus": 2, "gpus": 0, "nodes": 1},
                       {"actors": 1, "actor_cpus": 1, "actor_gpus": 0, "decoders": 1})
    assert engine.needs["sources"]  # a cam run: its batches hold crop sources
    batch = decode_batch(0, [str(p) for p in load_split(data / "val2019.json").paths], 3, **engine.needs)
    held = sum(a.nbytes for a in batch.arrays.values())
    held += sum(s.pixels.nbytes + s.shapes.nbytes + s.regions.nbytes for s in batch.sources.values())
    fields = len(batch.arrays) + 3 * len(batch.sources)
    assert held <= engine.batch_bytes < held + 64 * fields  # the arrays, each 64-byte aligned
