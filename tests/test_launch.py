"""Launchers (launch/*.py, launch/slurm_train.sbatch): the local multi-process launcher with tiny
python children (environment contract, [p<i>] output, pids.json, exit status, a failed child
stopping its peers, timeout, signal forwarding, dry run); TPU-pod commands (goldens, dry run,
the restart loop against a scripted gcloud, packing a checkout); the sbatch script run by bash
with stand-in srun / scontrol / python (task environment, USR1 -> SIGTERM -> requeue); submitit
(dry run, not installed, a stand-in module, the task's checkpoint hook on a real child)."""

import importlib.util
import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


lmp = _load("local_multiprocess")
tpu = _load("tpu_pod")
sit = _load("submitit_train")


def _wait_for(predicate, timeout=20.0, what="condition"):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie still answers kill(0); it has exited though.
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
  except OSError:
    return False


def _py(code):
  return [sys.executable, "-c", textwrap.dedent(code)]


# ----------------------------------------------------------------------------- local processes

def test_children_get_the_contract_and_prefixed_output(tmp_path):
  child = _py("""
      import json, os, sys
      keys = ["JAX_COORDINATOR_ADDRESS", "SPARSEJAX_NUM_PROCESSES", "SPARSEJAX_PROCESS_ID",
              "SPARSEJAX_LOCAL_DEVICES", "PYTHONUNBUFFERED"]
      print(json.dumps({"pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}))
      print("to stderr", file=sys.stderr)
      print("no newline at the end", end="")
  """)
  out, err = io.StringIO(), io.StringIO()
  rc = lmp.launch(child + ["--workdir", str(tmp_path / "wd")], 3, 4, port=23456, out=out, err=err)
  assert rc == 0, err.getvalue()
  lines = out.getvalue().splitlines()
  assert len(lines) == 9
  pids = {}
  for i in range(3):
    mine = [ln[len(f"[p{i}] "):] for ln in lines if ln.startswith(f"[p{i}] ")]
    assert sorted(mine[1:]) == ["no newline at the end", "to stderr"]
    env = json.loads(mine[0])
    pids[i] = env.pop("pid")
    assert env == {"JAX_COORDINATOR_ADDRESS": "localhost:23456", "SPARSEJAX_NUM_PROCESSES": "3",
                   "SPARSEJAX_PROCESS_ID": str(i), "SPARSEJAX_LOCAL_DEVICES": "4",
                   "PYTHONUNBUFFERED": "1"}
    assert f"process {i}/3: pid {pids[i]}" in err.getvalue()
  # pids.json lands in the command's --workdir when no --pid_dir is given
  record = json.loads((tmp_path / "wd" / "pids.json").read_text())
  assert record == {"launcher": os.getpid(), "coordinator": "localhost:23456",
                    "pids": [pids[0], pids[1], pids[2]]}


def test_the_contract_is_enough_for_jax_distributed():
  """Two processes x 4 fake CPU devices join one 8-device jax runtime through the launcher's
  coordinator on localhost (gloo collectives): a global sum sees every process's data."""
  child = _py("""
      import os
      os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                                 + os.environ["SPARSEJAX_LOCAL_DEVICES"])
      os.environ["JAX_PLATFORMS"] = "cpu"
      import jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                 int(os.environ["SPARSEJAX_NUM_PROCESSES"]),
                                 int(os.environ["SPARSEJAX_PROCESS_ID"]))
      mesh = jax.make_mesh((jax.device_count(),), ("d",))
      local = np.full((jax.local_device_count(),), jax.process_index() + 1.0)
      x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
      print("result", jax.process_index(), jax.process_count(), jax.device_count(),
            float(jax.jit(lambda v: v.sum())(x)))
  """)
  out, err = io.StringIO(), io.StringIO()
  assert lmp.launch(child, 2, 4, timeout=120, grace=5, out=out, err=err) == 0, err.getvalue()
  results = sorted(ln for ln in out.getvalue().splitlines() if " result " in ln)
  assert results == ["[p0] result 0 2 8 12.0", "[p1] result 1 2 8 12.0"]  # 4 x 1 + 4 x 2


