"""A launched run ends cleanly when one process fails: one error anywhere ends every process within a minute, the
last line is the original error naming its process, a killed process is named, and the summary says so.

The failures are injected on process 1 only through a ``sitecustomize`` module on PYTHONPATH (each process of the
launched run imports it at start-up; the launching process has no RANK and is left alone).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import run_subprocess, write_config

HOOK = """
import os, time
MARK = os.environ["KORET_TEST_MARK"]
def _mark():
    with open(MARK, "w") as fh:
        fh.write(repr(time.time()))
if os.environ.get("RANK") == "1":
    WHERE, HOW = os.environ["KORET_TEST_FAIL"].split(":")
    def fail():
        _mark()
        if HOW == "kill":
            import signal
            os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's OOM killer
        from koret.errors import KoretError
        raise KoretError("data.train: injected failure on this process only", "fix the injected thing")
    if WHERE == "mine":  # after encoding, while process 0 waits for it in the sharded search
        import koret.sharded_search as s
        s.search_slices = lambda *a, **k: fail()
    else:  # the second training step, while process 0 waits for it in DDP's gradient all-reduce
        from sentence_transformers import SentenceTransformerTrainer as T
        _step = T.training_step
        calls = {"n": 0}
        def training_step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                fail()
            return _step(self, *a, **k)
        T.training_step = training_step
