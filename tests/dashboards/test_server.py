"""`tf dashboard`: loopback by default, the root handed to the app, the server exec'd in place of `tf`."""
from pathlib import Path

from dashboards import server
from flows.cli import main


def test_tf_dashboard_execs_streamlit_on_loopback_with_the_root(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(server.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    assert main(["dashboard", "--root", str(tmp_path), "--port", "8600"]) == 0
    (path, argv, env), = calls
    assert argv[:4] == [path, "-m", "streamlit", "run"] and Path(argv[4]) == server.APP
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8600"
    assert env["TF_DASHBOARD_ROOT"] == str(tmp_path.resolve())
    assert env["TF_DASHBOARD_TORCH_THREADS"] == "1"   # edits stay quick on a busy CPU


def test_host_can_be_chosen(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(server.os, "execve", lambda path, argv, env: calls.append(argv))
    main(["dashboard", "--root", str(tmp_path), "--host", "0.0.0.0"])
    assert calls[0][calls[0].index("--server.address") + 1] == "0.0.0.0"
    assert calls[0][calls[0].index("--server.port") + 1] == "8501"