def test_exit_status_of_the_failed_process(tmp_path):
  child = _py("""
      import os, sys
      sys.exit(3 if os.environ["SPARSEJAX_PROCESS_ID"] == "1" else 0)
  """)
  err = io.StringIO()
  assert lmp.launch(child, 2, port=1, pid_dir=tmp_path, out=io.StringIO(), err=err) == 3
  assert "process 1 failed (status 3)" in err.getvalue()
  killed = _py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
  assert lmp.launch(killed, 1, port=1, out=io.StringIO(), err=io.StringIO()) == 128 + 9


def test_a_failed_process_stops_its_peers(tmp_path):
  """Process 0 fails; 1 ignores SIGTERM (as if blocked in a collective), 2 takes the default
  action: after the grace period 2 gets SIGTERM, and 1 SIGKILL another grace period later."""
  child = _py("""
      import os, pathlib, signal, sys, time
      i = int(os.environ["SPARSEJAX_PROCESS_ID"])
      d = pathlib.Path(sys.argv[1])
      if i == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
      (d / f"ready{i}").touch()
      if i == 0:
        while not all((d / f"ready{j}").exists() for j in (1, 2)):
          time.sleep(0.01)
        sys.exit(5)
      time.sleep(120)
  """) + [str(tmp_path)]
  err = io.StringIO()
  rc = lmp.launch(child, 3, port=1, grace=0.3, timeout=60, pid_dir=tmp_path, out=io.StringIO(),
                  err=err)
  assert rc == 5  # process 0's status: the launcher stopped the sleeping peers (below), no timeout
  text = err.getvalue()
  assert "process 0 (pid" in text and "exited with status 5" in text
  assert "process(es) 1 ignored SIGTERM; SIGKILL" in text
  assert "process 0 failed (status 5)" in text
  pids = json.loads((tmp_path / "pids.json").read_text())["pids"]
  assert not any(_alive(p) for p in pids)


def test_timeout_stops_everything_with_124(tmp_path):
  child = _py("import time; time.sleep(120)")
  err = io.StringIO()
  rc = lmp.launch(child, 2, port=1, timeout=0.5, grace=0.3, pid_dir=tmp_path,
                  out=io.StringIO(), err=err)
  assert rc == 124
  assert "--timeout 0.5" in err.getvalue()
  assert not any(_alive(p) for p in json.loads((tmp_path / "pids.json").read_text())["pids"])


def test_dry_run_prints_environment_and_commands_and_starts_nothing(tmp_path, capsys):
  marker = tmp_path / "ran"
  argv = ["--num_processes", "2", "--devices_per_process", "4", "--port", "7777", "--dry_run",
          "--", "python", "-c", f"open({str(marker)!r}, 'w')", "--workdir", "a b"]
  assert lmp.main(argv) == 0
  code = f"open({str(marker)!r}, 'w')"
  assert capsys.readouterr().out.splitlines() == [
      f"JAX_COORDINATOR_ADDRESS=localhost:7777 SPARSEJAX_NUM_PROCESSES=2 SPARSEJAX_PROCESS_ID={i} "
      f"SPARSEJAX_LOCAL_DEVICES=4 python -c {shlex.quote(code)} --workdir 'a b'" for i in (0, 1)]
  assert not marker.exists() and not (tmp_path / "a b").exists()


def test_signals_are_forwarded_and_a_clean_exit_is_not_a_failure(tmp_path):
  """The CLI in its own process: SIGTERM to one child ends only that child (status 0, the
  others keep running); SIGTERM to the launcher reaches every child that is left."""
  child = textwrap.dedent("""
      import os, pathlib, signal, sys, time
      i = os.environ["SPARSEJAX_PROCESS_ID"]
      def stop(signum, frame):
        print("term", i, flush=True)
        sys.exit(0)
      signal.signal(signal.SIGTERM, stop)
      pathlib.Path(sys.argv[1], "ready" + i).touch()
      while True:
        time.sleep(0.05)
  """)
  proc = subprocess.Popen([sys.executable, str(REPO / "launch/local_multiprocess.py"),
                           "--num_processes", "3", "--pid_dir", str(tmp_path), "--",
                           sys.executable, "-c", child, str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: all((tmp_path / f"ready{i}").exists() for i in range(3)), what="children")
    record = json.loads((tmp_path / "pids.json").read_text())
    assert record["launcher"] == proc.pid
    pids = record["pids"]
    os.kill(pids[1], signal.SIGTERM)
    _wait_for(lambda: not _alive(pids[1]), what="process 1 to end")
    time.sleep(0.3)
    assert _alive(pids[0]) and _alive(pids[2]) and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err
  assert sorted(ln for ln in out.splitlines()) == ["[p0] term 0", "[p1] term 1", "[p2] term 2"]
  assert "received SIGTERM: sent SIGTERM to every process" in err


def test_gpu_split_and_bad_requests(capsys):
  envs = lmp.process_envs(2, port=5, gpus_per_process=2, visible_gpus=["4", "5", "6", "7"])
  assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]
  assert all("SPARSEJAX_LOCAL_DEVICES" not in e for e in envs)
  with pytest.raises(lmp.LaunchError, match="needs 6 GPUs"):
    lmp.process_envs(3, port=5, gpus_per_process=2, visible_gpus=["0", "1"])
  with pytest.raises(lmp.LaunchError, match="exclude each other"):
    lmp.process_envs(2, 4, port=5, gpus_per_process=1)
  assert lmp.main(["--num_processes", "2"]) == 2
  assert "no command: put it after --" in capsys.readouterr().err
  assert lmp.main(["--num_processes", "0", "--", "true"]) == 2
  assert "--num_processes 0: must be at least 1" in capsys.readouterr().err
  assert lmp.launch(["/nonexistent/program"], 1, port=1, out=io.StringIO(),
                    err=io.StringIO()) == 127