"""


def _run_config(tmp_path: Path, tiny_model: Path, data_dir: Path, stage: str) -> Path:
    cfg: dict = {"run": {"dir": str(tmp_path / "run")}}
    if stage == "mine":
        cfg["mine"] = {"data": {"train": str(data_dir / "pairs.jsonl"), "corpus": str(data_dir / "corpus.txt")},
                       "teacher": {"model": str(tiny_model)}, "search": {"top_k": 10},
                       "filter": {"num_negatives": 2}, "cache_dir": str(tmp_path / "cache")}
    else:
        cfg["train"] = {"model": {"name": str(tiny_model)}, "data": {"train": str(data_dir / "pairs.jsonl")},
                        "loss": {"name": "mnrl"},
                        "args": {"per_device_train_batch_size": 8, "num_train_epochs": 1, "logging_steps": 1,
                                 "save_steps": 1000}}
    return write_config(tmp_path / "run.yaml", cfg)


def _launch_with_failure(tmp_path: Path, config: Path, where: str, how: str):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "failed-at"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "KORET_TEST_FAIL": f"{where}:{how}", "KORET_TEST_MARK": str(mark)}
    r = run_subprocess("run", "-c", str(config), "--num-processes", "2", timeout=400, env=env)
    ended = time.time()
    assert mark.exists(), f"the failure was never injected:\n{r.stderr[-3000:]}"
    return r, ended - float(mark.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mine", "train"])
def test_an_error_on_one_process_ends_the_run_with_that_error(tmp_path, tiny_model, data_dir, where):
    """Process 1 raises koret's error while process 0 waits for it in a collective (the sharded search; DDP's
    all-reduce): every process ends within a minute, the last line is process 1's error, and the summary that
    the main process writes marks the stage failed with that error."""
    config = _run_config(tmp_path, tiny_model, data_dir, where)
    r, seconds = _launch_with_failure(tmp_path, config, where, "raise")
    assert seconds < 60, f"the run went on {seconds:.0f} s after the failure"
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: process 1 of 2: data.train: injected failure on this process only "
                         "(fix the injected thing)"), r.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], "one error line"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ok"] is False and summary["stages"][0]["status"] == "failed"
    assert summary["stages"][0]["figure"].startswith("process 1: data.train: injected failure"), summary
    assert not (tmp_path / "run" / where / ".koret-stage.json").exists(), "a failed stage is not recorded as done"


@pytest.mark.slow
def test_a_process_killed_during_training_ends_the_run_naming_it(tmp_path, tiny_model, data_dir):
    config = _run_config(tmp_path, tiny_model, data_dir, "train")
    r, seconds = _launch_with_failure(tmp_path, config, "train", "kill")
    assert seconds < 60, f"the run went on {seconds:.0f} s after the kill"
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: process 1 of 2 was killed by SIGKILL (out of memory?), so the run "
                                "stopped"), r.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], "one error line"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run" / "train" / "final").exists()
    assert not (tmp_path / "run" / "train" / ".koret-stage.json").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ok"] is False and summary["stages"][0]["status"] == "failed", summary
    assert "│ train │ failed │" in r.stderr, "the main process printed the run table (gloo's text broke it)"


@pytest.mark.slow
def test_an_error_on_the_main_process_ends_the_processes_waiting_for_it(tmp_path, tiny_model, data_dir):
    """eval runs on the main process while process 1 waits for it in koret run's control group: eval's error
    ends both processes at once, and the last line is that error, from process 0."""
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "mine": {"data": {"train": str(data_dir / "pairs.jsonl")}, "teacher": {"model": str(tiny_model)},
                    "search": {"top_k": 10}, "filter": {"num_negatives": 2}, "cache_dir": str(tmp_path / "c")},
           "eval": {"data": {"path": str(tmp_path / "missing.jsonl")}, "models": [{"name": str(tiny_model)}],
                    "k": [10], "cache_dir": str(tmp_path / "c")}}
    r = run_subprocess("run", "-c", str(write_config(tmp_path / "run.yaml", cfg)), "--num-processes", "2",
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: process 0 of 2: data.path: file not found"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ran", "failed"], summary


# --------------------------------------------------------------------------------------------- the report


def test_failure_report_puts_the_cause_first():
    """koret's own error beats the peers that then failed in collectives or were stopped; a process killed by
    a signal beats the crash its peer saw in a collective; a crash gives its traceback; the processes torchrun
    SIGKILLs 30 s after its SIGTERM are not causes; exit codes alone still give a line."""
    from koret.dist import failure_report

    rec = {0: {"rank": 0, "kind": "peer", "message": "another process stopped", "time": 101.0},
           1: {"rank": 1, "kind": "error", "message": "data.train: bad", "time": 100.5}}
    assert failure_report({0: (1, "", 101), 1: (2, "", 101)}, 2, rec) == (2, "process 1 of 2: data.train: bad", "")
    two = {0: {"rank": 0, "kind": "error", "message": "late", "time": 105.0},
           3: {"rank": 3, "kind": "error", "message": "first", "time": 104.0}}
    assert failure_report({0: (2, "", 105), 3: (2, "", 104)}, 4, two)[1] == "process 3 of 4: first"

    crash = {0: {"rank": 0, "kind": "crash", "message": "ValueError: boom", "detail": "Traceback ...", "time": 1.0}}
    code, line, detail = failure_report({0: (1, "", 1), 1: (-9, "SIGKILL", 1)}, 2, crash)
    assert (code, detail) == (1, "") and line.startswith("process 1 of 2 was killed by SIGKILL (out of memory?)")
    assert failure_report({0: (1, "", 1)}, 2, crash) == (1, "process 0 of 2 failed: ValueError: boom",
                                                         "Traceback ...")
    # rank 1 was OOM-killed first; rank 0, stuck in a collective, got torchrun's SIGKILL 30 s later
    code, line, _ = failure_report({0: (-9, "SIGKILL", 131), 1: (-9, "SIGKILL", 100)}, 2)
    assert line.startswith("process 1 of 2 was killed by SIGKILL")
    # rank 1 crashed; rank 0 outlived the SIGTERM and was SIGKILLed: the crash is the cause, with its traceback
    crash1 = {1: {"rank": 1, "kind": "crash", "message": "KeyError: 'x'", "detail": "Traceback 1", "time": 100.2}}
    assert failure_report({0: (-9, "SIGKILL", 131), 1: (1, "", 100)}, 2, crash1) == (
        1, "process 1 of 2 failed: KeyError: 'x'", "Traceback 1")
    # the launcher's SIGTERM of the survivors is not a cause
    code, line, _ = failure_report({0: (-15, "SIGTERM", 100), 3: (-9, "SIGKILL", 100)}, 4)
    assert code == 1 and line.startswith("process 3 of 4 was killed by SIGKILL")
    # one process preempted from outside (SIGTERM, koret's handler recorded it), its peer saw it go
    pre = {1: {"rank": 1, "kind": "stopped", "message": "stopped", "time": 100.0},
           0: {"rank": 0, "kind": "peer", "message": "another process stopped", "time": 100.1}}
    assert failure_report({0: (1, "", 100), 1: (143, "", 100)}, 2, pre)[1].startswith(
        "process 1 of 2 was stopped by SIGTERM (preempted?)")
    assert failure_report({1: (3, "", 100)}, 2)[1].startswith("process 1 of 2 ended with exit code 3 without a message")
    # the peer that saw rank 1 exit with 3 is not blamed
    assert failure_report({0: (1, "", 100), 1: (3, "", 100)}, 2, {0: rec[0]})[1].startswith("process 1 of 2 ended")


def test_records_say_what_kind_of_failure_each_process_had(tmp_path, monkeypatch):
    from koret import dist
    from koret.errors import KoretError

    monkeypatch.setenv("KORET_FAILURE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    dist.record_failure(KoretError("x: bad", "do y"))
    assert dist.read_failures()[1]["kind"] == "error" and dist.read_failures()[1]["message"] == "x: bad (do y)"
    monkeypatch.setenv("RANK", "0")
    dist.record_failure(dist.PeerLost("a barrier", RuntimeError("Connection closed by peer")))
    assert dist.read_failures()[0]["kind"] == "peer"
    dist.record_failure(dist.Stopped())
    assert dist.read_failures()[0]["kind"] == "stopped"
    dist.record_failure(ValueError("boom"), "Traceback: ...")
    assert dist.read_failures()[0] | {"time": 0} == {"rank": 0, "kind": "crash", "message": "ValueError: boom",
                                                     "detail": "Traceback: ...", "time": 0}
    # DDP's all-reduce failing because the peer went away is not a bug in koret
    dist.record_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]"))
    assert dist.read_failures()[0]["kind"] == "peer"


def test_sigterm_unwinds_as_stopped_which_no_except_exception_swallows():
    """The launcher's SIGTERM becomes Stopped, a BaseException: a reader's ``except Exception`` (one that would
    take it for a corrupt file) lets it through; a second SIGTERM while unwinding is ignored."""
    import subprocess
    import sys

    script = """
