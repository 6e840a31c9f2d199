"""Faults during work, injected for real: a lock held by another process, signals sent to real processes (a rank's
DataLoader worker, a launcher, ``emoe-llm train``'s process group), checkpoint and cache files overwritten or cut
short on disk, a full device. The in-process tests cover the logic in seconds; the runs on 2 CPU ranks under the
``deepspeed`` launcher are ``slow`` (docs/training.md, "Faults and signals", says what each case does)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from emoe_llm.dirlock import LOCK_NAME, DirBusyError, DirLock
from emoe_llm.train import checkpoint
from emoe_llm.train.failure import handle_failure
from emoe_llm.train.stall import StallWatch
from emoe_llm.train.stop import STOP_FILE_ENV, StopRequest, init_dataloader_worker

from ranks import BIN, REPO, rank_command, rank_env, tiny_fp32_workspace

TINY = REPO / "configs" / "tiny_cpu.yaml"


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s lock (it prints "locked" once it does, then sleeps)."""
    code = (f"import sys, time; from emoe_llm.dirlock import DirLock; DirLock({str(path)!r}, what='output_dir')"
            ".acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=rank_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


# ---------------------------------------------------------------------------------------------------------------------
# one run per directory


def test_a_live_lock_is_refused_with_its_holder_and_a_dead_ones_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(DirBusyError) as e:
            DirLock(tmp_path / "run", what="output_dir").acquire()
        assert f"output_dir {tmp_path / 'run'} is in use by another run (pid {holder.pid} on " in str(e.value)
        assert "started 20" in str(e.value)
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to clean up, the kernel drops its flock
        holder.wait()
    lock = DirLock(tmp_path / "run", what="output_dir").acquire()
    try:
        assert lock.previous["pid"] == holder.pid and not lock.created
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_second_run_into_a_live_runs_output_dir_exits_2_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    ckpt = checkpoint.checkpoint_path(out, 2)
    ckpt.mkdir(parents=True)
    (ckpt / checkpoint.STATE_FILE).write_text('{"step": 2}')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.5}\n')
    before = snapshot(out)
    holder = hold_lock(out)
    try:
        proc = subprocess.run([str(BIN / "emoe-llm"), "train", "--nproc", "1", "--config", str(TINY),
                               f"output_dir={out}", "logging.progress_bar=false"],
                              capture_output=True, text=True, env=rank_env(), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[emoe-llm] error")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [f"[emoe-llm] error: output_dir {out} is in use by another run (pid {holder.pid} on "
                      f"{os.uname().nodename}, started {errors[0].split('started ')[1].split(';')[0]}; lock "
                      f"{out / LOCK_NAME}): wait for it to end, stop it, or use another output_dir"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before  # the live run's metrics and checkpoints, byte for byte


def test_a_second_study_into_a_live_study_dir_exits_2(tmp_path, capsys):
    from emoe_llm.cli import main

    holder = hold_lock(tmp_path / "study")
    try:
        rc = main(["study", str(REPO / "configs" / "study_tiny.yaml"), "--out", str(tmp_path / "study")])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 2 and f"emoe-llm study: error: study dir {tmp_path / 'study'} is in use by another run (pid " \
        f"{holder.pid}" in err, err
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == [LOCK_NAME]  # nothing recorded, nothing run


# ---------------------------------------------------------------------------------------------------------------------
# signals


def test_stop_signals_set_the_flag_and_a_second_sigint_gets_the_default_action(tmp_path):
    stop = StopRequest(tmp_path / "STOP")
    try:
        assert stop.reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_for(stop.reason, 5, "the SIGUSR1 flag") == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a flag, no KeyboardInterrupt
        time.sleep(0.2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # the next one ends the process at once
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_stop_file_of_emoe_llm_train_and_the_runs_stop_file(tmp_path, monkeypatch):
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "ext"))
    stop = StopRequest(tmp_path / "STOP")
    try:
        assert stop.reason() is None
        (tmp_path / "ext").write_text("SIGTERM\n")
        assert stop.reason() == "SIGTERM to emoe-llm train"
        (tmp_path / "STOP").touch()
        assert stop.reason() == "STOP file"
    finally:
        stop.restore()


def _collate_slowly(rows):
    time.sleep(0.05)
    return rows


@pytest.mark.parametrize("ignoring", [True, False])
def test_a_dataloader_worker_ignores_sigterm_sent_to_it(ignoring):
    """The group's SIGTERM reaches a rank's DataLoader worker too; with ``init_dataloader_worker`` it keeps collating
    (without, the rank dies with "DataLoader worker (pid ...) is killed by signal: Terminated")."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(40)), batch_size=2, num_workers=1, collate_fn=_collate_slowly,
                        worker_init_fn=init_dataloader_worker if ignoring else None, multiprocessing_context="fork")
    it = iter(loader)
    got = [next(it)]
    os.kill(it._workers[0].pid, signal.SIGTERM)
    time.sleep(0.5)
    if ignoring:
        got += list(it)
        assert len(got) == 20
    else:
        with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid"):  # killed by signal / exited
            list(it)


WORKER_THREADS = """\
import threading
from emoe_llm.train.stop import init_dataloader_worker
init_dataloader_worker(0)
def fail(exc):
    raise exc
for exc in (ConnectionResetError(104, "Connection reset by peer"), EOFError(), ValueError("a real bug")):
    t = threading.Thread(target=fail, args=(exc,))
    t.start()
    t.join()
"""


def test_a_dataloader_worker_drops_the_lost_peer_of_a_killed_rank_but_not_other_thread_errors():
    """SIGKILL of a rank while its worker passes it a batch's fd: the worker's resource_sharer thread gets
    ConnectionResetError; that is the rank's death (reported once by the survivors), not a traceback to print.
    Any other exception in a worker thread still prints."""
    result = subprocess.run([sys.executable, "-c", WORKER_THREADS], capture_output=True, text=True, timeout=60,
                            env=rank_env())
    assert result.returncode == 0, result.stderr
    assert "ValueError: a real bug" in result.stderr
    assert "ConnectionResetError" not in result.stderr and "EOFError" not in result.stderr, result.stderr


FAKE_LAUNCHER = """\
#!{python}
# a launcher by name ({name}): starts one "rank" and waits for it
import subprocess, sys
sys.exit(subprocess.call([sys.executable, "-c", {rank!r}]))
"""
RANK = """\
import sys, time
from pathlib import Path
from emoe_llm.train.stop import StopRequest
stop = StopRequest(Path(sys.argv[0]).parent / "STOP")
out = Path({out!r})
out.write_text("watching %d launchers\\n" % len(stop.launchers))
while stop.reason() is None:
    time.sleep(0.1)
out.write_text(stop.reason() + "\\n")
"""


@pytest.mark.parametrize("name", ["torchrun", "not-a-launcher"])
def test_a_rank_stops_when_its_launcher_is_gone(tmp_path, name):
    """SIGTERM to a launcher that does not forward it (DeepSpeed's single-node runner) leaves its ranks running;
    they notice at the next step that it is gone. A parent that is not a launcher (a shell, nohup) is not watched."""
    result = tmp_path / "result"
    script = tmp_path / "bin" / name
    script.parent.mkdir()
    script.write_text(FAKE_LAUNCHER.format(python=sys.executable, name=name, rank=RANK.format(out=str(result))))
    script.chmod(0o755)
    launcher = subprocess.Popen([str(script)], env=rank_env(), start_new_session=True)
    try:
        wait_for(lambda: result.is_file() and result.read_text().startswith("watching"), 60, "the rank to start")
        assert result.read_text() == f"watching {1 if name == 'torchrun' else 0} launchers\n"
        launcher.send_signal(signal.SIGTERM)  # the launcher dies of it; its child does not get it
        launcher.wait(timeout=10)
        if name == "torchrun":
            text = wait_for(lambda: result.read_text() if "exited" in result.read_text() else None, 10,
                            "the rank to notice")
            assert text == f"launcher pid {launcher.pid} exited\n"
        else:
            time.sleep(1.5)
            assert result.read_text().startswith("watching")  # still running, as it should
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


SUPERVISED = """\
import os, signal, sys, time
from pathlib import Path
stop, out = Path(os.environ[{env!r}]), Path({out!r})
out.write_text("up\\n")
while not stop.exists():
    time.sleep(0.05)
out.write_text(stop.read_text())
time.sleep({linger})
"""


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGUSR1"], ["SIGINT", "SIGINT"]])
def test_emoe_llm_train_turns_a_signal_to_its_group_into_the_stop_file(tmp_path, signals):
    """``supervise`` (what ``emoe-llm train`` runs the launcher under): a signal to its process group never reaches
    the launcher or the ranks (a process group of their own); they read it from the stop file and end on their own:
    exit 0. A second SIGINT kills them at once: exit 130."""
    out = tmp_path / "seen"
    child = SUPERVISED.format(env=STOP_FILE_ENV, out=str(out), linger=60 if len(signals) > 1 else 0)
    sup = subprocess.Popen([sys.executable, "-c", "import sys; from emoe_llm.train.launch import supervise; "
                            f"sys.exit(supervise([sys.executable, '-c', {child!r}]))"],
                           env=rank_env(), start_new_session=True, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: out.is_file(), 60, "the supervised launcher to start")
    for name in signals:
        os.killpg(sup.pid, getattr(signal, name))
        time.sleep(0.5)
    rc = sup.wait(timeout=30)
    assert out.read_text() == f"{signals[0]}\n"
    if len(signals) == 1:
        assert rc == 0 and "every rank checkpoints at the end of this step" in sup.stdout.read()
    else:
        assert rc == 130 and "killing the launcher and every rank now" in sup.stdout.read()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"emoe-llm-stop-{sup.pid}*"))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints that prove they are whole


def fake_checkpoint(root: Path) -> Path:
    ckpt = checkpoint.checkpoint_path(root, 4)
    ckpt.mkdir(parents=True)
    (ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(20_000))
    (ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(os.urandom(9_000))
    (ckpt / "config.yaml").write_text("seed: 0\n")
    checkpoint.write_manifest(ckpt, rank=0)
    (ckpt / checkpoint.STATE_FILE).write_text('{"step": 4}')
    return ckpt


def test_the_manifest_names_an_overwritten_a_truncated_and_a_missing_file(tmp_path):
    ckpt = fake_checkpoint(tmp_path)
    manifest = json.loads((ckpt / checkpoint.MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "config.yaml",
                                         "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert checkpoint.verify_checkpoint(ckpt, rank=0) is None
    shard = ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:  # 4,000 bytes overwritten in place: same size, same mtime granularity
        f.seek(8_000)
        f.write(os.urandom(4_000))
    assert checkpoint.verify_checkpoint(ckpt, rank=0) == \
        f"{shard} does not match its sha256 in {ckpt / checkpoint.MANIFEST_FILE} (changed since it was saved)"
    os.truncate(shard, 10_000)
    assert checkpoint.verify_checkpoint(ckpt, rank=0) == \
        f"{shard} has 10000 bytes, 20000 when saved (truncated or overwritten)"
    shard.unlink()
    assert checkpoint.verify_checkpoint(ckpt, rank=0) == f"{shard} is missing (listed in {ckpt / 'manifest.json'})"


def test_a_truncated_trainer_state_is_one_line_naming_it(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path)
    (ckpt / checkpoint.STATE_FILE).write_text('{"step": 4, "ep')
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.find_resume_checkpoint("auto", tmp_path)
    assert handle_failure(e.value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[emoe-llm] error: {ckpt / checkpoint.STATE_FILE} is not valid JSON")


# ---------------------------------------------------------------------------------------------------------------------
# OS errors as one line


def test_a_full_device_is_one_line_naming_the_file(capsys):
    with pytest.raises(OSError) as e:
        with open("/dev/full", "wb") as f:  # the kernel's always-full device: a real ENOSPC
            f.write(b"x" * 10_000)
            f.flush()
    assert handle_failure(e.value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[emoe-llm] error: [Errno 28] No space left on device"] or \
        err == ["[emoe-llm] error: No space left on device: /dev/full"], err


FULL_DISK = """\
import os, sys
from pathlib import Path
from emoe_llm.train import checkpoint
sys.path.insert(0, {tests!r})
from test_faults import fake_checkpoint
root = Path(sys.argv[1])
kept = fake_checkpoint(root)
with open(root / "filler", "wb") as f:  # fill the device to the last block
    try:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    except OSError:
        pass
err = checkpoint._save_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1007680 vs "
                                          "1007568"), checkpoint.checkpoint_path(root, 6), root)
