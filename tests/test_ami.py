"""AMIClient against the strict FakeAMI (127.0.0.1 only, no real Asterisk)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, List

import pytest

from agi_bitrix.pbx.ami import (
    AMIAuthError, AMIClient, AMIConnectionError, AMIError, AMITimeout, Message,
)
from agi_bitrix.testing.fake_ami import (
    FakeAMI, OriginateOutcome, originate_variables, split_app_args,
)


def wait_until(pred: Callable[[], bool], limit: float = 15.0) -> None:
    """Synchronisation only: fail if something that must happen never does."""
    end = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.005)


@pytest.fixture
def fake():
    with FakeAMI(auth_fail_delay=0.05) as server:
        yield server
    assert server.violations == []


@pytest.fixture
def client(fake):
    c = AMIClient(*fake.address, "crm", "change-me", timeout=2.0)
    c.connect()
    yield c
    c.close()


def raw_session(fake: FakeAMI) -> socket.socket:
    sock = socket.create_connection(fake.address, timeout=2.0)
    assert sock.recv(100) == b"Asterisk Call Manager/11.0.0\r\n"
    return sock


def read_message(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return data


# -- login ----------------------------------------------------------------------------------

def test_login_ok(fake, client):
    assert client.connected and client.version == "11.0.0"
    assert fake.logins == 1 and fake.failed_logins == 0
    assert client.ping()


def test_login_refused(fake):
    c = AMIClient(*fake.address, "crm", "wrong", timeout=2.0)
    with pytest.raises(AMIAuthError, match="Authentication failed"):
        c.connect()
    assert not c.connected and fake.failed_logins == 1 and fake.logins == 0


def test_not_an_ami_and_nothing_listening():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(AMIConnectionError, match="not an Asterisk AMI"):
        AMIClient("127.0.0.1", port, "crm", "x", timeout=1.0).connect()
    t.join(2)
    srv.close()
    with pytest.raises(AMIConnectionError, match="cannot connect"):
        AMIClient("127.0.0.1", port, "crm", "x", timeout=1.0).connect()


def test_fake_refuses_actions_before_login(fake):
    sock = raw_session(fake)
    sock.sendall(b"Action: Ping\r\nActionID: p1\r\n\r\n")
    assert read_message(sock) == b"Response: Error\r\nActionID: p1\r\nMessage: Permission denied\r\n\r\n"
    sock.close()
    assert fake.actions == []


# -- routing ----------------------------------------------------------------------------------

def test_five_threads_get_their_own_responses(fake, client):
    fake.set_action_delay("Ping", 0.2)      # answered late: the Getvars overtake it
    for i in range(1, 5):
        fake.globals[f"V{i}"] = f"value-{i}"
    errors: List[str] = []
    start = threading.Barrier(5)

    def worker(i: int) -> None:
        start.wait()
        try:
            if i == 0:
                reply = client.action("Ping")
                if reply.get("Ping") != "Pong":
                    errors.append(f"ping got {reply.headers}")
                return
            for _ in range(20):
                reply = client.action("Getvar", {"Variable": f"V{i}"})
                if reply.get("Value") != f"value-{i}":
                    errors.append(f"thread {i} got {reply.headers}")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert errors == []
    ids = [a.action_id for a in fake.actions]
    assert len(ids) == 81 and len(set(ids)) == 81


def test_list_action_collects_events(fake, client):
    client.originate("Local/100@agents", context="dialer", exten="s").wait(10)
    reply = client.action("CoreShowChannels")
    assert reply.response == "Success" and reply.get("EventList") == "start"
    assert [e.name for e in reply.events] == ["CoreShowChannel", "CoreShowChannel"]
    assert [e.get("Channel") for e in reply.events] == [
        "Local/100@agents-00000001;1", "Local/100@agents-00000001;2"]
    assert reply.complete is not None and reply.complete.get("ListItems") == "2"


def test_action_timeout(fake, client):
    fake.set_action_delay("Ping", 5)
    with pytest.raises(AMITimeout, match="Ping"):
        client.action("Ping", timeout=0.1)
    assert client.action("Getvar", {"Variable": "X"}).response == "Success"  # still usable


def test_unknown_action_and_message_accessors(client):
    reply = client.action("NoSuchThing", [("Foo", "1"), ("Foo", "2")])
    assert reply.response == "Error"
    assert reply.get("message").startswith("Invalid/unknown command: NoSuchThing.")
    msg = Message([("Event", "X"), ("ChanVariable", "A=1"), ("chanvariable", "B=2")])
    assert msg.get("CHANVARIABLE") == "A=1" and msg.getall("ChanVariable") == ["A=1", "B=2"]
    assert msg.get("Missing", "d") == "d" and msg.name == "X" and msg.response is None


# -- originate ------------------------------------------------------------------------------

@pytest.mark.parametrize("reason,text", [
    (4, "answered"), (5, "busy"), (3, "no answer"), (8, "congestion"), (0, "failure")])
def test_originate_outcomes(fake, client, reason, text):
    fake.on_originate(lambda m: OriginateOutcome(reason=reason, delay=0.01))
    pending = client.originate("Local/7900000001@clients", context="agi-test", exten="s",
                               caller_id="Lab Client <7900000001>", timeout_ms=15000,
                               variables={"FOO": "bar"}, channel_id="crm-call-0001")
    result = pending.wait(10)
    assert pending.done() and result.action_id == pending.action_id
    assert (result.success, result.reason, result.reason_text) == (reason == 4, reason, text)
    if reason == 4:
        assert result.channel == "Local/7900000001@clients-00000001;1"
        assert result.uniqueid == "crm-call-0001"
    else:
        assert result.channel == "Local/7900000001@clients"
    # The fixture's frames (PART B, S03/S04): same header order both ways.
    assert [k for k, _ in result.response.headers] == [
        "Event", "Privilege", "ActionID", "Response", "Channel", "Context", "Exten", "Reason",
        "Uniqueid", "CallerIDNum", "CallerIDName"]
    assert (result.response.get("CallerIDNum"), result.response.get("CallerIDName")) == (
        "7900000001", "Lab Client")
    sent = fake.originates[-1]
    assert [k for k, _ in sent.headers] == [
        "Action", "ActionID", "Channel", "Context", "Exten", "Priority", "Timeout", "CallerID",
        "ChannelId", "Variable", "Async"]
    assert sent.get("Async") == "true" and sent.get("Priority") == "1"


def test_failed_originate_without_channel_id_has_unknown_uniqueid(fake, client):
    fake.on_originate(lambda m: OriginateOutcome(reason=5, delay=0.01))
    result = client.originate("PJSIP/100", context="dialer", exten="s").wait(10)
    assert result.uniqueid == "<unknown>" and result.response.get("CallerIDName") == "<unknown>"


def test_originate_refused_raises(fake, client):
    fake.dialplan = {"dialer": {"s"}}
    with pytest.raises(AMIError, match="Extension does not exist"):
        client.originate("PJSIP/100", context="nowhere", exten="s")
    with pytest.raises(ValueError):
        client.originate("PJSIP-100", context="dialer", exten="s")
    with pytest.raises(ValueError):
        client.originate("PJSIP/100", exten="s")          # Exten needs Context
    assert [m.get("Context") for m in fake.originates] == ["nowhere"]


def test_fake_originate_errors_and_sync_originate(fake, client):
    fake.dialplan = {"dialer": {"s"}}
    cases = [
        ([("Context", "dialer"), ("Exten", "s"), ("Priority", "1")], "Channel not specified"),
        ([("Channel", "PJSIP/1"), ("Application", "AGI"), ("Data", "x")],
         "Originate Access Forbidden: app or data blacklisted"),
        ([("Channel", "PJSIP/1"), ("Context", "dialer"), ("Exten", "s"), ("Priority", "x")],
         "Invalid priority"),
        ([("Channel", "PJSIP1"), ("Context", "dialer"), ("Exten", "s"), ("Priority", "1")],
         "Invalid channel"),
        ([("Channel", "PJSIP/1"), ("Exten", "s"), ("Priority", "1")], "Extension does not exist."),
        ([("Channel", "PJSIP/1"), ("Context", "dialer"), ("Exten", "s")],
         "Originate with 'Exten' requires 'Context' and 'Priority'"),
    ]
    for headers, message in cases:
        reply = client.action("Originate", headers + [("Async", "true")])
        assert (reply.response, reply.get("Message")) == ("Error", message)
    # Without Async the session blocks until the outcome, then answers Error or Success.
    fake.on_originate(lambda m: OriginateOutcome(reason=5, delay=0.01))
    base = [("Channel", "PJSIP/1"), ("Context", "dialer"), ("Exten", "s"), ("Priority", "1")]
    assert client.action("Originate", base).get("Message") == "Originate failed"
    fake.on_originate(lambda m: None)
    assert client.action("Originate", base).get("Message") == "Originate successfully queued"


def test_variable_with_comma_and_quote_is_one_variable(fake, client):
    nasty = 'x,y "quoted" back\\slash,B=2'
    client.originate("PJSIP/100", context="dialer", exten="s",
                     variables={"CUSTOMER": nasty, "__CRMID": "42"}).wait(10)
    sent = fake.originates[-1]
    assert sent.getall("Variable") == [
        'CUSTOMER="x,y \\"quoted\\" back\\\\slash,B=2"', '__CRMID="42"']
    assert originate_variables(sent) == [("CUSTOMER", nasty), ("__CRMID", "42")]
    # The parser is Asterisk's (main/app.c, as observed on Asterisk): unquoted commas do split.
    assert split_app_args('A=1,B=2') == ["A=1", "B=2"]
    assert split_app_args('C="x,y"') == ["C=x,y"] and split_app_args("D=p\\,q") == ["D=p,q"]


def test_cr_lf_nul_raise_before_anything_is_sent(fake, client):
    for bad in ("a\r\nAction: Hangup", "a\nb", "a\rb", "a\0b"):
        with pytest.raises(ValueError):
            client.action("Getvar", {"Variable": bad})
        with pytest.raises(ValueError):
            client.originate("PJSIP/100", context="dialer", exten="s", caller_id=bad)
        with pytest.raises(ValueError):
            client.originate("PJSIP/100", context="dialer", exten="s", variables={"X": bad})
    with pytest.raises(ValueError):
        client.originate("PJSIP/100", context="dialer", exten="s", variables={"X=Y": "1"})
    with pytest.raises(ValueError):
        client.action("Getvar", {"Bad Name": "1"})
    with pytest.raises(ValueError):
        client.action("Getvar", {"Variable": "x" * 1020})              # Asterisk would drop it
    with pytest.raises(ValueError):
        client.action("Getvar", [("X-Pad", "1")] * 130)
    with pytest.raises(ValueError):
        client.action("Ping", {"ActionID": "mine"})
    assert client.ping()
    assert [a.get("Action") for a in fake.actions] == ["Ping"]
    assert fake.originates == []


# -- states, events, hangup -----------------------------------------------------------------

def test_extension_and_device_state(fake, client):
    fake.set_extension_state("101", 1)
    fake.set_extension_state("102", 8, context="agents", hint="PJSIP/102")
    fake.set_device_state("PJSIP/101", "INUSE")
    assert client.extension_state("101") == (1, "InUse")
    assert client.extension_state("102", "agents") == (8, "Ringing")
    assert client.extension_state("999") == (-1, "Unknown")
    assert client.device_state("PJSIP/101") == "INUSE"
    assert client.device_state("PJSIP/555") == "UNKNOWN"
    with pytest.raises(ValueError):
        client.device_state("PJSIP/1,evil")
    sent = fake.actions[0]
    assert (sent.get("Action"), sent.get("Exten"), sent.get("Context")) == (
        "ExtensionState", "101", "default")
    assert fake.actions[3].get("Variable") == "DEVICE_STATE(PJSIP/101)"


def test_chanvariable_events_and_bad_callbacks_do_not_kill_the_reader(fake, client):
    seen: List[Message] = []

    def boom(msg: Message) -> None:
        raise RuntimeError("callback bug")

    client.on_event("*", boom)
    client.on_event("new*", seen.append)
    fake.emit([("Event", "Newchannel"), ("Privilege", "call,all"), ("Channel", "PJSIP/1-1"),
               ("ChanVariable", "CRMID=42"), ("ChanVariable", "LEAD=a,b"), ("Uniqueid", "1.1")])
    assert client.ping()        # same socket: the event was dispatched before this answer
    assert len(seen) == 1 and seen[0].getall("ChanVariable") == ["CRMID=42", "LEAD=a,b"]
    assert seen[0].get("chanvariable") == "CRMID=42"


def test_action_from_a_callback_is_refused_not_deadlocked(fake, client):
    outcome: List[object] = []
    done = threading.Event()

    def cb(msg: Message) -> None:
        try:
            client.action("Ping")
        except AMIError as exc:
            outcome.append(exc)
        done.set()

    client.on_event("UserEvent", cb)
    fake.emit({"Event": "UserEvent", "UserEvent": "x"})
    assert done.wait(10) and "deadlock" in str(outcome[0])


def test_answer_hangup_and_events(fake, client):
    events: List[Message] = []
    client.on_event("*", lambda m: m.name != "FullyBooted" and events.append(m))
    answered = threading.Event()
    fake.on_originate(lambda m: OriginateOutcome(on_answer=answered.set, delay=0.01))
    result = client.originate("Local/100@agents/n", context="dialer", exten="s").wait(10)
    assert answered.wait(10)
    wait_until(lambda: sum(e.name == "Hangup" for e in events) == 2)
    assert [e.name for e in events][:4] == ["Newchannel", "Newchannel", "Newstate",
                                            "OriginateResponse"]
    assert result.channel == "Local/100@agents-00000001;1" and fake.channels == []
    fake.on_originate(lambda m: OriginateOutcome(delay=0.01))   # stays up
    channel = client.originate("PJSIP/100", context="dialer", exten="s").wait(10).channel
    client.hangup(channel, cause=16)
    assert fake.channels == []
    with pytest.raises(AMIError, match="No such channel"):
        client.hangup(channel)


# -- reconnect and close --------------------------------------------------------------------

def test_drop_fails_waiters_then_next_action_reconnects(fake, client):
    fake.set_action_delay("Ping", 5)
    fake.on_originate(lambda m: OriginateOutcome(delay=5))
    pending = client.originate("PJSIP/100", context="dialer", exten="s")
    errors: List[Exception] = []

    def ping() -> None:
        try:
            client.action("Ping")
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=ping)
    t.start()
    wait_until(lambda: len(fake.actions) == 2)
    fake.drop_connections()
    t.join(3)
    assert len(errors) == 1 and isinstance(errors[0], AMIConnectionError)
    with pytest.raises(AMIConnectionError):
        pending.wait(10)
    wait_until(lambda: not client.connected)
    fake.set_action_delay("Ping", 0)
    assert client.action("Ping").get("Ping") == "Pong"
    assert client.connected and fake.logins == 2


def test_reconnect_disabled(fake):
    c = AMIClient(*fake.address, "crm", "change-me", timeout=2.0, reconnect=False)
    c.connect()
    fake.drop_connections()
    wait_until(lambda: not c.connected)
    with pytest.raises(AMIConnectionError, match="reconnect disabled"):
        c.action("Ping")
    assert not c.ping() and fake.logins == 1
    c.close()


def test_close_logs_off(fake):
    with AMIClient(*fake.address, "crm", "change-me", timeout=2.0) as c:
        assert c.ping()
    assert [a.get("Action") for a in fake.actions] == ["Ping", "Logoff"]
    assert not c.connected
    with pytest.raises(AMIConnectionError, match="closed"):
        c.action("Ping")


def test_pending_originate_timeout(fake, client):
    fake.on_originate(lambda m: OriginateOutcome(delay=5))
    pending = client.originate("PJSIP/100", context="dialer", exten="s")
    with pytest.raises(AMITimeout):
        pending.wait(0.05)
    assert not pending.done()


# -- the fake's strictness ------------------------------------------------------------------

def test_fake_records_protocol_violations():
    with FakeAMI(auth_fail_delay=0.05) as fake:
        sock = raw_session(fake)
        sock.sendall(b"Action: Login\r\nActionID: l\r\nUsername: crm\r\nSecret: change-me\r\n"
                     b"Events: off\r\n\r\n")
        assert b"Authentication accepted" in read_message(sock)
        sock.sendall(b"Action: Ping\r\n\r\n")                                  # no ActionID
        assert read_message(sock).startswith(b"Response: Success\r\nPing: Pong\r\n")
        sock.sendall(b"Action: Getvar\r\nActionID: 2\r\nVariable: A\rB\r\n\r\n")  # stray CR
        read_message(sock)
        sock.sendall(b"Action: Ping\r\nActionID: 3\r\nX: " + b"y" * 1100 + b"\r\n\r\n")
        sock.sendall(b"Action: Ping\nActionID: 4\n" + b"X: 1\n" * 130 + b"\n")     # bare LF ok
        assert b"ActionID: 4" in read_message(sock)                           # 3 was discarded
        sock.sendall(b"Action: Logoff\r\nActionID: 5\r\n\r\n")
        assert read_message(sock) == (b"Response: Goodbye\r\nActionID: 5\r\n"
                                      b"Message: Thanks for all the fish.\r\n\r\n")
        sock.close()
        assert fake.violations == [
            "Ping: no ActionID",
            "Getvar: header Variable contains a stray CR",
            "line over 1024 bytes: Asterisk discards the whole message",
            "Ping: 132 headers, Asterisk ignores all after 128",
        ]
        assert [a.action_id for a in fake.actions] == [None, "2", "4", "5"]