# ----------------------------------------------------------------------------- TPU pods

POD = tpu.Pod("sj", "us-west4-a", project="proj", accelerator_type="v5litepod-16",
              runtime_version="v2-alpha-tpuv5-lite")
GIT = tpu.Code("https://github.com/me/sparsejax.git", ref="v1")
JOB = tpu.Job("configs/dense.py:350m", "/mnt/shared/runs/350m",
              ("--config.train.steps=100",), (("XLA_FLAGS", "--xla_foo=1 --xla_bar=2"),))
SCOPE = "--zone us-west4-a --project proj"


def test_tpu_create_commands_per_tier():
  base = ("gcloud compute tpus queued-resources create sj --node-id sj --accelerator-type "
          f"v5litepod-16 --runtime-version v2-alpha-tpuv5-lite {SCOPE}")
  import dataclasses
  assert shlex.join(tpu.create_command(POD)) == base
  assert shlex.join(tpu.create_command(dataclasses.replace(POD, tier="spot"))) == base + " --spot"
  assert shlex.join(tpu.create_command(dataclasses.replace(POD, tier="reserved"))) == \
      base + " --reserved"
  assert tpu.create_command(dataclasses.replace(POD, node_id="n1"))[6:8] == ["--node-id", "n1"]
  with pytest.raises(tpu.PodError, match="--spot or --reserved"):
    tpu.create_command(dataclasses.replace(POD, tier="cheap"))


def test_tpu_run_command_golden():
  cmd = tpu.run_command(POD, GIT, JOB)
  assert cmd[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sj", "--zone", "us-west4-a",
                      "--project", "proj", "--worker=all", "--command"]
  assert cmd[-1] == (
      "set -o pipefail; cd sparsejax && SPARSEJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 "
      "XLA_FLAGS='--xla_foo=1 --xla_bar=2' .venv/bin/python -m sparsejax.train --config "
      "configs/dense.py:350m --workdir /mnt/shared/runs/350m --config.train.steps=100 2>&1 | "
      'sed -u "s/^/[$(hostname)] /"')


