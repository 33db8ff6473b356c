"""A stage's global concurrency slot: a slot another run holds is StageLocked (not retried), while a
Prefect server that does not answer is asked again and then fails as a transient error."""
import socket
import threading

import httpx
import pytest
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from flows import stages
from flows.stages import SlotUnreachable, _slot_held, stage_slot
from storage.config import load_config
from storage.locks import StageLocked
from tasks.stage import is_transient


class HangUp:
    """A TCP peer on a free port that accepts each connection and closes it unanswered, counting them:
    what a client sees of a server that restarts or a proxy without its backend."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def test_a_server_that_does_not_answer_is_asked_again_then_fails_as_transient(tmp_path, monkeypatch):
    peer = HangUp()
    monkeypatch.setattr(stages, "SLOT_RETRY_DELAYS_S", (0.0, 0.0))
    config = load_config("configs/tiny.yaml")
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{peer.port}/api",
                                         PREFECT_CLIENT_MAX_RETRIES: 0}):
            with pytest.raises(SlotUnreachable, match="did not give the global concurrency limit .* in 3 attempts"):
                with stage_slot(str(tmp_path), "encode", config):
                    pytest.fail("the stage ran without its slot")
    finally:
        peer.sock.close()
    assert peer.connections == 3   # one per attempt: asked again twice
    error = SlotUnreachable("x")
    assert is_transient(error) and not isinstance(error, StageLocked)


def _status_error(code: int) -> ConcurrencySlotAcquisitionError:
    """What prefect.concurrency raises when the server answers `code` to a slot request."""
    request = httpx.Request("POST", "http://127.0.0.1/api/v2/concurrency_limits/increment-with-lease")
    try:
        try:
            raise httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code, request=request))
        except httpx.HTTPStatusError as status:
            raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots") from status
    except ConcurrencySlotAcquisitionError as error:
        return error


def test_a_held_slot_is_told_apart_from_a_server_error():
    assert _slot_held(_status_error(423))                                      # held (on_locked: fail)
    assert _slot_held(AcquireConcurrencySlotTimeoutError("timed out after 5 second(s)"))   # held (wait)
    assert not _slot_held(_status_error(500)) and not _slot_held(_status_error(503))
    try:
        try:
            raise httpx.ConnectError("All connection attempts failed")
        except httpx.ConnectError as refused:
            raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots") from refused
    except ConcurrencySlotAcquisitionError as error:
        assert not _slot_held(error)
    assert not is_transient(StageLocked("held"))