print(type(err).__name__, err)
"""


def test_a_save_on_a_full_disk_says_so_and_names_what_was_kept(tmp_path):
    """PyTorch's zip writer reports ENOSPC as "[enforce fail at inline_container.cc] unexpected pos" (no errno, no
    path). On a really full filesystem (a 1 MiB tmpfs in a mount namespace of its own) the line says "No space left
    on device", names the checkpoint being written and the complete one that is kept."""
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "fill.py").write_text(FULL_DISK.format(tests=str(REPO / "tests")))
    script = f"mount -t tmpfs -o size=1m tmpfs {disk} && exec {sys.executable} {tmp_path / 'fill.py'} {disk}"
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -rm) to make a full filesystem in")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=rank_env(),
                          timeout=120)
    kept = checkpoint.checkpoint_path(disk, 4)
    assert proc.stdout.strip().splitlines()[-1:] == [(
        f"OSError [Errno 28] No space left on device while writing checkpoint {checkpoint.checkpoint_path(disk, 6)} "
        f"(the last complete checkpoint, {kept}, is kept; the partial step_00000006 is ignored by resume=auto); "
        "free space, then resume")], proc.stdout[-2000:] + proc.stderr[-2000:]  # after DeepSpeed's import notice


def test_a_read_only_output_dir_is_one_line_before_any_work(tmp_path):
    """A read-only mount (a bind mount remounted ro, in a mount namespace of its own): root passes os.access there,
    so the check asks the mount. One line naming the dir, exit 2, nothing written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -rm) to make a read-only mount in")
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec {BIN / 'emoe-llm'} train --nproc 1 "
              f"--config {TINY} output_dir={ro / 'run'} logging.progress_bar=false")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=rank_env(),
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and errors == [f"[emoe-llm] error: output_dir {ro / 'run'}: {ro} is not writable"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and list(ro.iterdir()) == []


def test_a_peer_that_went_away_is_one_line_without_a_traceback(capsys):
    e = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                     "[127.0.0.1]:29500")
    assert handle_failure(e) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[emoe-llm] error (this rank): another rank went away during a collective (Connection closed "
                   "by peer); its own log or the launcher's says why"]


# ---------------------------------------------------------------------------------------------------------------------
# caches that heal


def test_a_truncated_cache_file_is_set_aside_and_rebuilt_once(tmp_path, monkeypatch, capsys):
    from emoe_llm.data import DataError, build_sft_datasets, data_config_from_dict, load_tokenizer
    from emoe_llm.data import pipeline
    from emoe_llm.tiny import DATA_DIR

    tok = load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")
    cfg = data_config_from_dict({"sources": [str(DATA_DIR / "instruct" / "alpaca_tiny.json")], "template": "llama3",
                                 "cache_dir": str(tmp_path / "cache"), "max_seq_len": 256})
    train, _, stats = build_sft_datasets(cfg, tok)
    rows = [r["input_ids"] for r in train]
    arrow = sorted((tmp_path / "cache" / "final").glob("*/train/*.arrow"))[0]
    os.truncate(arrow, arrow.stat().st_size // 2)

    train, _, stats = build_sft_datasets(cfg, tok)
    assert not stats["cache_hit"] and [r["input_ids"] for r in train] == rows  # rebuilt, the same rows
    out = capsys.readouterr().out
    assert f"data cache entry {arrow.parents[1]} failed to load ({arrow}:" in out and "rebuilding it" in out
    assert len(list(arrow.parents[2].glob(f"{arrow.parents[1].name}.damaged-*"))) == 1

    # the rebuilt entry fails too (the disk keeps cutting files short): one line naming the file
    real_save = pipeline._atomic_save

    def save_then_truncate(datasets_by_name, stats, final):
        real_save(datasets_by_name, stats, final)
        for f in final.glob("*/*.arrow"):
            os.truncate(f, f.stat().st_size // 2)

    monkeypatch.setattr(pipeline, "_atomic_save", save_then_truncate)
    os.truncate(arrow, arrow.stat().st_size // 2)
    with pytest.raises(DataError, match=r"fails to load even when just rebuilt: .*\.arrow: "):
        build_sft_datasets(cfg, tok)


# ---------------------------------------------------------------------------------------------------------------------
# a run that stopped learning


def test_stall_watch_warns_once_on_a_zero_grad_norm_or_a_loss_at_ln_vocab(tmp_path):
    import math

    watch = StallWatch(3, vocab_size=2048)
    assert [watch.update(step=s, loss=7.0 - s * 0.1, grad_norm=1.0) for s in range(1, 6)] == [None] * 5
    flat = math.log(2048)
    events = [watch.update(step=s, loss=flat, grad_norm=0.5) for s in range(6, 12)]
    assert events[:2] == [None, None] and events[2]["event"] == "stalled" and events[2]["since_step"] == 6
    assert "ln(vocab) = 7.6246" in events[2]["message"] and events[3:] == [None] * 3  # said once
    zero = StallWatch(2, vocab_size=None)
    assert zero.update(step=1, loss=3.0, grad_norm=0.0) is None
    assert "gradient norm has been exactly 0 for 2 steps" in zero.update(step=2, loss=3.1, grad_norm=0.0)["message"]
    assert StallWatch(0, 2048).update(step=1, loss=flat, grad_norm=0.0) is None


def test_plot_marks_where_the_run_stopped_learning(tmp_path):
    from emoe_llm.eval import plot_run

    lines = [{"step": s, "loss": 7.6, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 9)]
    lines.insert(5, {"event": "stalled", "step": 5, "since_step": 3, "message": "..."})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert plot_run.stalled_steps(tmp_path) == [3]
    marks = []
    real = plot_run._plot_training

    def spy(plt, records, finals, *, title, stalled=()):
        fig = real(plt, records, finals, title=title, stalled=stalled)
        marks.extend(line.get_label() for line in fig.axes[0].get_lines())
        return fig

    plot_run._plot_training = spy
    try:
        plot_run.plot_run(tmp_path)
    finally:
        plot_run._plot_training = real
    assert "stopped learning" in marks and (tmp_path / "plots" / "training.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# real DeepSpeed: one in-process rank (the resume logic), then 2 CPU ranks under the launchers (the signals)

from test_train_recipe import single_rank, train  # noqa: E402,F401 - the module's 1-rank gloo group and its runs


@pytest.mark.slow
def test_a_damaged_optimizer_shard_is_never_resumed_silently(single_rank):
    env = single_rank
    out = env["root"] / "damaged"
    train(env, out, "train.export=false")  # 4 steps, checkpoints at 2 and 4
    step4 = checkpoint.checkpoint_path(out, 4)
    shard = next(step4.glob("*optim_states.pt"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 4,000 bytes overwritten inside the optimizer shard, the size unchanged
        f.seek(size // 2)
        f.write(os.urandom(4_000))
    assert shard.stat().st_size == size

    with pytest.raises(checkpoint.CheckpointError) as e:
        train(env, out, "train.export=false", "train.max_steps=6")
    assert str(e.value) == (f"resume: checkpoint {step4} is damaged: {shard} does not match its sha256 in "
                            f"{step4 / 'manifest.json'} (changed since it was saved); not resumed "
                            "(train.on_damaged_checkpoint=previous resumes from the one before instead)")
    assert shard.stat().st_size == size and step4.is_dir()  # refused: nothing moved

    outcome, state = train(env, out, "train.export=false", "train.max_steps=6", "train.on_damaged_checkpoint=previous")
    assert outcome == "done" and state.step == 6
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in events if r.get("event") == "resume"]
    assert resumes[-1]["step"] == 2 and resumes[-1]["checkpoint"] == str(checkpoint.checkpoint_path(out, 2))
    assert len(list(out.glob("checkpoints/step_00000004.damaged-*"))) == 1
    assert checkpoint.verify_checkpoint(checkpoint.checkpoint_path(out, 6), rank=0) is None


@pytest.mark.slow
def test_a_run_that_stopped_learning_says_so(single_rank):
    """The issue's run: a learning rate of 1e6 without clipping sends the tiny model to uniform predictions (the loss
    at ln(vocab), the gradient norm 0); it warns once and logs a "stalled" event."""
    env = single_rank
    out = env["root"] / "stalled"
    outcome, state = train(env, out, "train.export=false", "train.lr=1e6", "train.max_grad_norm=0",
                           "train.warmup_steps=0", "train.lr_scheduler=constant", "train.max_steps=14",
                           "train.save_every_steps=0", "train.save_every_epoch=false", "train.stall_steps=3")
    assert outcome == "done"
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stalled = [r for r in events if r.get("event") == "stalled"]
    assert len(stalled) == 1 and "training stopped learning" in stalled[0]["message"], events[-3:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    dense, ds = tiny_fp32_workspace(root)
    return {"root": root, "dense": dense, "ds": ds, "cache": root / "cache"}


def recipe_args(env, out: Path, *overrides) -> list[str]:
    """A run long enough to be stopped midway (steps of a few tenths of a second: 2 CPU ranks, tiny model)."""
    return ["--ds_config", str(env["ds"]), "--config", str(TINY), f"output_dir={out}", f"model.path={env['dense']}",
            f"data.cache_dir={env['cache']}", "logging.progress_bar=false", "logging.tensorboard=false",
            "train.max_steps=400", "train.save_every_steps=0", "train.save_every_epoch=false",
            "train.eval_every_steps=0", "train.export=false", "train.dataloader_workers=1", *overrides]


RUN_MARK = "EMOE_LLM_TEST_RUN"  # in the environment of every process of a run a test starts, whatever its group


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=rank_env(**{RUN_MARK: str(log)}))
    proc.log = log
    return proc


@contextlib.contextmanager
def live_run(cmd: list[str], log: Path, out: Path):
    """A run (``start``) yielded once it has logged 3 steps; its process group is SIGKILLed on the way out, whatever
    the test did or asserted, so no rank outlives it."""
    run = start(cmd, log)
    try:
        wait_for(lambda: step_count(out) >= 3, 400, "the first steps")
        yield run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


def step_count(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for x in path.read_text().splitlines() if '"loss"' in x) if path.is_file() else 0


def processes_of(run: subprocess.Popen) -> list[int]:
    """The live processes of ``run`` (launcher, ranks, DataLoader workers), found by the mark in their environment:
    torchrun starts its ranks in process groups of their own, and an orphaned rank has a new parent."""
    mark = f"{RUN_MARK}={run.log}".encode()
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(int(proc.name))
        except OSError:
            pass
    return alive


def stopped_run(out: Path) -> dict:
    """The preempted event of a stopped run, after checking its checkpoint: complete, whole, of that step."""
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in events if "event" not in r]
    assert steps == list(range(1, len(steps) + 1))  # each step logged once: no second run wrote here
    assert events[-1]["event"] == "preempted" and events[-1]["step"] == steps[-1]
    ckpt = checkpoint.checkpoint_path(out, steps[-1])
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text())["step"] == steps[-1]
    assert checkpoint.verify_checkpoint(ckpt, rank=0) is None
    assert not (out / "COMPLETED").exists()
    return events[-1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tiny_run, tmp_path, launcher):
    """DeepSpeed's single-node runner dies of a SIGTERM alone (it forwards signals only for multi-node runs): the
    ranks see their launcher gone, checkpoint that step and exit. torchrun passes the SIGTERM on to its ranks.
    A second run into the live run's dir is refused."""
    out = tmp_path / "run"
    with live_run(rank_command("emoe_llm.train", *recipe_args(tiny_run, out), launcher=launcher, module=True),
                  tmp_path / "run.log", out) as run:
        second = subprocess.run([str(BIN / "emoe-llm"), "train", "--nproc", "1",
                                 *recipe_args(tiny_run, out)], capture_output=True, text=True, env=rank_env(),
                                timeout=300)
        assert second.returncode == 2 and f"output_dir {out} is in use by another run (pid " in second.stderr
        run.send_signal(signal.SIGTERM)  # the runner only, as `kill PID` does
        run.wait(timeout=30)
        wait_for(lambda: not processes_of(run), 60, "every rank to exit")
    log = run.log.read_text()
    reason = stopped_run(out)["reason"]
    assert reason.startswith("launcher pid ") if launcher == "deepspeed" else reason == "SIGTERM", log[-3000:]
    assert "[emoe-llm] error" not in log
    # torchrun's own SignalException traceback (its agent's way of ending on a signal) is not the ranks'
    assert "Traceback" not in log or launcher == "torchrun" and log.count("Traceback") == 1 and \
        log.rstrip().endswith("got signal: 15"), log[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_dataloader_workers_survive_it(tiny_run, tmp_path):
    """``kill -TERM -PGID`` of a bare ``deepspeed`` run reaches the runner, launch.py, the ranks and their DataLoader
    workers. The workers ignore it, the ranks checkpoint the step within launch.py's 30 s grace and exit."""
    out = tmp_path / "run"
    with live_run(rank_command("emoe_llm.train", *recipe_args(tiny_run, out), launcher="deepspeed", module=True),
                  tmp_path / "run.log", out) as run:
        os.killpg(run.pid, signal.SIGTERM)
        wait_for(lambda: not processes_of(run), 60, "every rank to exit")
    log = run.log.read_text()
    assert stopped_run(out)["reason"] == "SIGTERM", log[-3000:]
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_sigterm_to_emoe_llm_trains_group_ends_in_the_preemption_path_exit_0(tiny_run, tmp_path):
    out = tmp_path / "run"
    with live_run([str(BIN / "emoe-llm"), "train", "--nproc", "2", *recipe_args(tiny_run, out)], tmp_path / "run.log",
                  out) as run:
        os.killpg(run.pid, signal.SIGTERM)
        rc = run.wait(timeout=60)
    log = run.log.read_text()
    assert rc == 0, log[-3000:]
    assert stopped_run(out)["reason"] == "SIGTERM to emoe-llm train"
    assert not processes_of(run)  # the launcher's own process group is gone too (its ranks exited 0)


@pytest.mark.slow
def test_kill_9_of_one_rank_leaves_one_line_on_the_survivor_and_no_traceback(tiny_run, tmp_path):
    import psutil

    out = tmp_path / "run"
    with live_run(rank_command("emoe_llm.train", *recipe_args(tiny_run, out), launcher="deepspeed", module=True),
                  tmp_path / "run.log", out) as run:
        rank1 = next(p for p in psutil.Process(run.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline())
        rank1.kill()  # SIGKILL: what the OOM killer does
        run.wait(timeout=90)
        wait_for(lambda: not processes_of(run), 60, "every rank to exit")
    log = run.log.read_text()
    assert run.returncode != 0
    assert "Traceback" not in log and "Connection closed by peer" not in log.replace(
        "another rank went away during a collective (Connection closed by peer)", ""), log[-4000:]