def test_tpu_up_dry_run_golden(capsys, tmp_path):
  argv = ["up", "--name", "sj", "--zone", "us-west4-a", "--project", "proj", "--spot",
          "--repo", "https://github.com/me/sparsejax.git", "--ref", "v1",
          "--config", "configs/dense.py:350m", "--workdir", "/mnt/shared/runs/350m",
          "--max_restarts", "2", "--dry_run", "--", "--config.train.steps=100"]
  env = {**os.environ, "PATH": str(tmp_path)}  # no gcloud: a dry run needs none
  done = subprocess.run([sys.executable, str(REPO / "launch/tpu_pod.py"), *argv], env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  install = ("(command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh)"
             ' && export PATH="$HOME/.local/bin:$PATH" && cd sparsejax && uv venv -q '
             "--allow-existing --python 3.12 .venv && uv pip install -q --python "
             ".venv/bin/python -e '.[tpu]' -c constraints.txt")
  setup = ("set -e; [ -d sparsejax/.git ] || git clone -q https://github.com/me/sparsejax.git "
           "sparsejax; git -C sparsejax fetch -q origin v1; git -C sparsejax checkout -q "
           "FETCH_HEAD; " + install)
  train = ("set -o pipefail; cd sparsejax && SPARSEJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 "
           ".venv/bin/python -m sparsejax.train --config configs/dense.py:350m --workdir "
           '/mnt/shared/runs/350m --config.train.steps=100 2>&1 | sed -u "s/^/[$(hostname)] /"')
  ssh = f"gcloud compute tpus tpu-vm ssh sj {SCOPE} --worker=all --command "
  lines = done.stdout.splitlines()
  assert lines[1::2] == [
      "gcloud compute tpus queued-resources create sj --node-id sj --accelerator-type "
      f"v5litepod-16 --runtime-version v2-alpha-tpuv5-lite {SCOPE} --spot",
      f"gcloud compute tpus queued-resources describe sj {SCOPE} --format 'value(state.state)'",
      ssh + shlex.quote(setup),
      ssh + shlex.quote(train),
      f"gcloud compute tpus tpu-vm describe sj {SCOPE} --format 'value(state)'",
      f"gcloud compute tpus queued-resources delete sj {SCOPE} --force --quiet"]
  assert all(ln.startswith("# ") for ln in lines[::2])
  assert "at most 2 times" in lines[8]
  # --keep: no teardown; `down` is the teardown alone
  assert "queued-resources delete" not in subprocess.run(
      [sys.executable, str(REPO / "launch/tpu_pod.py"), *argv[:-2], "--keep", "--", argv[-1]],
      env=env, capture_output=True, text=True).stdout
  assert tpu.main(["down", "--name", "sj", "--zone", "z", "--dry_run"]) == 0
  assert capsys.readouterr().out.splitlines()[1] == \
      "gcloud compute tpus queued-resources delete sj --zone z --force --quiet"


class FakeGcloud:
  """Scripted gcloud: describe answers and run exit codes per kind of command, in order."""

  def __init__(self, qr_states, node_states=(), run_codes=()):
    self.qr, self.node, self.codes = list(qr_states), list(node_states), list(run_codes)
    self.calls = []

  @staticmethod
  def kind(cmd):
    if cmd[3] == "queued-resources":
      return cmd[4]
    if cmd[4] == "ssh":
      return "train" if "sparsejax.train" in cmd[-1] else "setup"
    return cmd[4]  # scp / describe

  def run(self, cmd):
    self.calls.append(self.kind(cmd))
    return self.codes.pop(0) if self.kind(cmd) == "train" and self.codes else 0

  def query(self, cmd):
    if cmd[3] == "queued-resources":
      self.calls.append("state")
      return self.qr.pop(0)
    self.calls.append("node")
    return self.node.pop(0)


def _up(gcloud, **kw):
  logs = []
  rc = tpu.up(POD, GIT, JOB, gcloud, archive="unused", sleep=lambda s: None, log=logs.append,
              **kw)
  return rc, logs


def test_tpu_up_restarts_after_preemption_and_tears_down():
  g = FakeGcloud(["", "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED", "PROVISIONING", "ACTIVE"],
                 run_codes=[255, 0])
  rc, logs = _up(g, max_restarts=3)
  assert rc == 0
  assert g.calls == ["state", "create", "state", "state", "setup", "train", "state",
                     "delete", "create", "state", "state", "setup", "train", "delete"]
  assert any("queued resource SUSPENDED: restart 1/3" in m for m in logs)


def test_tpu_up_does_not_retry_a_failure_on_a_healthy_slice():
  g = FakeGcloud(["ACTIVE", "ACTIVE", "ACTIVE"], ["READY"], run_codes=[3])
  rc, logs = _up(g)
  assert rc == 3
  assert g.calls == ["state", "state", "setup", "train", "state", "node", "delete"]
  assert any("healthy slice, so not restarting" in m for m in logs)


def test_tpu_up_gives_up_after_max_restarts_and_keep_leaves_the_slice():
  g = FakeGcloud(["", "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"], ["PREEMPTED", "PREEMPTED"],
                 run_codes=[1, 1])
  rc, logs = _up(g, max_restarts=1, keep=True)
  assert rc == 1
  assert g.calls == ["state", "create", "state", "setup", "train", "state", "node", "delete",
                     "create", "state", "setup", "train", "state", "node"]
  assert any("giving up after 1 restarts" in m for m in logs)
  assert any("--keep" in m and "launch/tpu_pod.py down --name sj" in m for m in logs)
  # a slice lost while queued (FAILED) counts as a restart too
  g = FakeGcloud(["", "FAILED", "ACTIVE"], run_codes=[0])
  assert _up(g, max_restarts=1)[0] == 0
  assert g.calls == ["state", "create", "state", "delete", "create", "state", "setup", "train",
                     "delete"]


def test_tpu_up_runs_again_in_place_after_a_watchdog_exit():
  """Exit 75 (the trainer's watchdog) on a healthy slice: train again on the same slice, no
  re-creation, no second setup; it counts against --max_restarts."""
  g = FakeGcloud(["ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"], ["READY"], run_codes=[75, 0])
  rc, logs = _up(g, max_restarts=1)
  assert rc == 0
  assert g.calls == ["state", "state", "setup", "train", "state", "node", "state", "train",
                     "delete"]
  assert any("watchdog ended the run (exit 75): restart 1/1: running again on the same slice"
             in m for m in logs)
  g = FakeGcloud(["ACTIVE"] * 5, ["READY"] * 2, run_codes=[75, 75])
  assert _up(g, max_restarts=1)[0] == 1


def test_tpu_local_checkout_is_packed_without_ignored_files(tmp_path):
  repo = tmp_path / "checkout"
  repo.mkdir()
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  (repo / ".gitignore").write_text("runs/\n")
  (repo / "tracked.py").write_text("x = 1\n")
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-qm", "c"], check=True)
  (repo / "untracked.py").write_text("y = 2\n")
  (repo / "runs").mkdir()
  (repo / "runs" / "big.bin").write_text("ignored")
  steps = tpu.setup_steps(POD, tpu.Code(str(repo)), str(tmp_path / "a.tgz"))
  assert [what for what, _ in steps] == ["pack this checkout", "copy it to every worker",
                                         "unpack and install on every worker"]
  subprocess.run(steps[0][1], check=True)
  with tarfile.open(tmp_path / "a.tgz") as tar:
    assert sorted(tar.getnames()) == [".gitignore", "tracked.py", "untracked.py"]
  assert steps[1][1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tmp_path / "a.tgz"),
                         "sj:sparsejax.tgz", *SCOPE.split(), "--worker=all"]
  assert steps[2][1][-1].startswith("set -e; mkdir -p sparsejax; tar -xzf sparsejax.tgz -C "
                                    "sparsejax; (command -v uv")