import os, signal, sys
from koret import dist
dist.stop_on_sigterm()
try:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        import time; time.sleep(5)
    except Exception:
        print("swallowed"); sys.exit(0)
except dist.Stopped:
    os.kill(os.getpid(), signal.SIGTERM)  # ignored now
    print("stopped"); sys.exit(0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "stopped" and r.returncode == 0, (r.stdout, r.stderr)


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16600: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def test_a_stage_that_saw_its_peer_die_is_summarized_in_one_plain_line(tmp_path, monkeypatch, capsys):
    """rank 1 SIGKILLed during train: process 0's DDP all-reduce fails with gloo's RuntimeError, which leaves no
    record. The summary says another process stopped (not gloo's raw text), and the run table prints it as text:
    gloo's '[/__w/...]' was read as a rich closing tag, the MarkupError replaced the stage's error and the table
    was never printed."""
    from koret import pipeline

    monkeypatch.setenv("KORET_FAILURE_DIR", str(tmp_path / "none"))
    figure = pipeline._failure_figure(RuntimeError(GLOO_RESET))
    assert figure.startswith("another process of this run stopped while this one waited in a collective of this "
                             "stage (RuntimeError: [/__w/pytorch/"), figure
    pipeline._show([{"stage": "train", "status": "failed", "seconds": 2.6, "figure": figure},
                    {"stage": "[eval]", "status": "not run", "seconds": 0.0, "figure": "model [v1] [/x]"}],
                   tmp_path)
    err = capsys.readouterr().err
    assert "[/__w/pytorch/" in err and "[eval]" in err and "model [v1] [/x]" in err, err