def test_tpu_errors_are_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud installed
  assert tpu.main(["down", "--name", "sj", "--zone", "z"]) == 2
  err = capsys.readouterr().err
  assert err.splitlines() == [
      "tpu_pod: + gcloud compute tpus queued-resources delete sj --zone z --force --quiet",
      "tpu_pod: error: gcloud: not found; install the Google Cloud SDK (gcloud) and run "
      "`gcloud auth login`, or use --dry_run"]
  assert tpu.main(["setup", "--name", "sj", "--zone", "z", "--repo", "nowhere", "--dry_run"]) == 2
  assert "--repo nowhere: neither a local directory nor a git URL" in capsys.readouterr().err
  assert tpu.main(["create", "--name", "sj", "--zone", "z", "--dry_run", "--", "--x=1"]) == 2
  assert "`create` takes none" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SLURM sbatch

SBATCH = REPO / "launch" / "slurm_train.sbatch"


def test_sbatch_directives():
  directives = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
  assert directives == ["#SBATCH --job-name=sparsejax", "#SBATCH --nodes=2",
                        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                        "#SBATCH --cpus-per-task=8", "#SBATCH --time=04:00:00",
                        "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                        "#SBATCH --open-mode=append", "#SBATCH --output=slurm-%x-%j.out"]


def _slurm_bin(tmp_path, trainer_body):
  """Stand-ins: srun (records its options, runs the task command once), scontrol (records its
  arguments) and the trainer interpreter (records argv + environment, then `trainer_body`)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(textwrap.dedent(f"""\
      #!/bin/bash
      while [[ "$1" == -* ]]; do echo "$1" >> {tmp_path}/srun.args; shift; done
      exec "$@"
  """))
  (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.args\n')
  (bin_dir / "fakepython").write_text(textwrap.dedent(f"""\
      #!/bin/bash
      printf '%s\\n' "$@" > {tmp_path}/trainer.args
      echo "SPARSEJAX_DISTRIBUTED=$SPARSEJAX_DISTRIBUTED" > {tmp_path}/trainer.env
      echo "JAX_LOCAL_DEVICE_IDS=${{JAX_LOCAL_DEVICE_IDS:-unset}}" >> {tmp_path}/trainer.env
  """) + trainer_body)
  for exe in bin_dir.iterdir():
    exe.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SPARSEJAX_PYTHON": "fakepython",
          "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_PROCID": "3"}


@pytest.mark.parametrize("visible,per_task,local_id,expected", [
    ("3", "1", "3", "0"),                       # SLURM bound one GPU to the task
    ("0,1,2,3,4,5,6,7", "1", "3", "3"),         # the task sees the node: its own is #LOCALID
    ("0,1,2,3,4,5,6,7", "8", "0", "0,1,2,3,4,5,6,7"),  # one process per node
    ("4,5,6,7", "gpu:2", "1", "2,3"),           # typed GPU count, half a node visible
    (None, None, "0", "unset"),                 # no GPUs known: jax's default
])
def test_sbatch_task_environment(tmp_path, visible, per_task, local_id, expected):
  env = {**os.environ, **_slurm_bin(tmp_path, "exit 0\n"), "SLURM_LOCALID": local_id}
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  for key, value in (("CUDA_VISIBLE_DEVICES", visible), ("SLURM_GPUS_PER_TASK", per_task)):
    env.pop(key, None)
    if value is not None:
      env[key] = value
  done = subprocess.run(["bash", str(SBATCH), "--config", "configs/dense.py:tiny", "--workdir",
                         "/shared/r x"], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "srun.args").read_text().split() == ["--kill-on-bad-exit=1"]
  assert (tmp_path / "trainer.args").read_text().splitlines() == [
      "-m", "sparsejax.train", "--config", "configs/dense.py:tiny", "--workdir", "/shared/r x"]
  assert (tmp_path / "trainer.env").read_text().splitlines() == [
      "SPARSEJAX_DISTRIBUTED=auto", f"JAX_LOCAL_DEVICE_IDS={expected}"]
  assert not (tmp_path / "scontrol.args").exists()


def test_sbatch_task_with_too_few_gpus_fails_clearly(tmp_path):
  env = {**os.environ, **_slurm_bin(tmp_path, "exit 0\n"), "SLURM_LOCALID": "2",
         "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_PER_TASK": "2"}
  done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
  assert done.returncode == 2
  assert "sees GPUs 0,1,2,3 but should drive 2 starting at 4" in done.stderr
  assert not (tmp_path / "trainer.args").exists()


@pytest.mark.parametrize("max_restarts,status,runs", [(None, 0, "2"), ("0", 75, "1")])
def test_sbatch_runs_the_step_again_after_a_watchdog_exit(tmp_path, max_restarts, status, runs):
  body = textwrap.dedent(f"""\
      n=$(( $(cat {tmp_path}/runs 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/runs
      (( n < 2 )) && exit 75
      exit 0
  """)
  env = {**os.environ, **_slurm_bin(tmp_path, body), "SLURM_LOCALID": "0"}
  env.pop("SPARSEJAX_MAX_RESTARTS", None)
  if max_restarts is not None:
    env["SPARSEJAX_MAX_RESTARTS"] = max_restarts
  done = subprocess.run(["bash", str(SBATCH), "--config", "c", "--workdir", "w"], env=env,
                        capture_output=True, text=True)
  assert done.returncode == status, done.stderr
  assert (tmp_path / "runs").read_text().strip() == runs
  assert ("watchdog exit 75: running the step again (1/3)" in done.stderr) == (runs == "2")
  assert not (tmp_path / "scontrol.args").exists()


@pytest.mark.parametrize("signame,requeued", [("SIGUSR1", True), ("SIGTERM", False)])
def test_sbatch_signal_reaches_the_trainer_as_sigterm(tmp_path, signame, requeued):
  """USR1 (time limit near) and TERM (preemption / scancel) to the batch script become SIGTERM
  for the trainer, which exits cleanly; only USR1 requeues (SLURM requeues preempted jobs)."""
  body = textwrap.dedent(f"""\
      trap 'echo term > {tmp_path}/trainer.term; exit 0' TERM
      touch {tmp_path}/trainer.ready
      while true; do sleep 0.05; done
  """)
  env = {**os.environ, **_slurm_bin(tmp_path, body), "SLURM_LOCALID": "0"}
  proc = subprocess.Popen(["bash", str(SBATCH), "--config", "c", "--workdir", "w"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: (tmp_path / "trainer.ready").exists(), what="the stand-in trainer")
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err
  assert (tmp_path / "trainer.term").read_text() == "term\n"
  assert "SIGTERM to the training step" in err
  if requeued:
    assert (tmp_path / "scontrol.args").read_text() == "requeue 77\n"
  else:
    assert not (tmp_path / "scontrol.args").exists()


# ----------------------------------------------------------------------------- submitit

TRAIN_ARGS = ["--", "--config", "configs/dense.py:1.3b", "--workdir", "/shared/runs/1.3b"]


def test_submitit_dry_run(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "submitit", None)  # a dry run needs no submitit
  assert sit.main(["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time",
                   "240", "--python", "python", "--dry_run", *TRAIN_ARGS]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out == [
      "folder: runs/submitit/%j",
      'parameters: {"cpus_per_task": 8, "gpus_per_node": 8, "name": "sparsejax", "nodes": 2, '
      '"slurm_partition": "gpu", "slurm_signal_delay_s": 120, "tasks_per_node": 8, '
      '"timeout_min": 240}',
      f"each of the 16 tasks runs, in {REPO}: SPARSEJAX_DISTRIBUTED=auto python -m "
      "sparsejax.train --config configs/dense.py:1.3b --workdir /shared/runs/1.3b"]


def test_submitit_not_installed_and_bad_arguments(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
  base = ["--nodes", "1", "--gpus_per_node", "8", "--time", "60"]
  assert sit.main(base + TRAIN_ARGS) == 2
  err = capsys.readouterr().err
  assert "submitit is not installed (optional): `pip install submitit`" in err
  assert len(err.splitlines()) == 1
  assert sit.main(base) == 2
  assert "give the trainer's arguments after --" in capsys.readouterr().err
  assert sit.main(["--nodes", "0", "--gpus_per_node", "8", "--time", "60", *TRAIN_ARGS]) == 2
  assert "--nodes 0: must be at least 1" in capsys.readouterr().err


def _fake_submitit(calls):
  class Executor:
    def __init__(self, folder, slurm_max_num_timeout):
      calls["folder"], calls["max_num_timeout"] = folder, slurm_max_num_timeout

    def update_parameters(self, **kw):
      calls["params"] = kw

    def submit(self, fn):
      calls["task"] = fn
      return types.SimpleNamespace(job_id="4242")

  helpers = types.SimpleNamespace(
      DelayedSubmission=lambda fn, *a, **k: types.SimpleNamespace(function=fn, args=a))
  return types.SimpleNamespace(AutoExecutor=Executor, helpers=helpers), helpers


def test_submitit_submits_one_task_per_gpu_or_per_node(capsys, monkeypatch):
  calls = {}
  fake, helpers = _fake_submitit(calls)
  monkeypatch.setitem(sys.modules, "submitit", fake)
  monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
  assert sit.main(["--nodes", "4", "--gpus_per_node", "8", "--per_node", "--time", "90",
                   "--account", "acct", "--folder", "/logs/%j", "--slurm", "exclusive=",
                   "--max_requeues", "5", *TRAIN_ARGS]) == 0
  assert capsys.readouterr().out.strip() == "submitted job 4242; logs in /logs/4242"
  assert calls["folder"] == "/logs/%j" and calls["max_num_timeout"] == 5
  assert calls["params"] == {"name": "sparsejax", "nodes": 4, "tasks_per_node": 1,
                             "gpus_per_node": 8, "cpus_per_task": 64, "timeout_min": 90,
                             "slurm_signal_delay_s": 120, "slurm_account": "acct",
                             "slurm_additional_parameters": {"exclusive": ""}}
  task = calls["task"]
  assert task.cmd == [sys.executable, "-m", "sparsejax.train", *TRAIN_ARGS[1:]]
  assert task.cwd == str(REPO) and task.gpus_per_task == 8 and task.stop_timeout_s == 110


def test_submitit_task_checkpoint_stops_the_trainer_and_requeues(tmp_path, monkeypatch):
  """TrainTask on a stand-in trainer: the distributed environment; USR2 (sent by SLURM to every
  process) is ignored; checkpoint() sends SIGTERM, waits for the clean exit, and returns a
  fresh task for submitit to requeue."""
  calls = {}
  fake, helpers = _fake_submitit(calls)
  monkeypatch.setitem(sys.modules, "submitit", fake)
  monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
  monkeypatch.setenv("SLURM_LOCALID", "5")
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
  child = _py(f"""
      import json, os, pathlib, signal, sys, time
      d = pathlib.Path({str(tmp_path)!r})
      def stop(signum, frame):
        (d / "term").write_text("saved")
        sys.exit(0)
      signal.signal(signal.SIGTERM, stop)
      (d / "env.json").write_text(json.dumps({{k: os.environ.get(k) for k in
          ("SPARSEJAX_DISTRIBUTED", "JAX_LOCAL_DEVICE_IDS")}}))
      (d / "pid.tmp").write_text(str(os.getpid()))
      os.replace(d / "pid.tmp", d / "pid")  # atomic: the test never reads a half-written file
      while True:
        time.sleep(0.05)
  """)
  task = sit.TrainTask(child, str(tmp_path), gpus_per_task=1, stop_timeout_s=20)
  result = {}
  runner = threading.Thread(target=lambda: result.setdefault("rc", task()))
  runner.start()
  try:
    _wait_for(lambda: (tmp_path / "pid").exists(), what="the stand-in trainer")
    pid = int((tmp_path / "pid").read_text())
    os.kill(pid, signal.SIGUSR2)
    time.sleep(0.3)
    assert _alive(pid), "USR2 killed the trainer"
    delayed = task.checkpoint()
  finally:
    if task._proc is not None and task._proc.poll() is None:
      task._proc.kill()
    runner.join(timeout=30)
  assert (tmp_path / "term").read_text() == "saved" and result["rc"] == 0
  assert json.loads((tmp_path / "env.json").read_text()) == {"SPARSEJAX_DISTRIBUTED": "auto",
                                                             "JAX_LOCAL_DEVICE_IDS": "5"}
  fresh = delayed.function
  assert fresh is not task and fresh.cmd == task.cmd and fresh._proc is None
  # a trainer that fails makes the submitit job fail
  with pytest.raises(RuntimeError, match="exited with status 4"):
    sit.TrainTask(_py("import sys; sys.exit(4)"), str(tmp_path), 1)()
  # a watchdog exit (75) starts the trainer again, at most max_restarts times
  flaky = _py(f"""
      import pathlib, sys
      runs = pathlib.Path({str(tmp_path / "runs")!r})
      n = int(runs.read_text()) + 1 if runs.exists() else 1
      runs.write_text(str(n))
      sys.exit(75 if n < 3 else 0)
  """)
  assert sit.TrainTask(flaky, str(tmp_path), 1, max_restarts=2)() == 0
  assert (tmp_path / "runs").read_text() == "3"
  (tmp_path / "runs").unlink()
  with pytest.raises(RuntimeError, match="exited with status 75"):
    sit.TrainTask(flaky, str(tmp_path), 1, max_restarts=1)()
  assert (tmp_path / "runs").read_text() == "2"


def test_submitit_local_device_ids():
  assert sit.local_device_ids("7", 1, 7) == "0"
  assert sit.local_device_ids("0,1,2,3,4,5,6,7", 1, 7) == "7"
  assert sit.local_device_ids("0,1,2,3,4,5,6,7", 8, 0) == "0,1,2,3,4,5,6,7"
  assert sit.local_device_ids(None, 1, 0) is None
  with pytest.raises(sit.SubmitError, match="sees GPUs 0,1 but should drive 1 starting at 2"):
    sit.local_device_ids("0,1", 1, 2)
  assert sit.task_env({"JAX_LOCAL_DEVICE_IDS": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, 1) == {
      "JAX_LOCAL_DEVICE_IDS": "1", "CUDA_VISIBLE_DEVICES": "0,1",
      "SPARSEJAX_DISTRIBUTED": "auto", "PYTHONUNBUFFERED": "1"}


def test_watchdog_exit_status_matches_the_trainer():
  """The launchers restart on the trainer's watchdog status; they must agree with it."""
  from sparsejax.parallel.distributed import WATCHDOG_EXIT_CODE
  assert tpu.WATCHDOG_EXIT == sit.WATCHDOG_EXIT == WATCHDOG_EXIT_CODE
  assert f"status == {WATCHDOG_EXIT_CODE} &&" in SBATCH.read_text()
